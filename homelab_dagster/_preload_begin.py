"""Imported only by the steps' fork server, first of :data:`~homelab_dagster.step_server.PRELOAD`.

Turns the cyclic garbage collector off while the server imports: the imports allocate about
half a million objects and collect no garbage worth the passes (a quarter of the import time on
two cores). :mod:`homelab_dagster._preload_end` freezes what was imported and turns it back on.
"""

import gc

gc.disable()

"""Imported only by the steps' fork server, first of :data:`~homelab_dagster.step_server.PRELOAD`.

- Turns the cyclic garbage collector off while the server imports: the imports allocate about
  half a million objects and collect no garbage worth the passes (a quarter of the import time
  on two cores). :mod:`homelab_dagster._preload_end` freezes what was imported and turns it
  back on.
- Sends the server's stdout and stderr, which its steps inherit, to the file named by
  ``$HOMELAB_STEP_OUTPUT`` when the caller gave one (:func:`~homelab_dagster.step_server.warm`).
"""

import gc
import os

gc.disable()

from homelab_dagster.step_server import OUTPUT_VAR  # noqa: E402 (a light module)

if _output := os.environ.get(OUTPUT_VAR):
    os.makedirs(os.path.dirname(_output) or ".", exist_ok=True)
    _fd = os.open(_output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(_fd, 1)
    os.dup2(_fd, 2)
    os.close(_fd)

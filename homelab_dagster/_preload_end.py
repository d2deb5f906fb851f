"""Imported only by the steps' fork server, last of :data:`~homelab_dagster.step_server.PRELOAD`.

- **Freezes what was preloaded** (``gc.freeze``), then turns the collector back on (it was off
  during the imports: :mod:`homelab_dagster._preload_begin`). The steps, forked from the server,
  never walk those objects in a collection: their collections stay small, and the pages the
  server loaded stay shared instead of being copied into each step (CPython's advice for
  servers that fork without exec).
- **Ends the server without the interpreter's teardown**
  (:func:`~homelab_dagster.shutdown.end_process`). The server ends when the process that
  started it does; it holds that process's stdout and stderr, so a reader of the run's output
  would otherwise wait while it frees everything it preloaded. Forked steps never run these
  hooks (a forked child ends with ``os._exit``).
"""

import atexit
import gc

from homelab_dagster.shutdown import end_process

gc.freeze()
gc.enable()
atexit.register(end_process, 0)

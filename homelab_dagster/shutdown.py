"""Ending a process that has loaded Dagster, without tearing the interpreter down.

An ordinary exit frees, object by object, everything the process imported and built: on two
cores, about 0.4 s of CPU for a process holding Dagster, the code location, Pulumi's SDKs and
the Kubernetes client. Whoever waits for the process (a shell, or a pipe such as ``tee`` that
waits for every holder of the output) waits for that too. :func:`end_process` flushes what
the process has to say and ends it at once.

Used where nothing is left to clean up: the ``homelab`` command, once its command has returned
(its Dagster instance is closed, its runs are over, the twin's processes are detached), and the
steps' fork server (:mod:`homelab_dagster._preload_end`). Never from library code: tests
call the CLI in their own process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import NoReturn

__all__ = ["end_process"]


def end_process(code: int = 0) -> NoReturn:
    """Flush logging, stdout and stderr, then end this process with ``code``."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # closed, or a broken pipe: nothing more to say
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)

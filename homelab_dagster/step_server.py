"""The process that Dagster's step processes fork from, warmed up early.

Stack steps run in processes of their own (one Pulumi program per process). Started fresh,
each would import Dagster, Pulumi and the Kubernetes client again: seconds of CPU apiece on
two cores. The ``up``, ``preview`` and ``teardown`` jobs therefore start steps with the
``forkserver`` method: one server imports :data:`PRELOAD` once, and every step is a fork of
it. :func:`warm` starts that server right away, so that its imports overlap with the
caller's own (the CLI calls it before it imports Dagster); the executor then finds it
running and uses it. Nothing here imports a heavy module.

The steps inherit the server's environment, the one of the process that started it: a
process that runs several jobs under different ``HOMELAB_*`` settings (a test session)
must run each in a process of its own.

The server and its steps write to the caller's stdout and stderr unless :func:`warm` is given a
file: the CLI gives one (``<state>/logs/steps.log``), so that what the steps print themselves
(Dagster's DEBUG line as each starts, what a crashing step says before it dies) never breaks
the progress display. What a step logs through Dagster is in the run's event log either way.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
from pathlib import Path

__all__ = ["OUTPUT_VAR", "PRELOAD", "warm"]

# Where the server sends its stdout and stderr, and so its steps' (read by _preload_begin).
OUTPUT_VAR = "HOMELAB_STEP_OUTPUT"

# The server is started by (and with the environment of) the process that runs the job, so
# the code location it preloads reads the run's settings. A name that fails to import is
# skipped by the server.
PRELOAD = [
    "homelab_dagster._preload_begin",  # no garbage collection while importing
    "dagster",
    "dagster._core.storage.sqlite_storage",  # the instance: sqlalchemy, alembic
    "kubernetes.client",
    "pulumi.automation",
    "pulumi_kubernetes.core.v1",
    "pulumi_kubernetes.rbac.v1",
    "pulumi_kubernetes.scheduling.v1",
    "homelab_dagster.definitions",  # the code location, loaded once for every step
    "homelab_dagster._preload_end",  # freeze the preloaded objects; end without teardown
]


def warm(output: Path | None = None) -> None:
    """Start the fork server with :data:`PRELOAD` (in the background; returns at once).

    ``output``: the file (appended to) that the server and its steps write their stdout and
    stderr to; None: this process's.
    """
    if output is not None:
        os.environ[OUTPUT_VAR] = str(output)
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()

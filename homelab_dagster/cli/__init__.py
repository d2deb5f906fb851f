"""The ``homelab`` command: validate and show the inventory, run the twin, materialise.

The top layer: it loads the code location (:mod:`homelab_dagster.definitions`) and runs its
jobs; nothing below imports it. Errors of the core
(:class:`~homelab_dagster.errors.HomelabError`) become a message on stderr and exit code 1;
usage errors exit 2 (typer's convention).
"""

from homelab_dagster.cli.app import app, main

__all__ = ["app", "main"]

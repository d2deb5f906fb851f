"""``homelab repair``: documented recoveries for what a fault left behind.

``homelab repair state <stack>`` restores a stack whose state file was damaged or deleted
from the newest readable copy Pulumi keeps in the file backend (its backups and history), as
:meth:`resources.pulumi.PulumiStacks.restore_state` does; the damaged file is kept beside it.
The error that sends a person here names the stack (``twin.cluster.forge``).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from homelab_dagster.cli.output import console, error_exit
from homelab_dagster.errors import HomelabError, StackError
from homelab_dagster.settings import Settings

__all__ = ["repair_app"]

repair_app = typer.Typer(
    help="Recover from a fault: restore what Pulumi's backups hold.", no_args_is_help=True
)


@repair_app.command("state")
def state(
    stack: Annotated[str, typer.Argument(help="The stack, e.g. twin.cluster.forge.")],
) -> None:
    """Restore STACK's damaged or deleted state from Pulumi's newest backup."""
    from resources.deployment import build_deployment
    from resources.pulumi import PulumiStacks

    try:
        settings = Settings.from_env()
        pulumi = build_deployment(settings, None).resources["pulumi"]
        assert isinstance(pulumi, PulumiStacks)
        if not stack.startswith(f"{pulumi.target}."):
            raise StackError(f"{stack} is not a stack of target {pulumi.target}")
        log = _ConsoleLog(logging.getLogger("homelab.repair"))
        source = pulumi.restore_state(stack, log)
    except HomelabError as exc:
        raise error_exit(exc) from exc
    console.print(f"[green]✓[/] restored the state of {stack} from {source}")
    console.print("  the next `homelab up` refreshes it against the cluster", highlight=False)


class _ConsoleLog(logging.LoggerAdapter):
    """What the restore logs, on the terminal too (what was kept, what was restored)."""

    def info(self, msg: object, *args: object, **kwargs: object) -> None:
        console.print(f"  {msg}", highlight=False, soft_wrap=True)

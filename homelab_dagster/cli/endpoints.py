"""``homelab rollback <endpoint> [VERSION]``: serve an earlier weights version.

It materialises ``vllm_endpoint/<endpoint>`` with the config ``serve_version``: VERSION (a
registered digest of the endpoint's model, or a unique prefix of 8+ characters), or, without
it, the version the endpoint served before the current one. The endpoint's checks run as for
any rollout, so a version that does not serve is not left serving. The weights store's
current version is unchanged: the next materialisation of the endpoint serves it again (to
keep an older version, roll back ``model_weights/<model>`` with its ``rollback_to`` config).
"""

from __future__ import annotations

from typing import Annotated

import typer

from homelab_dagster.cli.output import console, err_console, error_exit, exit_if_failed, load_for
from homelab_dagster.errors import HomelabError

__all__ = ["rollback"]


def rollback(
    endpoint: Annotated[str, typer.Argument(help="An endpoint of the inventory.")],
    version: Annotated[
        str | None,
        typer.Argument(help="A weights digest (8+ characters); default: the one served before."),
    ] = None,
) -> None:
    """Serve an earlier weights version on an endpoint (checked like any rollout)."""
    from assets._keys import endpoint_key
    from assets.endpoints import endpoint_op_name
    from homelab_dagster.cli import launch

    settings, inventory = load_for(None)
    if endpoint not in inventory.endpoints:
        known = ", ".join(inventory.endpoints) or "none"
        err_console.print(f"[bold red]error:[/] unknown endpoint {endpoint!r} (endpoints: {known})")
        raise typer.Exit(code=2)
    cluster = inventory.endpoints[endpoint].cluster
    what = version or "previous"
    console.print(f"target [bold]{settings.target.value}[/], {endpoint}: serving {what}")
    try:
        launch.start_world(settings, inventory, [cluster])
    except HomelabError as exc:
        raise error_exit(exc) from exc
    key = endpoint_key(endpoint)
    outcome = launch.materialize(
        [key],
        settings=settings,
        console=console,
        title=f"rolling back {endpoint}",
        ops_config={endpoint_op_name(endpoint): {"config": {"serve_version": what}}},
    )
    exit_if_failed(outcome, settings, f"rolling back {key.to_user_string()}")
    console.print(f"[green]✓[/] {key.to_user_string()} serves {what} (run {outcome.run_id})")

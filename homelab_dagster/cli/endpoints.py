"""``homelab rollback <endpoint> [VERSION]``: serve an earlier weights version; and what
``homelab up`` and ``rollback`` print about the endpoints a run served (:func:`print_serving`).

It materialises ``vllm_endpoint/<endpoint>`` with the config ``serve_version``: VERSION (a
registered digest of the endpoint's model, or a unique prefix of 8+ characters), or, without
it, the version the endpoint served before the current one. The endpoint's checks run as for
any rollout, so a version that does not serve is not left serving. The weights store's
current version is unchanged: the next materialisation of the endpoint serves it again (to
keep an older version, roll back ``model_weights/<model>`` with its ``rollback_to`` config).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Annotated

import typer

from homelab_dagster.cli.output import console, err_console, error_exit, exit_if_failed, load_for
from homelab_dagster.errors import HomelabError

if TYPE_CHECKING:
    import dagster as dg

    from homelab_dagster.inventory import Inventory
    from homelab_dagster.settings import Settings

__all__ = ["print_serving", "rollback"]

_MAX_SAMPLE = 60  # characters of the sample completion shown


def print_serving(
    run_id: str,
    settings: Settings,
    inventory: Inventory,
    instance: dg.DagsterInstance | None = None,
) -> None:
    """For each endpoint run ``run_id`` materialised: where it serves, which weights, a sample
    answer (the materialisation's metadata, docs/metadata.md), and how to reach it from here.
    ``instance``: the run's (default: ``$DAGSTER_HOME``'s, where the CLI's runs go)."""
    import dagster as dg

    from homelab_dagster.cli import launch
    from resources.deployment import build_deployment
    from resources.kubernetes import KubernetesClusters

    with contextlib.ExitStack() as stack:
        instance = instance or stack.enter_context(launch.open_instance())
        records = instance.get_records_for_run(
            run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
        ).records
    served = {}
    for record in records:
        materialization = record.asset_materialization
        if materialization is not None and materialization.asset_key.path[0] == "vllm_endpoint":
            meta = {k: v.value for k, v in materialization.metadata.items()}
            served[materialization.asset_key.path[-1]] = meta
    if not served:
        return
    kubernetes = build_deployment(settings, inventory).resources["kubernetes"]
    assert isinstance(kubernetes, KubernetesClusters)
    console.print("\n[bold]serving[/]")
    for name, meta in sorted(served.items()):
        endpoint = inventory.endpoints.get(name)
        if meta.get("skipped_reason"):  # an endpoint this deployment cannot serve (the twin)
            console.print(
                f"  [bold]{name}[/] [yellow]not served here[/]: {meta['skipped_reason']}",
                highlight=False,
                soft_wrap=True,
            )
            continue
        digest = str(meta.get("weights_digest", ""))[:12] or "no stored weights"
        where = f"on {meta.get('node') or '?'}" if meta.get("serving") else "[red]not serving[/]"
        sample = str(meta.get("sample_completion", ""))
        lines = [
            f"  [bold]{name}[/] {where}, weights {digest}",
            f"    url (in its cluster): {meta.get('url', '')}",
            f"    sample completion: {sample[:_MAX_SAMPLE]!r}" if sample else "",
        ]
        if endpoint is not None and meta.get("serving"):
            lines.append(
                f"    from here: kubectl --kubeconfig {kubernetes.kubeconfig} "
                f"--context {kubernetes.context(endpoint.cluster)} -n {endpoint.namespace} "
                f"port-forward svc/{name} 8000:8000, then http://127.0.0.1:8000/v1"
            )
        for line in filter(None, lines):  # long lines wrap, never cut
            console.print(line, highlight=False, soft_wrap=True)


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
    print_serving(outcome.run_id, settings, inventory)
    exit_if_failed(outcome, settings, f"rolling back {key.to_user_string()}")
    console.print(f"[green]✓[/] {key.to_user_string()} serves {what} (run {outcome.run_id})")

"""The ``homelab`` command: validate and show the inventory, run the twin, materialise.

Errors of the core (:class:`~homelab_dagster.errors.HomelabError`) become a message on
stderr and exit code 1; usage errors exit 2 (typer's convention).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from homelab_dagster._output import console, exit_if_failed, fail, load_for
from homelab_dagster.cli_stacks import down, preview
from homelab_dagster.cli_twin import start_twin, twin_app
from homelab_dagster.errors import HomelabError
from homelab_dagster.inventory import Inventory
from homelab_dagster.loader import load_inventory
from homelab_dagster.settings import Settings, Target
from homelab_dagster.shutdown import end_process

__all__ = ["app", "main"]

app = typer.Typer(
    name="homelab",
    help="The homelab as one Dagster asset graph: inventory, twin, clusters, training, serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(twin_app, name="twin")
app.command()(preview)
app.command()(down)
InventoryArg = Annotated[
    Path | None,
    typer.Argument(help="Inventory file (default: $HOMELAB_INVENTORY or ./homelab.yaml)."),
]


def _inventory_path(file: Path | None) -> Path:
    if file is not None:
        return file
    try:
        return Settings.from_env().inventory_path
    except HomelabError as exc:
        raise fail(exc) from exc


def summary_table(inventory: Inventory) -> Table:
    """One row per cluster: distribution, nodes, GPUs, networks, links."""
    table = Table(title=f"{inventory.name}: {_counts_line(inventory)}", title_justify="left")
    for column in ("cluster", "kind", "k8s", "nodes", "GPUs", "pods", "services", "links to"):
        table.add_column(column, justify="right" if column in {"nodes", "GPUs"} else "left")
    for name, cluster in inventory.clusters.items():
        links = ", ".join(lk.target for lk in inventory.mesh.links if lk.source == name)
        gpus = cluster.gpu_total()
        table.add_row(
            name,
            cluster.distribution.value,
            cluster.kubernetes_version,
            str(len(cluster.expanded_nodes())),
            str(gpus) if gpus else "-",
            str(cluster.network.pod_cidr),
            str(cluster.network.service_cidr),
            links or "-",
        )
    return table


def _counts_line(inventory: Inventory) -> str:
    c = inventory.counts()
    return (
        f"{c['clusters']} clusters, {c['nodes']} nodes, {c['gpus']} GPUs, "
        f"{c['mesh_links']} mesh links, {c['models']} models, "
        f"{c['training_runs']} training runs, {c['endpoints']} endpoints"
    )


def _models_table(inventory: Inventory) -> Table:
    table = Table(title="models", title_justify="left")
    for column in ("model", "source", "base", "size", "trained by", "served by"):
        table.add_column(column)
    for name, model in inventory.models.items():
        runs = [r for r, run in inventory.training_runs.items() if run.model == name]
        served = [
            f"{e} (tp={ep.tensor_parallel_size})"
            for e, ep in inventory.endpoints.items()
            if ep.model == name
        ]
        table.add_row(
            name,
            model.source,
            model.base_model or "-",
            model.parameters or "-",
            ", ".join(runs) or "-",
            ", ".join(served) or "-",
        )
    return table


@app.command()
def validate(file: InventoryArg = None) -> None:
    """Check the inventory; print a summary, or every problem with its line and field."""
    path = _inventory_path(file)
    try:
        loaded = load_inventory(path)
    except HomelabError as exc:
        raise fail(exc) from exc
    console.print(f"[green]✓[/] {path} is valid (sha256 {loaded.digest[:12]})")
    console.print(summary_table(loaded.inventory))


@app.command()
def show(file: InventoryArg = None) -> None:
    """Show the homelab: clusters, nodes, GPUs, networks, links and models."""
    path = _inventory_path(file)
    try:
        inventory = load_inventory(path).inventory
    except HomelabError as exc:
        raise fail(exc) from exc
    console.print(summary_table(inventory))
    console.print(_models_table(inventory))


def main() -> None:
    """The ``homelab`` command (and ``python -m homelab_dagster``): runs ``app``, then ends the
    process without the interpreter's teardown (:mod:`homelab_dagster.shutdown`)."""
    try:
        app()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    if isinstance(code, str):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    end_process(code or 0)


@app.command()
def up(
    env: Annotated[
        str | None,
        typer.Option("--env", "-e", help="One cluster (and its mesh links); default: all."),
    ] = None,
) -> None:
    """Materialise the homelab (or one cluster) on the target, with progress."""
    from homelab_dagster import step_server

    settings, inventory = load_for(env)
    step_server.warm(settings.steps_log)  # the steps' fork server imports while we do
    from homelab_dagster import launch

    plan = launch.plan_selection(inventory, env)
    console.print(f"target [bold]{settings.target.value}[/], inventory {settings.inventory_path}")
    if settings.target is Target.TWIN:
        try:
            start_twin(plan.clusters)
        except HomelabError as exc:
            raise fail(exc) from exc
    for key in plan.pending:
        console.print(f"  [dim]skipped {key.to_user_string()}: not built yet[/]")
    outcome = launch.materialize(plan.selected, settings=settings, console=console)
    names = ", ".join(k.to_user_string() for k in plan.selected)
    exit_if_failed(outcome, settings, f"materialising {names}")
    console.print(f"[green]✓[/] materialised {names} (run {outcome.run_id})")
    console.print("  see them in the UI: make dev, then http://127.0.0.1:3000")


@app.command()
def dev(
    port: Annotated[int, typer.Option(help="The UI's port on 127.0.0.1.")] = 3000,
) -> None:
    """The Dagster UI and daemon for this homelab (the instance `homelab up` records into)."""
    import os
    import sys

    from homelab_dagster import launch

    home = launch.ensure_dagster_home(Settings.from_env())
    console.print(f"DAGSTER_HOME={home}; the UI will be on http://127.0.0.1:{port}")
    args = ["dagster", "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
    os.execv(sys.executable, [sys.executable, "-m", *args])

"""The ``homelab`` command's verbs: ``validate``, ``show``, ``up``, ``preview``, ``plan``,
``down``, ``dev`` and ``twin``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from homelab_dagster.cli.endpoints import print_serving, rollback
from homelab_dagster.cli.output import console, error_exit, exit_if_failed, load_for
from homelab_dagster.cli.plan import plan
from homelab_dagster.cli.reconcile import reconcile
from homelab_dagster.cli.repair import repair_app
from homelab_dagster.cli.stacks import down, preview
from homelab_dagster.cli.status import status
from homelab_dagster.cli.twin import twin_app
from homelab_dagster.errors import HomelabError
from homelab_dagster.inventory import Inventory
from homelab_dagster.loader import load_inventory
from homelab_dagster.settings import Settings

__all__ = ["app", "main"]

app = typer.Typer(
    name="homelab",
    help="The homelab as one Dagster asset graph: inventory, twin, clusters, training, serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(twin_app, name="twin")
app.add_typer(repair_app, name="repair")
app.command()(preview)
app.command()(down)
app.command()(plan)
app.command()(rollback)
app.command()(reconcile)
app.command()(status)
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
        raise error_exit(exc) from exc


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
        raise error_exit(exc) from exc
    console.print(f"[green]✓[/] {path} is valid (sha256 {loaded.digest[:12]})")
    console.print(summary_table(loaded.inventory))


@app.command()
def show(file: InventoryArg = None) -> None:
    """Show the homelab: clusters, nodes, GPUs, networks, links and models."""
    path = _inventory_path(file)
    try:
        inventory = load_inventory(path).inventory
    except HomelabError as exc:
        raise error_exit(exc) from exc
    console.print(summary_table(inventory))
    console.print(_models_table(inventory))


def main() -> None:
    """The ``homelab`` command (and ``python -m homelab_dagster``).

    A core error that a command did not turn into its own message (e.g. Dagster's storage
    unreachable while opening the instance) is printed the same way: no traceback, exit 1.
    """
    try:
        app()
    except HomelabError as exc:
        error_exit(exc)
        raise SystemExit(1) from None


@app.command()
def up(
    env: Annotated[
        str | None,
        typer.Option("--env", "-e", help="One cluster (and its mesh links); default: all."),
    ] = None,
) -> None:
    """Materialise the homelab (or one cluster) on the target, with progress."""
    from homelab_dagster.cli import launch

    settings, inventory = load_for(env)
    plan = launch.plan_selection(inventory, env)
    console.print(f"target [bold]{settings.target.value}[/], inventory {settings.inventory_path}")
    try:
        launch.start_world(settings, inventory, plan.clusters)
    except HomelabError as exc:
        raise error_exit(exc) from exc
    for key in plan.pending:
        console.print(f"  [dim]skipped {key.to_user_string()}: not built yet[/]")
    outcome = launch.materialize(plan.selected, settings=settings, console=console)
    print_serving(outcome.run_id, settings, inventory)
    names = ", ".join(k.to_user_string() for k in plan.selected)
    exit_if_failed(outcome, settings, f"materialising {names}")
    console.print(f"[green]✓[/] materialised {names} (run {outcome.run_id})")
    console.print("  see them in the UI: make dev, then http://127.0.0.1:3000")


@app.command()
def dev(
    port: Annotated[int, typer.Option(help="The UI's port.")] = 3000,
    host: Annotated[
        str,
        typer.Option(
            help="The address the UI listens on. Dagster's open-source UI has no "
            "authentication: keep 127.0.0.1 unless an authenticating proxy is in front "
            "(docs/reliability.md, 'Who can reach the UI')."
        ),
    ] = "127.0.0.1",
) -> None:
    """The Dagster UI and daemon for this homelab (the instance `homelab up` records into).

    Runs `dg dev` (Dagster's current tooling) on the project's `[tool.dg]` code location.
    Ctrl-C or SIGTERM stops the webserver, the daemon and their code servers.
    """
    import os
    import sys

    from homelab_dagster.cli import launch
    from homelab_dagster.settings import project_root

    try:
        settings = Settings.from_env()
    except HomelabError as exc:
        raise error_exit(exc) from exc
    home = launch.ensure_dagster_home(settings)
    storage = "PostgreSQL" if settings.dagster_postgres else "SQLite"
    console.print(f"DAGSTER_HOME={home} ({storage}); the UI will be on http://{host}:{port}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(
            f"[yellow]warning:[/] the UI listens on {host} and has no authentication: anyone "
            "who can reach it can launch and terminate runs (docs/reliability.md, 'Who can "
            "reach the UI')"
        )
    # dg compares the active environment with the project's .venv and warns when they differ.
    os.environ.setdefault("VIRTUAL_ENV", sys.prefix)
    args = ["-m", "dagster_dg_cli.cli", "dev", "--host", host, "--port", str(port)]
    raise typer.Exit(_serve([sys.executable, *args], cwd=project_root()))


def _serve(command: list[str], cwd: Path, grace_s: float = 5.0) -> int:
    """Run ``command`` (`dg dev`) in a process group of its own until it ends; Ctrl-C and
    SIGTERM here become one SIGINT to it (Dagster's signal to stop its services; a second
    one kills the group). When it has ended, what is left of its group (code servers that
    outlive it until their heartbeat times out) gets SIGTERM, then SIGKILL after
    ``grace_s``. Its exit status."""
    import os
    import signal
    import subprocess
    import time

    stops = 0
    children: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, frame: object) -> None:
        nonlocal stops
        stops += 1
        with contextlib.suppress(ProcessLookupError):
            for child in children:
                if stops == 1:
                    child.send_signal(signal.SIGINT)
                else:
                    os.killpg(child.pid, signal.SIGKILL)

    # Handlers first: a signal caught here (not ignored) is a default one in the child,
    # which then installs Dagster's own, even where this process inherited SIGINT ignored.
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        child = subprocess.Popen(command, cwd=cwd, start_new_session=True)
        children.append(child)
        if stops:
            child.send_signal(signal.SIGINT)
        status = child.wait()
        deadline = time.monotonic() + grace_s
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, sig)
                while time.monotonic() < deadline:
                    os.killpg(child.pid, 0)  # ProcessLookupError: the group is empty
                    time.sleep(0.1)
        # Stopped on request: a clean exit, as `dg dev` reports one.
        return 0 if stops and status in (0, -signal.SIGINT, 130) else status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

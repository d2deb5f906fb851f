"""``homelab twin up|down|status|env|images``: the twin, by hand."""

from __future__ import annotations

import shlex
from typing import Annotated

import typer
from rich.table import Table

from homelab_dagster.cli.output import console, err_console, error_exit
from homelab_dagster.errors import HomelabError
from homelab_dagster.images import IMAGES
from homelab_dagster.loader import load_inventory
from homelab_dagster.settings import Settings
from homelab_dagster.twin import Twin
from homelab_dagster.twin_real import RealNodeStatus

__all__ = ["open_twin", "start_twin", "twin_app"]

twin_app = typer.Typer(help="The twin: real local control planes with simulated nodes.")

ClustersArg = Annotated[
    list[str] | None, typer.Argument(help="Clusters (default: every cluster of the inventory).")
]


def open_twin(*, build: bool = True) -> Twin:
    """The twin of the configured inventory, with its toolchain (built if missing)."""
    from infra.toolchain import ensure_toolchain

    settings = Settings.from_env()
    inventory = load_inventory(settings.inventory_path).inventory
    toolchain = ensure_toolchain(build=build, console=err_console)
    return Twin(inventory, settings.state_dir, toolchain, api_port_base=settings.twin_port_base)


def start_twin(clusters: list[str] | None) -> Twin:
    """Bring up ``clusters`` of the twin (all when None), printing each step."""
    twin = open_twin()
    with console.status("starting the twin") as status:

        def report(cluster: str, message: str) -> None:
            status.update(f"{cluster}: {message}")
            console.print(f"  twin {cluster}: {message}", highlight=False)

        twin.up(clusters, progress=report)
    return twin


@twin_app.command("up")
def twin_up(clusters: ClustersArg = None) -> None:
    """Start the twin (idempotent: running clusters are kept, crashed ones restarted)."""
    try:
        twin = start_twin(clusters)
    except HomelabError as exc:
        raise error_exit(exc) from exc
    console.print(_status_table(twin))
    console.print(_registry_line(twin), highlight=False)
    console.print(f'kubeconfig: {twin.kubeconfig}  (eval "$(homelab twin env)")')


@twin_app.command("down")
def twin_down(
    clusters: ClustersArg = None,
    purge: Annotated[bool, typer.Option(help="Delete the clusters and their data.")] = False,
) -> None:
    """Stop the twin's clusters (and nothing else)."""
    twin = _open_or_exit()
    try:
        stopped = twin.down(clusters, purge=purge)
    except HomelabError as exc:
        raise error_exit(exc) from exc
    verb = "deleted" if purge else "stopped"
    console.print(f"{verb}: {', '.join(stopped) or 'nothing was running'}")


@twin_app.command("status")
def twin_status() -> None:
    """Each cluster's API server, nodes, GPU capacity and health; the image registry."""
    twin = _open_or_exit()
    console.print(_status_table(twin))
    console.print(_registry_line(twin), highlight=False)


@twin_app.command("images")
def twin_images(
    names: Annotated[
        list[str] | None,
        typer.Argument(help=f"Images (default: every one: {', '.join(IMAGES)})."),
    ] = None,
) -> None:
    """Build the images from their lock files and push them to the twin's registry.

    Cached by content: an unchanged lock file (and sources) costs no build and no push.
    """
    from infra.images import ImageBuilder

    twin = _open_or_exit()
    try:
        with console.status("images") as status:

            def report(name: str, message: str) -> None:
                status.update(f"{name}: {message}")
                console.print(f"  image {name}: {message}", highlight=False)

            report("registry", twin.registry.up())
            builder = ImageBuilder(progress=report)
            results = builder.build_and_push(names or list(IMAGES), twin.registry)
    except HomelabError as exc:
        raise error_exit(exc) from exc
    table = Table(title=f"images (registry {twin.registry.address})", title_justify="left")
    for column in ("image", "reference", "build", "push", "size", "digest"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.name,
            r.reference,
            f"built in {r.seconds:.0f} s" if r.built else "cached",
            "pushed" if r.pushed else "in the registry",
            f"{r.size / 2**20:.0f} MiB",
            r.digest.removeprefix("sha256:")[:12],
        )
    console.print(table)


@twin_app.command("env")
def twin_env() -> None:
    """`export` lines for a shell: eval "$(homelab twin env)", then kubectl and pulumi work."""
    twin = _open_or_exit()
    for key, value in sorted(twin.env().items()):
        print(f"export {key}={shlex.quote(value)}")


def _open_or_exit() -> Twin:
    """The twin, without building tools; a core error becomes a message and exit 1."""
    try:
        return open_twin(build=False)
    except HomelabError as exc:
        raise error_exit(exc) from exc


def _registry_line(twin: Twin) -> str:
    r = twin.registry_status()
    state = "[green]up[/]" if r.answering else f"[dim]{r.message}[/]"
    return f"registry: {r.address} {state}  (homelab twin images builds and pushes the images)"


def _status_table(twin: Twin) -> Table:
    table = Table(title="twin", title_justify="left")
    for column in ("cluster", "context", "API server", "health", "nodes", "GPUs", "real nodes"):
        table.add_column(column)
    for s in twin.status():
        health = "[green]up[/]" if s.running and not s.message else f"[red]{s.message}[/]"
        table.add_row(
            s.name,
            s.context,
            s.server,
            health,
            f"{s.ready_nodes}/{s.nodes}",
            str(s.gpus),
            "\n".join(_real_node(r) for r in s.real) or "-",
        )
    return table


def _real_node(node: RealNodeStatus) -> str:
    """A real node in one line: its name, kubelet version and GPUs, or what is down."""
    if not node.running:
        down = [
            p for p, up in (("containerd", node.containerd), ("kubelet", node.kubelet)) if not up
        ]
        return f"{node.name} [red]({' and '.join(down)} down: homelab twin up)[/]"
    state = "Ready" if node.ready else "[yellow]not Ready[/]"
    return f"{node.name} ({node.kubelet_version}, {node.gpus} GPUs, {state})"

"""``homelab twin up|down|status|env|images``: the twin, by hand."""

from __future__ import annotations

import shlex
import time
from typing import Annotated

import typer
from rich.status import Status
from rich.table import Table

from homelab_dagster.cli.output import console, err_console, error_exit
from homelab_dagster.errors import HomelabError, ImageMissingError
from homelab_dagster.images import IMAGES, registry_path
from homelab_dagster.loader import load_inventory
from homelab_dagster.settings import Settings
from homelab_dagster.twin import Progress, Twin
from homelab_dagster.twin_real import RealNodeStatus

__all__ = ["ensure_images", "open_twin", "start_twin", "twin_app"]

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
    """Bring up ``clusters`` of the twin (all when None), then the images their pods pull,
    printing each step."""
    twin = open_twin()
    with console.status("starting the twin") as status:
        twin.up(clusters, progress=_printer(status, "twin"))
        ensure_images(twin, clusters, _printer(status, "image"))
    return twin


def _printer(status: Status, kind: str) -> Progress:
    """Progress of ``kind`` (``twin <cluster>: ...``, ``image <name>: ...``): a line each,
    the last one on the spinner."""

    def report(name: str, message: str) -> None:
        status.update(f"{name}: {message}")
        console.print(f"  {kind} {name}: {message}", highlight=False)

    return report


def ensure_images(twin: Twin, clusters: list[str] | None, report: Progress) -> None:
    """Where real nodes run, every image the inventory's pods pull on ``clusters`` is in the
    twin's registry: built from its lock file (cached by content: an unchanged one costs a
    hash) and pushed (skipped when the registry has that manifest: one ``HEAD``).

    An image no lock file here builds (``HOMELAB_IMAGE``) is only looked for. Where images
    cannot be built (no root, ``make system-deps`` not run) the twin still comes up, and the
    step that needs a missing image fails at once, naming it and the command.

    Raises:
        ImageBuildError: a build or push failed; the message names the image and its log.
    """
    from infra.images import ImageBuilder, missing_tools
    from resources.deployment import build_deployment

    start = time.monotonic()
    names = list(twin.inventory.clusters) if clusters is None else clusters
    real = [c for c in names if twin.real_nodes(c)] if twin.real_fallback is None else []
    if not real:  # KWOK nodes pull nothing; the registry runs only beside real nodes
        return
    deployment = build_deployment(Settings.from_env(), twin.inventory)
    wanted = deployment.pulled_images(twin.inventory, real)
    by_reference = {spec.reference: name for name, spec in IMAGES.items()}
    for reference in (r for r in wanted if r not in by_reference):
        try:
            twin.registry.require(reference)
            report(reference, "in the registry")
        except ImageMissingError as exc:
            report(reference, str(exc))
    buildable = [by_reference[r] for r in wanted if r in by_reference]
    why = missing_tools()
    if why:
        missing = [n for n in buildable if _absent(twin, n)]
        if missing:
            report(", ".join(missing), f"not in the registry, and not built here: {why}")
        return
    results = ImageBuilder(progress=report).build_and_push(buildable, twin.registry)
    pushed = [r.name for r in results if r.pushed]
    report(
        ", ".join(r.name for r in results),
        f"in the registry ({', '.join(pushed) or 'nothing'} pushed) "
        f"in {time.monotonic() - start:.2f} s",
    )


def _absent(twin: Twin, name: str) -> bool:
    try:
        twin.registry.require(IMAGES[name].reference)
    except ImageMissingError:
        return True
    return False


@twin_app.command("up")
def twin_up(clusters: ClustersArg = None) -> None:
    """Start the twin (idempotent: running clusters are kept, crashed ones restarted), and
    put the images its real nodes' pods pull in its registry (built from their lock files)."""
    try:
        twin = start_twin(clusters)
        console.print(_status_table(twin))
        console.print(_registry(twin), highlight=False)
        console.print(_store(twin), highlight=False)
    except HomelabError as exc:
        raise error_exit(exc) from exc
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
    """Each cluster's API server, nodes, GPU capacity and health; the registry's images; the
    object store's addresses and buckets."""
    twin = _open_or_exit()
    console.print(_status_table(twin))
    try:
        console.print(_registry(twin), highlight=False)
        console.print(_store(twin), highlight=False)
    except HomelabError as exc:
        raise error_exit(exc) from exc


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
            report = _printer(status, "image")
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
            _short(r.digest),
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


def _registry(twin: Twin) -> Table | str:
    """The registry's images, their digests and whether they are what their lock files build
    here; or one line where the registry does not answer."""
    from infra.images import ImageBuilder

    r = twin.registry_status()
    if not r.answering:
        return (
            f"registry: {r.address} [dim]{r.message}[/]  (homelab twin up starts it where "
            "real nodes run, with the images they pull)"
        )
    held = twin.registry.images()
    builder = ImageBuilder()
    table = Table(title=f"registry {r.address}", title_justify="left")
    for column in ("image", "reference", "digest", "lock file"):
        table.add_column(column)
    for name, spec in IMAGES.items():
        digest = held.pop(registry_path(spec.reference), None)
        current = builder.current(spec)
        fix = f"  (homelab twin images {name})"
        if digest is None:
            state = f"[red]missing[/]{fix}"
        elif digest == current:
            state = "[green]matches[/]"
        elif current is None:
            state = f"[yellow]not built here from its current lock file and sources[/]{fix}"
        else:
            state = f"[yellow]stale: its lock file or sources changed[/]{fix}"
        table.add_row(name, spec.reference, _short(digest) if digest else "-", state)
    for reference, digest in sorted(held.items()):
        table.add_row("-", reference, _short(digest), "[dim]no lock file here[/]")
    return table


def _store(twin: Twin) -> str:
    """The object store in one line: where it listens, its buckets, or what is wrong (never
    its keys: only the file that holds them)."""
    s = twin.store_status()
    if not s.answering:
        return f"object store: {s.address} [red]{s.message}[/]  (homelab twin up starts it)"
    pods = f", for pods {s.pod_address}" if s.pod_address else ""
    buckets = ", ".join(s.buckets) or "no bucket yet (the first weights create it)"
    return (
        f"object store: {s.address}{pods} [green]up[/]; buckets: {buckets}; "
        f"keys: {twin.store.credentials}"
    )


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


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

"""``homelab plan [REV]``: before a change is merged, the assets it would materialise and why.

The change is the diff between ``REV``'s merge base with ``HEAD`` and the working tree (or
``HEAD`` with ``--head``), mapped to assets by the same function the Git sensor applies
(:func:`homelab_dagster.changes.affected`). The downstream assets come from the code
location's asset graph: what would follow once the selected ones are materialised.
``--preview`` also runs Pulumi's preview of each selected stack (the ``preview`` job's ops of
those stacks, in parallel, after starting the twin's clusters they touch): what each would
change, resource by resource.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from homelab_dagster.changes import Impact, affected
from homelab_dagster.cli.output import console, err_console, error_exit
from homelab_dagster.errors import HomelabError, InventoryError
from homelab_dagster.inventory import Inventory
from homelab_dagster.loader import parse_inventory
from homelab_dagster.settings import Settings

__all__ = ["plan"]


def plan(
    rev: Annotated[
        str | None,
        typer.Argument(help="Compare with this revision (default: the upstream, else HEAD~1)."),
    ] = None,
    head: Annotated[
        bool, typer.Option("--head", help="Plan HEAD, not the working tree's changes.")
    ] = False,
    preview: Annotated[
        bool,
        typer.Option("--preview", help="Also run Pulumi's preview of each selected stack."),
    ] = False,
) -> None:
    """The assets a change would materialise (with why), and what would follow them."""
    try:
        settings = Settings.from_env()
        here = settings.inventory_path.parent
        top = Path(_git(here, "rev-parse", "--show-toplevel"))
        file = settings.inventory_path.resolve().relative_to(top.resolve()).as_posix()
        rev = rev or _upstream(here) or "HEAD~1"
        base = _git(here, "merge-base", rev, "HEAD")
        if head:
            paths = _git(here, "diff", "--name-only", "--no-renames", "-z", base, "HEAD")
            new_text = _git(here, "show", f"HEAD:{file}")
        else:
            paths = _git(here, "diff", "--name-only", "--no-renames", "-z", base)
            paths += "\0" + _git(here, "ls-files", "--others", "--exclude-standard", "-z")
            new_text = settings.inventory_path.read_text(encoding="utf-8")
        new = parse_inventory(new_text, f"{file} ({'HEAD' if head else 'working tree'})")
        old_text = _git(here, "show", f"{base}:{file}", ok=(0, 128))
        old = _old_inventory(old_text, f"{file}@{base[:12]}")
    except (HomelabError, OSError, ValueError) as exc:
        if isinstance(exc, HomelabError):
            raise error_exit(exc) from exc
        raise error_exit(HomelabError(str(exc))) from exc
    impact = affected(old, new, [p for p in paths.split("\0") if p], inventory_file=file)
    against = f"{rev} (merge base {base[:12]})"
    console.print(f"plan: {'HEAD' if head else 'the working tree'} against {against}")
    _print(impact, preview)
    if preview:
        _previews(impact)


def _git(checkout: Path, *args: str, ok: tuple[int, ...] = (0,)) -> str:
    """``git <args>``'s output in ``checkout`` ("" when it exits with another code of ``ok``)."""
    from resources.git import run_git

    done = run_git(args, cwd=checkout, ok_codes=ok)
    return done.stdout.decode().strip() if done.returncode == 0 else ""


def _upstream(checkout: Path) -> str:
    """The current branch's upstream, or "" without one."""
    args = ("rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{upstream}")
    return _git(checkout, *args, ok=(0, 128))


def _old_inventory(text: str, name: str) -> Inventory | None:
    if not text:
        err_console.print(f"[yellow]no {name}[/]: every entry counts as added")
        return None
    try:
        return parse_inventory(text, name)
    except InventoryError as exc:
        err_console.print(
            f"[yellow]{name} is not valid[/] ({len(exc.problems)} problems): "
            "every entry counts as added"
        )
        return None


def _print(impact: Impact, previewed: bool) -> None:
    from dagster import AssetSelection

    from homelab_dagster.definitions import defs
    from sensors.git import asset_key

    if not impact.selections:
        console.print("nothing to materialise")
    else:
        table = Table(title="would materialise", title_justify="left")
        table.add_column("asset")
        table.add_column("why")
        for asset, reasons in impact.reasons().items():
            table.add_row(str(asset), "\n".join(reasons))
        console.print(table)
    for note in impact.notes:
        console.print(f"  [dim]{note}[/]", highlight=False)
    graph = defs.resolve_asset_graph()
    keys = [asset_key(a) for a in impact.assets]
    unknown = [k.to_user_string() for k in keys if not graph.has(k)]
    if unknown:
        console.print(f"  [yellow]not in the code location yet[/]: {', '.join(unknown)}")
    known = [k for k in keys if graph.has(k)]
    downstream = AssetSelection.assets(*known).downstream(include_self=False).resolve(graph)
    follow = sorted(k.to_user_string() for k in downstream - set(known))
    if follow:
        console.print(f"then downstream (by the graph's automation): {', '.join(follow)}")
    if not previewed:
        console.print("  [dim]Pulumi's previews: homelab plan --preview[/]")


def _previews(impact: Impact) -> None:
    """Pulumi's preview of each selected stack (the ``preview`` job's ops), then each plan."""
    import dagster as dg

    from assets.jobs import preview_op_name, previewed_stacks
    from homelab_dagster.cli import launch
    from homelab_dagster.cli.output import exit_if_failed, load_for, print_preview
    from sensors.git import asset_key

    settings, inventory = load_for(None)
    stacks = previewed_stacks(inventory)
    chosen = [k for k in (asset_key(a) for a in impact.assets) if k in stacks]
    if not chosen:
        console.print("no stack to preview")
        return
    touched = sorted({c for key in chosen for c in stacks[key]})
    try:
        launch.start_world(settings, inventory, touched)
    except HomelabError as exc:
        raise error_exit(exc) from exc
    outcome = launch.materialize(
        None,
        settings=settings,
        console=console,
        job="preview",
        op_selection=[preview_op_name(key) for key in chosen],
        title="previewing",
    )
    exit_if_failed(outcome, settings, "previewing")
    with launch.open_instance() as instance:
        records = instance.get_records_for_run(
            outcome.run_id, of_type=dg.DagsterEventType.ASSET_OBSERVATION
        ).records
    for record in records:
        event = record.event_log_entry.dagster_event
        observation = event.asset_observation_data.asset_observation if event else None
        if observation is not None:
            print_preview(observation)

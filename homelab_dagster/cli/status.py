"""``homelab status [--json]``: the homelab at a glance, from the Dagster instance.

Per asset: its last materialisation (when, which run, the commit it came from), its checks
as last evaluated, whether it drifted (its ``no_drift`` check), and whether it is stalled
(its failure record, ``sensors/failures.py``). Per cluster: a readiness figure, the share of
its checks and of its outgoing links' checks that pass now
(:func:`homelab_dagster.reconcile.readiness`): measured, where the owner's README kept
hand-written percentages.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from homelab_dagster.cli.output import console, error_exit
from homelab_dagster.errors import HomelabError
from homelab_dagster.reconcile import readiness
from homelab_dagster.settings import Settings

if TYPE_CHECKING:
    import dagster as dg

__all__ = ["collect", "status"]


def status(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document, for tools.")] = False,
) -> None:
    """Each asset's last materialisation, checks, drift, stalled state and commit; each
    cluster's readiness from its live checks."""

    from homelab_dagster.cli.launch import ensure_dagster_home, open_instance

    try:
        settings = Settings.from_env()
    except HomelabError as exc:
        raise error_exit(exc) from exc
    ensure_dagster_home(settings)
    from homelab_dagster.definitions import defs

    with open_instance() as instance:
        report = collect(instance, defs)
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    _print(report)


def collect(instance: dg.DagsterInstance, defs: dg.Definitions) -> dict[str, Any]:
    """The status of every asset of ``defs`` and the readiness of every cluster, as plain data."""
    from assets._stack import DRIFT_CHECK
    from sensors.failures import repair_record

    graph = defs.resolve_asset_graph()
    assets: dict[str, dict[str, Any]] = {}
    for key in sorted(graph.get_all_asset_keys()):
        node = graph.get(key)
        event = instance.get_latest_materialization_event(key)
        materialization = event.asset_materialization if event else None
        commit = None
        if materialization is not None:
            found = materialization.metadata.get("homelab_commit")
            commit = str(found.value) if found is not None else None
        checks = {check.name: _check(instance, check) for check in sorted(node.check_keys, key=str)}
        record = repair_record(instance, key)
        drift = checks.get(DRIFT_CHECK)
        assets[key.to_user_string()] = {
            "materialized_at": _when(event.timestamp) if event else None,
            "run_id": event.run_id if event else None,
            "commit": commit,
            "checks": checks,
            "drifted": None if drift is None or drift["passed"] is None else not drift["passed"],
            "stalled": bool(record and record.stalled),
            "failures": record.failures if record else 0,
            "last_failure": record.reason if record else None,
        }
    return {"assets": assets, "readiness": _readiness(assets)}


def _check(instance: dg.DagsterInstance, key: dg.AssetCheckKey) -> dict[str, Any]:
    """The check's last evaluation: passed (None: never evaluated), its words, when."""
    import dagster as dg

    record = instance.get_latest_asset_check_evaluation_record(key)
    evaluation = None
    if record is not None and record.event is not None and record.event.dagster_event:
        data = record.event.dagster_event.event_specific_data
        evaluation = data if isinstance(data, dg.AssetCheckEvaluation) else None
    if evaluation is None:
        return {"passed": None, "description": None, "evaluated_at": None}
    assert record is not None and record.event is not None
    return {
        "passed": evaluation.passed,
        "description": evaluation.description,
        "evaluated_at": _when(record.event.timestamp),
    }


def _readiness(assets: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per cluster: the share of its checks, and of its outgoing links', passing now."""
    clusters = [name.split("/", 1)[1] for name in assets if name.startswith("cluster/")]
    figures = {}
    for cluster in clusters:
        results: dict[str, bool | None] = {}
        for name, asset in assets.items():
            own = name == f"cluster/{cluster}"
            outgoing = name.startswith(f"mesh_link/{cluster}__")
            if own or outgoing:
                results |= {f"{name}:{c}": v["passed"] for c, v in asset["checks"].items()}
        figures[cluster] = round(readiness(results), 3)
    return figures


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _print(report: dict[str, Any]) -> None:
    table = Table(title="assets", title_justify="left")
    for column in ("asset", "materialised", "commit", "checks", "drift", "state"):
        table.add_column(column)
    for name, asset in report["assets"].items():
        checks = asset["checks"]
        passing = sum(1 for c in checks.values() if c["passed"])
        drift = {None: "-", True: "[red]drifted[/]", False: "none"}[asset["drifted"]]
        if asset["stalled"]:
            state = f"[red]stalled[/]: {asset['last_failure']}"
        elif asset["failures"]:
            state = f"[yellow]{asset['failures']} failure(s)[/]: {asset['last_failure']}"
        else:
            state = "ok" if asset["materialized_at"] else "[dim]never materialised[/]"
        table.add_row(
            name,
            asset["materialized_at"] or "-",
            (asset["commit"] or "-")[:12],
            f"{passing}/{len(checks)}" if checks else "-",
            drift,
            state,
        )
    console.print(table)
    ready = Table(title="readiness (checks passing now)", title_justify="left")
    ready.add_column("cluster")
    ready.add_column("ready", justify="right")
    for cluster, figure in report["readiness"].items():
        ready.add_row(cluster, f"{figure:.0%}")
    console.print(ready)

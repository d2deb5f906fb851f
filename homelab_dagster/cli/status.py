"""``homelab status [--json]``: the homelab at a glance, from the Dagster instance.

Per asset: its last materialisation (when, which run, the commit it came from), its checks
as last evaluated and how long ago, whether it drifted (its ``no_drift`` check), and whether
it is stalled (its failure record, ``sensors/failures.py``). A check result older than
``--stale-after`` (an hour) is unknown, not passing, and so is a skipped one (an endpoint whose
weights this deployment cannot fetch). Per cluster: a readiness figure, the share of the
checks that pass now among its own, its outgoing links' and those of the training runs and
endpoints on it (:func:`homelab_dagster.reconcile.readiness`), with every check short of 100%
named: measured, where the owner's README kept hand-written percentages. GPU-hours per
model, endpoint and cluster, this calendar month (UTC) and all time: the training runs'
``gpu_seconds``, the endpoints' ``gpu_seconds_served`` and what each endpoint's current
deployment has held since it was materialised (:func:`gpu_hours`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from homelab_dagster.checks import duration
from homelab_dagster.cli.output import console, error_exit
from homelab_dagster.errors import HomelabError
from homelab_dagster.reconcile import readiness
from homelab_dagster.settings import Settings

if TYPE_CHECKING:
    import dagster as dg

__all__ = ["GPU_GROUPS", "GpuUse", "collect", "gpu_hours", "status"]

# The GPU-hours report's groups, and what the table calls one of their rows.
GPU_GROUPS = {"models": "model", "endpoints": "endpoint", "clusters": "cluster"}
_TRAINING_GPU_SECONDS = "gpu_seconds"  # what training_run/* records (assets/training.py)
_PAGE = 500  # materialisations read from the instance at a time
STALE_AFTER_S = 3600.0  # a check result older than this is unknown


def status(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document, for tools.")] = False,
    stale_after: Annotated[
        float,
        typer.Option(
            "--stale-after",
            min=0,
            help="Seconds after which a check result is unknown, not passing.",
        ),
    ] = STALE_AFTER_S,
) -> None:
    """Each asset's last materialisation, checks, drift, stalled state and commit; each
    cluster's readiness from its live checks; GPU-hours per model, endpoint and cluster."""

    from homelab_dagster.cli.launch import ensure_dagster_home, open_instance

    try:
        settings = Settings.from_env()
    except HomelabError as exc:
        raise error_exit(exc) from exc
    ensure_dagster_home(settings)
    from homelab_dagster.definitions import defs

    with open_instance() as instance:
        report = collect(instance, defs, stale_after_s=stale_after)
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    _print(report)


def collect(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    now: float | None = None,
    stale_after_s: float = STALE_AFTER_S,
) -> dict[str, Any]:
    """The status of every asset of ``defs``, the readiness of every cluster and the GPU-hours
    until ``now`` (seconds since the epoch; default: now), as plain data; a check result
    older than ``stale_after_s`` is unknown."""
    from assets._stack import DRIFT_CHECK
    from sensors.failures import repair_record

    now = time.time() if now is None else now
    graph = defs.resolve_asset_graph()
    assets: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}  # asset -> the cluster it runs on (spec metadata)
    for key in sorted(graph.get_all_asset_keys()):
        node = graph.get(key)
        event = instance.get_latest_materialization_event(key)
        materialization = event.asset_materialization if event else None
        commit = None
        if materialization is not None:
            found = materialization.metadata.get("homelab_commit")
            commit = str(found.value) if found is not None else None
        checks = {
            check.name: _check(instance, check, now, stale_after_s)
            for check in sorted(node.check_keys, key=str)
        }
        cluster = node.metadata.get("cluster")
        if isinstance(cluster, str):
            where[key.to_user_string()] = cluster
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
    uses, rows = _gpu_uses(instance, graph, now)
    counted = _counted(assets, where)
    return {
        "assets": assets,
        "readiness": {
            c: round(readiness({k: v["passed"] for k, v in r.items()}), 3)
            for c, r in counted.items()
        },
        "readiness_missing": {
            c: [f"{k}: {v['outcome']}" for k, v in r.items() if not v["passed"]]
            for c, r in counted.items()
        },
        "gpu_hours": gpu_hours(uses, now, rows),
    }


def _check(
    instance: dg.DagsterInstance, key: dg.AssetCheckKey, now: float, stale_after_s: float
) -> dict[str, Any]:
    """The check's last evaluation: its ``outcome`` (passed, failed, skipped, stale: older
    than ``stale_after_s``, never), ``passed`` (None where unknown: never, stale, skipped),
    its words, when and how long ago."""
    from sensors.alerts import latest_evaluation, was_skipped

    latest = latest_evaluation(instance, key)
    if latest is None:
        return {
            "outcome": "never",
            "passed": None,
            "description": None,
            "evaluated_at": None,
            "age_s": None,
        }
    record, evaluation = latest
    age = max(0.0, now - record.event.timestamp)
    if was_skipped(evaluation):
        outcome = "skipped"
    elif age > stale_after_s:
        outcome = "stale"
    else:
        outcome = "passed" if evaluation.passed else "failed"
    return {
        "outcome": outcome,
        "passed": evaluation.passed if outcome in ("passed", "failed") else None,
        "description": evaluation.description,
        "evaluated_at": _when(record.event.timestamp),
        "age_s": round(age),
    }


def _counted(
    assets: dict[str, dict[str, Any]], where: dict[str, str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per cluster, the checks its readiness counts (``<asset>:<check>`` -> the check): its
    own, its outgoing links', and those of the assets on it (training runs, endpoints)."""
    clusters = [name.split("/", 1)[1] for name in assets if name.startswith("cluster/")]
    counted: dict[str, dict[str, dict[str, Any]]] = {}
    for cluster in clusters:
        results: dict[str, dict[str, Any]] = {}
        for name, asset in assets.items():
            own = name == f"cluster/{cluster}"
            outgoing = name.startswith(f"mesh_link/{cluster}__")
            if own or outgoing or where.get(name) == cluster:
                results |= {f"{name}:{c}": v for c, v in asset["checks"].items()}
        counted[cluster] = results
    return counted


@dataclass(frozen=True)
class GpuUse:
    """GPU-seconds spent from ``start`` to ``end`` (seconds since the epoch), counted in each
    of ``rows``: ``(group, name)`` pairs of :data:`GPU_GROUPS`, e.g. ``("models", "sre-agent")``.
    A training run's are counted when it ended (``start == end``)."""

    rows: tuple[tuple[str, str], ...]
    start: float
    end: float
    seconds: float


def gpu_hours(
    uses: Iterable[GpuUse], now: float, rows: Iterable[tuple[str, str]] = ()
) -> dict[str, Any]:
    """GPU-hours per group and name, ``this_month`` (the calendar month of ``now``, UTC) and
    ``all_time``, rounded to 3 decimals; ``rows`` are listed even where nothing was used.

    A use that began before the month counts in it in proportion to its time in it (an
    endpoint that served across the 1st)."""
    month = datetime.fromtimestamp(now, UTC).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    since = month.timestamp()
    totals: dict[str, dict[str, list[float]]] = {group: {} for group in GPU_GROUPS}
    for group, name in rows:
        totals[group].setdefault(name, [0.0, 0.0])
    for use in uses:
        if use.start >= since:
            share = 1.0
        elif use.end <= since:
            share = 0.0
        else:
            share = (use.end - since) / (use.end - use.start)
        for group, name in use.rows:
            figures = totals[group].setdefault(name, [0.0, 0.0])
            figures[0] += use.seconds * share
            figures[1] += use.seconds
    return {
        "month": month.strftime("%Y-%m"),
        **{
            group: {
                name: {"this_month": round(month_s / 3600, 3), "all_time": round(all_s / 3600, 3)}
                for name, (month_s, all_s) in sorted(named.items())
            }
            for group, named in totals.items()
        },
    }


def _gpu_uses(
    instance: dg.DagsterInstance, graph: dg.AssetGraph, now: float
) -> tuple[list[GpuUse], list[tuple[str, str]]]:
    """Every GPU use the instance recorded: each training materialisation's ``gpu_seconds``;
    each endpoint materialisation's ``gpu_seconds_served`` (since the one before) and its
    current deployment's share until ``now``. With the rows of every GPU asset."""
    from assets._keys import endpoint_key, training_run_key
    from assets.endpoints import GPU_SECONDS_SERVED, gpu_seconds_served

    uses: list[GpuUse] = []
    rows: list[tuple[str, str]] = []
    for key in sorted(graph.get_all_asset_keys()):
        name = key.path[-1]
        training = key == training_run_key(name)
        if not training and key != endpoint_key(name):
            continue
        spec = graph.get(key).metadata
        labels = (
            ("models", str(spec["model"])),
            *(() if training else (("endpoints", name),)),
            ("clusters", str(spec["cluster"])),
        )
        rows.extend(labels)
        previous: dg.EventLogRecord | None = None
        for record in _materializations(instance, key):
            metadata = record.asset_materialization.metadata if record.asset_materialization else {}
            if training:
                seconds = _seconds(metadata.get(_TRAINING_GPU_SECONDS))
                uses.append(GpuUse(labels, record.timestamp, record.timestamp, seconds))
            else:
                start = previous.timestamp if previous else record.timestamp
                seconds = _seconds(metadata.get(GPU_SECONDS_SERVED))
                uses.append(GpuUse(labels, start, record.timestamp, seconds))
            previous = record
        if not training and previous is not None:
            running = gpu_seconds_served(previous.event_log_entry, now)
            uses.append(GpuUse(labels, previous.timestamp, now, running))
    return uses, rows


def _materializations(
    instance: dg.DagsterInstance, key: dg.AssetKey
) -> Iterator[dg.EventLogRecord]:
    """Every materialisation of ``key``, oldest first, a page at a time."""
    cursor = None
    while True:
        page = instance.fetch_materializations(key, limit=_PAGE, cursor=cursor, ascending=True)
        yield from page.records
        if not page.has_more:
            return
        cursor = page.cursor


def _seconds(value: object) -> float:
    """A recorded number of seconds (0.0 where the key is missing)."""
    import dagster as dg

    if isinstance(value, dg.FloatMetadataValue | dg.IntMetadataValue) and value.value is not None:
        return float(value.value)
    return 0.0


def _state(asset: dict[str, Any]) -> str:
    """What the asset needs, most urgent first: stalled, failing runs, a failing check, a
    skipped or stale one, never materialised; else ok."""
    by: dict[str, tuple[str, str]] = {}
    for name, check in asset["checks"].items():
        by.setdefault(check["outcome"], (name, check["description"]))
    if asset["stalled"]:
        return f"[red]stalled[/]: {asset['last_failure']}"
    if asset["failures"]:
        return f"[yellow]{asset['failures']} failure(s)[/]: {asset['last_failure']}"
    if not asset["materialized_at"]:
        return "[dim]never materialised[/]"
    if "failed" in by:
        return f"[red]check failing[/]: {by['failed'][0]}: {by['failed'][1]}"
    if "skipped" in by:
        return f"[yellow]checks skipped[/]: {by['skipped'][1]}"
    if "stale" in by:
        return "[yellow]checks stale[/]: run them (the UI, or `homelab reconcile`)"
    return "ok"


def _ago(seconds: float | None = None) -> str:
    """``40 s ago``, ``12 min ago``; ``-`` for never."""
    return "-" if seconds is None else f"{duration(seconds)} ago"


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _print(report: dict[str, Any]) -> None:
    table = Table(title="assets", title_justify="left")
    for column in ("asset", "materialised", "commit", "checks", "checked", "drift", "state"):
        table.add_column(column)
    for name, asset in report["assets"].items():
        checks = asset["checks"]
        passing = sum(1 for c in checks.values() if c["passed"])
        ages = [c["age_s"] for c in checks.values() if c["age_s"] is not None]
        drift = {None: "-", True: "[red]drifted[/]", False: "none"}[asset["drifted"]]
        table.add_row(
            name,
            asset["materialized_at"] or "-",
            (asset["commit"] or "-")[:12],
            f"{passing}/{len(checks)}" if checks else "-",
            f"{_ago(min(ages))} - {_ago(max(ages))}" if len(set(ages)) > 1 else _ago(*ages[:1]),
            drift,
            _state(asset),
        )
    console.print(table)
    ready = Table(title="readiness (checks passing now)", title_justify="left")
    ready.add_column("cluster")
    ready.add_column("ready", justify="right")
    ready.add_column("short of 100%")
    for cluster, figure in report["readiness"].items():
        missing = report["readiness_missing"][cluster]
        shown = ", ".join(missing[:4]) + (
            f" (and {len(missing) - 4} more)" if len(missing) > 4 else ""
        )
        ready.add_row(cluster, f"{figure:.0%}", shown or "-")
    console.print(ready)
    hours = report["gpu_hours"]
    gpu = Table(title=f"GPU-hours ({hours['month']} UTC, all time)", title_justify="left")
    gpu.add_column("of")
    gpu.add_column("this month", justify="right")
    gpu.add_column("all time", justify="right")
    for group, row in GPU_GROUPS.items():
        for name, figures in hours[group].items():
            gpu.add_row(
                f"{row} {name}", f"{figures['this_month']:.3f}", f"{figures['all_time']:.3f}"
            )
    console.print(gpu)

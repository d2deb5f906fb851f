"""Materialising from the command line, with a live progress display.

The CLI runs the code location's ``up`` job in this process's Dagster instance (the one
``make dev`` shows, under ``$DAGSTER_HOME``), with Dagster's multiprocess executor so that
independent assets (and their Pulumi stacks) run in parallel. A thread follows the run's
event log and draws one row per asset.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import dagster as dg
from dagster import DagsterEventType

from homelab_dagster.inventory import Inventory
from homelab_dagster.settings import Settings

if TYPE_CHECKING:  # rich is imported where the display is drawn: the steps' processes, which
    # import this module for its job names, never draw it
    from rich.console import Console
    from rich.table import Table

__all__ = [
    "Plan",
    "RunOutcome",
    "ensure_dagster_home",
    "materialize",
    "plan_selection",
    "preview_job",
    "teardown_job",
    "up_job",
]

UP_JOB = "up"
PREVIEW_JOB = "preview"  # pulumi preview of every stack (assets/stacks.py)
TEARDOWN_JOB = "teardown"  # pulumi destroy, links before clusters (assets/stacks.py)
CLUSTERS_TAG = "homelab/clusters"  # on stack ops: the clusters a stack touches
_TAG = "homelab/cli-invocation"
# The tag assets carry while their materialisation is not built yet (see assets/_pending.py).
_PENDING_TAG = ("homelab/status", "not-built-yet")
_STATUS = {
    DagsterEventType.STEP_START: "[yellow]running[/]",
    DagsterEventType.STEP_SUCCESS: "[green]done[/]",
    DagsterEventType.STEP_FAILURE: "[red]failed[/]",
    DagsterEventType.STEP_SKIPPED: "[dim]skipped[/]",
    DagsterEventType.STEP_UP_FOR_RETRY: "[yellow]retrying[/]",
}


@dataclass
class RunOutcome:
    """What a CLI materialisation did: the run, and each step's final state and message."""

    run_id: str
    success: bool
    steps: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """The assets a CLI run materialises, and the ones it leaves out as not built yet."""

    selected: list[dg.AssetKey]
    pending: list[dg.AssetKey]
    clusters: list[str]


def plan_selection(inventory: Inventory, cluster: str | None = None) -> Plan:
    """All assets, or those of one ``cluster`` and its mesh links, less the pending ones."""
    from homelab_dagster.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = graph.get_all_asset_keys()
    clusters = list(inventory.clusters)
    if cluster is not None:
        links = [lk for lk in inventory.mesh.links if cluster in {lk.source, lk.target}]
        clusters = sorted({cluster} | {c for lk in links for c in (lk.source, lk.target)})
        wanted: set[tuple[str, ...]] = {mesh_link_path(lk.source, lk.target) for lk in links}
        # A link needs both its clusters' base state (their linkerd-multicluster namespace).
        wanted |= {("homelab_inventory",), *(("cluster", c) for c in clusters)}
        keys = {k for k in keys if tuple(k.path) in wanted}
    pending = {k for k in keys if graph.get(k).tags.get(_PENDING_TAG[0]) == _PENDING_TAG[1]}
    return Plan(selected=sorted(keys - pending), pending=sorted(pending), clusters=clusters)


def mesh_link_path(source: str, target: str) -> tuple[str, str]:
    """The key path of a mesh link asset (as assets/_keys.py names it)."""
    return ("mesh_link", f"{source}__{target}")


def up_job() -> dg.JobDefinition:
    """The code location's ``up`` job (module-level, so Dagster can reconstruct it)."""
    from homelab_dagster.definitions import defs

    return defs.resolve_job_def(UP_JOB)


def preview_job() -> dg.JobDefinition:
    """The code location's ``preview`` job (reconstructable, like :func:`up_job`)."""
    from homelab_dagster.definitions import defs

    return defs.resolve_job_def(PREVIEW_JOB)


def teardown_job() -> dg.JobDefinition:
    """The code location's ``teardown`` job (reconstructable, like :func:`up_job`)."""
    from homelab_dagster.definitions import defs

    return defs.resolve_job_def(TEARDOWN_JOB)


def ensure_dagster_home(settings: Settings) -> str:
    """``$DAGSTER_HOME``, defaulting to ``<state dir>/dagster`` (created)."""
    home = os.environ.setdefault("DAGSTER_HOME", str(settings.state_dir / "dagster"))
    os.makedirs(home, exist_ok=True)
    config = os.path.join(home, "dagster.yaml")
    if not os.path.exists(config):
        with open(config, "w", encoding="utf-8") as f:
            f.write("# Written by homelab-dagster: this homelab's local Dagster instance.\n")
            f.write("telemetry:\n  enabled: false\n")
    return home


def materialize(
    selection: Sequence[dg.AssetKey] | None,
    *,
    settings: Settings,
    console: Console,
    job: Callable[[], dg.JobDefinition] = up_job,
    op_selection: Sequence[str] | None = None,
    title: str = "materialising",
) -> RunOutcome:
    """Materialise ``selection`` (all assets when None), showing progress on ``console``.

    ``job``/``op_selection``: run another job of the code location (``preview_job``,
    ``teardown_job``), all its ops or those named. ``title``: the progress table's.
    """
    ensure_dagster_home(settings)
    invocation = uuid.uuid4().hex
    with dg.DagsterInstance.get() as instance:
        follower = _Follower(instance, invocation, console, title)
        follower.start()
        try:
            result = dg.execute_job(
                dg.reconstructable(job),
                instance=instance,
                tags={_TAG: invocation},
                asset_selection=list(selection) if selection is not None else None,
                op_selection=list(op_selection) if op_selection is not None else None,
                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
            )
        finally:
            follower.stop()
        return RunOutcome(
            run_id=result.run_id,
            success=result.success,
            steps=follower.steps,
            failures=follower.failures,
        )


class _Follower(threading.Thread):
    """Follows a run's events and redraws a table of steps until stopped."""

    def __init__(
        self, instance: dg.DagsterInstance, invocation: str, console: Console, title: str
    ) -> None:
        super().__init__(daemon=True)
        self._title = title
        self._instance = instance
        self._invocation = invocation
        self._console = console
        self._stopped = threading.Event()
        self._step_started: dict[str, float] = {}
        self._step_ended: dict[str, float] = {}
        self.steps: dict[str, str] = {}
        self.failures: dict[str, str] = {}

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=5)

    def run(self) -> None:
        run_id = None
        cursor = None
        from rich.live import Live

        with Live(self._table(), console=self._console, refresh_per_second=4) as live:
            while True:
                stopping = self._stopped.is_set()
                if run_id is None:
                    runs = self._instance.get_runs(
                        filters=dg.RunsFilter(tags={_TAG: self._invocation}), limit=1
                    )
                    run_id = runs[0].run_id if runs else None
                if run_id is not None:
                    conn = self._instance.get_records_for_run(run_id, cursor=cursor)
                    cursor = conn.cursor
                    for record in conn.records:
                        self._apply(record.event_log_entry)
                live.update(self._table())
                if stopping:
                    return
                self._stopped.wait(0.25)

    def _apply(self, entry: dg.EventLogEntry) -> None:
        event = entry.dagster_event
        if event is None or event.step_key is None:
            return
        status = _STATUS.get(event.event_type)
        if status is None:
            return
        step = event.step_key
        self.steps[step] = status
        if event.event_type == DagsterEventType.STEP_START:
            self._step_started[step] = entry.timestamp
        elif event.event_type in {DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE}:
            self._step_ended[step] = entry.timestamp
        if event.event_type == DagsterEventType.STEP_FAILURE:
            error = event.step_failure_data.error
            self.failures[step] = error.message.strip() if error else "failed"

    def _table(self) -> Table:
        from rich.table import Table

        table = Table(title=self._title, title_justify="left", expand=False)
        table.add_column("step")
        table.add_column("status")
        table.add_column("time", justify="right")
        now = time.time()
        for step, status in self.steps.items():
            start = self._step_started.get(step)
            elapsed = (self._step_ended.get(step, now) - start) if start else 0.0
            table.add_row(step, status, f"{elapsed:5.1f}s")
        return table

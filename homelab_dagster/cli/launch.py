"""Materialising from the command line, with a live progress display.

The CLI runs a job of the code location (``up``, ``preview``, ``teardown``) in this
process's Dagster instance (the one ``make dev`` shows, under ``$DAGSTER_HOME``), with the
executor the deployment chose (:mod:`resources.deployment`), so that independent assets (and
their Pulumi stacks) run in parallel. A thread follows the run's event log and draws one row
per step. Dagster and the code location are imported when a run starts, so that the
commands that need neither (``validate``, ``show``) stay quick.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import dagster as dg
from dagster import DagsterEventType

from homelab_dagster.cli.output import steps_output_to
from homelab_dagster.inventory import Inventory
from homelab_dagster.loader import inventory_or_none
from homelab_dagster.settings import DAGSTER_POSTGRES_URL_VAR, Settings
from resources.deployment import build_deployment

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = [
    "Plan",
    "RunOutcome",
    "ensure_dagster_home",
    "materialize",
    "plan_selection",
    "start_world",
]

_TAG = "homelab/cli-invocation"
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
    from assets import PENDING_TAGS, cluster_selection
    from homelab_dagster.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = graph.get_all_asset_keys()
    clusters = list(inventory.clusters)
    if cluster is not None:
        wanted, clusters = cluster_selection(inventory, cluster)
        keys = keys & wanted
    pending = {k for k in keys if PENDING_TAGS.items() <= graph.get(k).tags.items()}
    return Plan(selected=sorted(keys - pending), pending=sorted(pending), clusters=clusters)


def start_world(settings: Settings, inventory: Inventory, clusters: list[str] | None) -> None:
    """Before a run: where the deployment works on the local twin, bring up its ``clusters``
    (all when None), with progress; elsewhere the clusters are already there."""
    from resources.deployment import build_deployment

    if build_deployment(settings, inventory).local_twin:
        from homelab_dagster.cli.twin import start_twin

        start_twin(clusters)


_WRITTEN_BY = "# Written by homelab-dagster: this homelab's local Dagster instance.\n"


def ensure_dagster_home(settings: Settings) -> str:
    """``$DAGSTER_HOME``, defaulting to ``<state dir>/dagster`` (created), with its
    ``dagster.yaml``: telemetry and the onboarding ("nux") dialog off, and storage in
    PostgreSQL when ``settings.dagster_postgres`` (else Dagster's default, SQLite files
    in the home).

    The PostgreSQL URL is never written: the file names its variable
    (``HOMELAB_DAGSTER_POSTGRES_URL``) and Dagster reads it when the instance loads. A
    ``dagster.yaml`` this function wrote is rewritten when the settings change it; one
    written by someone else is left alone.
    """
    home = os.environ.setdefault("DAGSTER_HOME", str(settings.state_dir / "dagster"))
    os.makedirs(home, exist_ok=True)
    config = os.path.join(home, "dagster.yaml")
    text = _WRITTEN_BY + "telemetry:\n  enabled: false\nnux:\n  enabled: false\n"
    if settings.dagster_postgres:
        text += f"storage:\n  postgres:\n    postgres_url:\n      env: {DAGSTER_POSTGRES_URL_VAR}\n"
    # Steps as pods (HOMELAB_RUNS=kubernetes): dagster-k8s's run launcher, whose settings the
    # step executor reads too, and the storage the pods share (resources/orchestrator.py).
    pods_instance = build_deployment(settings, inventory_or_none(settings.inventory_path))
    if pods_instance.instance_yaml is not None:
        text = _WRITTEN_BY + pods_instance.instance_yaml
    try:
        with open(config, encoding="utf-8") as f:
            current: str | None = f.read()
    except FileNotFoundError:
        current = None
    if current is None or (current.startswith(_WRITTEN_BY) and current != text):
        with open(config, "w", encoding="utf-8") as f:
            f.write(text)
    return home


def materialize(
    selection: Sequence[dg.AssetKey] | None,
    *,
    settings: Settings,
    console: Console,
    job: str = "up",
    op_selection: Sequence[str] | None = None,
    title: str = "materialising",
    ops_config: dict[str, object] | None = None,
) -> RunOutcome:
    """Materialise ``selection`` (all assets when None), showing progress on ``console``.

    ``job``/``op_selection``: the job of the code location to run (``up``, ``preview``,
    ``teardown``), all its ops or those named. ``title``: the progress table's.
    ``ops_config``: run configuration by op name (e.g. an endpoint's ``serve_version``).
    """
    ensure_dagster_home(settings)
    invocation = uuid.uuid4().hex
    # The steps' own output goes to the steps log, not through the progress display.
    with dg.DagsterInstance.get() as instance, steps_output_to(settings.steps_log):
        follower = _Follower(instance, invocation, console, title)
        follower.start()
        try:
            result = dg.execute_job(
                dg.build_reconstructable_job("homelab_dagster.definitions", "job", (job,)),
                instance=instance,
                tags={_TAG: invocation},
                asset_selection=list(selection) if selection is not None else None,
                op_selection=list(op_selection) if op_selection is not None else None,
                run_config={
                    "loggers": {"console": {"config": {"log_level": "WARNING"}}},
                    **({"ops": ops_config} if ops_config else {}),
                },
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

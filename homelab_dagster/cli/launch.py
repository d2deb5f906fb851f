"""Materialising from the command line, with a live progress display.

The CLI runs a job of the code location (``up``, ``preview``, ``teardown``) in this
process's Dagster instance (the one ``make dev`` shows, under ``$DAGSTER_HOME``), with the
executor the deployment chose (:mod:`resources.deployment`), so that independent assets (and
their Pulumi stacks) run in parallel. A thread follows the run's event log and draws one row
per step. Dagster and the code location are imported when a run starts, so that the
commands that need neither (``validate``, ``show``) stay quick.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dagster as dg
from dagster import DagsterEventType

from homelab_dagster.cli.output import steps_output_to
from homelab_dagster.errors import InstanceError
from homelab_dagster.inventory import Inventory
from homelab_dagster.loader import inventory_or_none
from homelab_dagster.settings import DAGSTER_POSTGRES_URL_VAR, Settings
from resources.deployment import build_deployment

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from resources.orchestrator import StepPodWatch

__all__ = [
    "Plan",
    "RunOutcome",
    "ensure_dagster_home",
    "materialize",
    "open_instance",
    "plan_selection",
    "start_world",
]

_TAG = "homelab/cli-invocation"
_WATCH_S = 5.0  # how often the run's step pods are looked at (when steps run as pods)
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
    import yaml

    from resources.orchestrator import INSTANCE_CONCURRENCY

    home = os.environ.setdefault("DAGSTER_HOME", str(settings.state_dir / "dagster"))
    os.makedirs(home, exist_ok=True)
    config = os.path.join(home, "dagster.yaml")
    text = _WRITTEN_BY + "telemetry:\n  enabled: false\nnux:\n  enabled: false\n"
    if settings.dagster_postgres:
        text += f"storage:\n  postgres:\n    postgres_url:\n      env: {DAGSTER_POSTGRES_URL_VAR}\n"
    # GPU steps share a pool per cluster (assets/training.py): one at a time, by default.
    text += yaml.safe_dump({"concurrency": INSTANCE_CONCURRENCY})
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


@contextlib.contextmanager
def open_instance() -> Iterator[dg.DagsterInstance]:
    """``$DAGSTER_HOME``'s instance (what the CLI's runs record into), open while inside.

    Raises:
        InstanceError: its storage cannot be reached or read (a PostgreSQL server that does
            not answer or refuses the credentials; unreadable SQLite files), naming where.
    """
    from dagster_postgres.utils import DagsterPostgresException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with _one_opening_at_a_time():
            instance = dg.DagsterInstance.get()
            # SQLite's event index is created at its first use, not when the instance opens:
            # use it here, under the lock, so that two runs never create it at once.
            instance.fetch_run_status_changes(DagsterEventType.RUN_SUCCESS, limit=1)
    except (DagsterPostgresException, SQLAlchemyError, OSError) as exc:
        raise InstanceError(_storage_problem(exc)) from None
    with instance:
        yield instance


@contextlib.contextmanager
def _one_opening_at_a_time() -> Iterator[None]:
    """While inside, no other process opens ``$DAGSTER_HOME``'s instance: the first opening
    creates and migrates its SQLite storage, and two at once (two `homelab up` started
    together) leave it with two schema versions ("more than one head": seen in CI)."""
    import fcntl

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        yield
        return
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(home, ".homelab-open.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _storage_problem(exc: BaseException) -> str:
    """What went wrong opening the instance, in words, without the storage's password."""
    url = os.environ.get(DAGSTER_POSTGRES_URL_VAR, "")
    if url:
        from sqlalchemy.engine import make_url

        try:
            parsed = make_url(url)
            where = f"PostgreSQL at {parsed.host}:{parsed.port or 5432}/{parsed.database}"
            secret = parsed.password or ""
        except Exception:  # an unparseable URL: name the variable only
            where, secret = "PostgreSQL", ""
        where += f" ({DAGSTER_POSTGRES_URL_VAR})"
    else:
        where, secret = f"the SQLite files under DAGSTER_HOME={os.environ.get('DAGSTER_HOME')}", ""
    chain: list[BaseException] = [exc]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) and len(chain) < 5:
        chain.append(cause)
    # The outermost words (what Dagster gave up on) and the root cause (the database's).
    lines = [str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__ for e in chain]
    reason = "; ".join(dict.fromkeys([lines[0], lines[-1]]))
    if secret:
        reason = reason.replace(secret, "***")
    what = f"Dagster's storage cannot be opened: {where}: {reason}"
    if url:
        what += (
            ". Check that the server runs and takes the URL's user and database "
            f"(or unset {DAGSTER_POSTGRES_URL_VAR}: SQLite under DAGSTER_HOME)"
        )
    return what


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
    deployment = build_deployment(settings, inventory_or_none(settings.inventory_path))
    pods = None
    if deployment.steps_as_pods:  # watch them
        resources = deployment.resources
        pods = (resources["dagster_on_kubernetes"], resources["kubernetes"])
    # The steps' own output goes to the steps log, not through the progress display.
    with open_instance() as instance, steps_output_to(settings.steps_log):
        follower = _Follower(instance, invocation, console, title, pods)
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
        said = follower.watch.said if follower.watch else {}
        failures = {
            step: f"{message} ({said[step]})" if step in said else message
            for step, message in follower.failures.items()
        }
        return RunOutcome(
            run_id=result.run_id, success=result.success, steps=follower.steps, failures=failures
        )


class _Follower(threading.Thread):
    """Follows a run's events and redraws a table of steps until stopped."""

    def __init__(
        self,
        instance: dg.DagsterInstance,
        invocation: str,
        console: Console,
        title: str,
        pods: tuple[Any, Any] | None = None,
    ) -> None:
        """``pods``: the run's steps run as pods: (DagsterOnKubernetes, KubernetesClusters),
        to watch them (resources/orchestrator.py, :class:`StepPodWatch`)."""
        super().__init__(daemon=True)
        self._pods = pods
        self.watch: StepPodWatch | None = None
        self._watched = 0.0
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
                    self._watch_pods(run_id, stopping)
                live.update(self._table())
                if stopping:
                    break
                self._stopped.wait(0.25)
        if not self._console.is_terminal:  # Live leaves its last frame's line open there
            self._console.line()

    def _watch_pods(self, run_id: str, last: bool) -> None:
        """Every few seconds (and once more at the end): what the run's step pods say."""
        if self._pods is None or (not last and time.monotonic() - self._watched < _WATCH_S):
            return
        self._watched = time.monotonic()
        if self.watch is None:
            from resources.orchestrator import StepPodWatch

            self.watch = StepPodWatch(*self._pods, run_id=run_id)
        for step, reason in self.watch.check().items():
            self.steps[step] = "[red]pod failed[/]"
            self._console.log(f"[red]{step}[/]: {reason}", highlight=False)

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

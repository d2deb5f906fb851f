"""The reconcile: a schedule that looks for drift, a sensor that repairs it, and automation.

- The schedule ``reconcile`` (cron: ``$HOMELAB_RECONCILE_CRON``) starts the ``reconcile``
  job (:mod:`assets.jobs`): every stack refreshed in preview mode, every link and cluster
  checked, every trained model's weights verified, in parallel; nothing changes. Its run is
  tagged with the head commit of the watched branch (``homelab/commit``) where it can be read.
- The sensor ``reconcile_repair`` reads each finished reconcile run once: the assets whose
  drift check (``no_drift``, ``link_works``, ``weights_intact``) failed are drifted. Each is
  re-materialised where auto-repair is on for its family, unless it is stalled or still in
  its back-off after a failure (:func:`homelab_dagster.reconcile.repair_decision`, on the
  record ``sensors/failures.py`` keeps): one run for all of them, tagged
  ``homelab/reconcile=repair`` and with the reconcile run's commit. A drifted asset left alone
  is logged with the reason.
- The sensor ``drift_watch`` (every ``$HOMELAB_DRIFT_WATCH_S`` seconds) keeps the reconcile
  cheap between schedules: in the long-lived code server, it reads each stack's Kubernetes
  objects and compares their fingerprints with those recorded when Pulumi and the world last
  agreed (a materialisation, or a passing ``no_drift``: metadata ``homelab_live_objects``).
  A stack whose objects all match cannot have drifted and costs no Pulumi run; the stacks
  whose objects changed (or that were never recorded, or hold Helm releases) get one
  ``reconcile`` run of their checks, whose ``no_drift`` names what drifted, and which
  ``reconcile_repair`` then repairs as any other.
- The automation sensor evaluates the assets' automation conditions (links follow their
  clusters, weights their training runs, endpoints their weights).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import dagster as dg

from assets._stack import COMMIT_TAG, DRIFT_CHECK, LIVE_OBJECTS
from assets.jobs import RECONCILE_JOB, RECONCILE_TAG, stack_specs
from assets.weights import INTACT_CHECK
from homelab_dagster.errors import GitError, HomelabError
from homelab_dagster.inventory import Inventory
from homelab_dagster.reconcile import LiveRef, changed_objects, repair_decision
from resources.git import GitRepository
from resources.kubernetes import KubernetesClusters
from sensors.failures import repair_record

__all__ = [
    "AUTOMATION_SENSOR",
    "DRIFT_CHECKS",
    "REPAIR_SENSOR",
    "SCHEDULE_NAME",
    "WATCH_SENSOR",
    "build_reconcile_defs",
    "drifted_assets",
]

SCHEDULE_NAME = "reconcile"
REPAIR_SENSOR = "reconcile_repair"
AUTOMATION_SENSOR = "automation"
WATCH_SENSOR = "drift_watch"
WATCH_TAG = "homelab/drift-watch"  # on a reconcile run the watch requested: the stacks' count
DRIFT_CHECKS = frozenset({DRIFT_CHECK, "link_works", INTACT_CHECK})
"""The checks whose failure means an asset drifted (and a materialisation repairs it)."""
REPAIRED_FROM_TAG = "homelab/reconciled-by"  # on a repair run: the reconcile run it follows
_REPAIR_INTERVAL_S = 10  # a few instance reads: cheap, and drift is repaired sooner
_IN_PROGRESS = [  # a run not finished yet
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def drifted_assets(instance: dg.DagsterInstance, run_id: str) -> dict[dg.AssetKey, list[str]]:
    """The assets whose drift checks failed in run ``run_id``, each with the checks' words."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
    ).records
    drifted: dict[dg.AssetKey, list[str]] = {}
    for record in records:
        event = record.event_log_entry.dagster_event
        if event is None:
            continue
        evaluation = event.event_specific_data
        if not isinstance(evaluation, dg.AssetCheckEvaluation):
            continue
        if evaluation.check_name in DRIFT_CHECKS and not evaluation.passed:
            text = evaluation.description or evaluation.check_name
            drifted.setdefault(evaluation.asset_key, []).append(text)
    return drifted


def _finished_reconcile(instance: dg.DagsterInstance) -> dg.DagsterRun | None:
    """The newest reconcile run that has finished (succeeded or failed)."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            tags={RECONCILE_TAG: "check"},
            statuses=[dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE],
        ),
        limit=1,
    )
    return runs[0] if runs else None


def _repairing(instance: dg.DagsterInstance) -> set[dg.AssetKey]:
    """The assets a repair run not yet finished will materialise."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            tags={RECONCILE_TAG: "repair"},
            statuses=_IN_PROGRESS,
        )
    )
    return {key for run in runs for key in run.asset_selection or ()}


def _repair_tick(context: dg.SensorEvaluationContext, families: frozenset[str]) -> dg.SensorResult:
    run = _finished_reconcile(context.instance)
    if run is None or run.run_id == context.cursor:
        return dg.SensorResult(skip_reason="no reconcile run finished since the last tick")
    drifted = drifted_assets(context.instance, run.run_id)
    now = time.time()
    busy = _repairing(context.instance)
    repair = []
    for key, why in sorted(drifted.items(), key=lambda item: item[0].to_user_string()):
        name = key.to_user_string()
        context.log.warning(f"{name}: {'; '.join(why)}")
        if key in busy:
            context.log.info(f"{name}: a repair run is still in progress: not requested again")
            continue
        record = repair_record(context.instance, key)
        go, reason = repair_decision(name, record, enabled=key.path[0] in families, now=now)
        context.log.info(reason)
        if go:
            repair.append(key)
    if not repair:
        return dg.SensorResult(
            skip_reason=f"reconcile run {run.run_id}: {len(drifted)} drifted, none to repair now",
            cursor=run.run_id,
        )
    tags = {RECONCILE_TAG: "repair", REPAIRED_FROM_TAG: run.run_id}
    if COMMIT_TAG in run.tags:
        tags[COMMIT_TAG] = run.tags[COMMIT_TAG]
    request = dg.RunRequest(run_key=f"repair-{run.run_id}", asset_selection=repair, tags=tags)
    return dg.SensorResult(run_requests=[request], cursor=run.run_id)


def _recorded(instance: dg.DagsterInstance, key: dg.AssetKey) -> dict[LiveRef, str] | str:
    """The objects and fingerprints recorded for ``key`` when Pulumi and the world last agreed
    (its newest materialisation or passing drift check, whichever is newer); otherwise why
    the watch leaves it to the scheduled reconcile."""
    candidates: list[tuple[float, Any]] = []
    materialised = instance.get_latest_materialization_event(key)
    if materialised is not None and materialised.asset_materialization is not None:
        candidates.append((materialised.timestamp, materialised.asset_materialization.metadata))
    record = instance.get_latest_asset_check_evaluation_record(dg.AssetCheckKey(key, DRIFT_CHECK))
    event = record.event if record is not None else None
    evaluation = event.dagster_event.event_specific_data if event and event.dagster_event else None
    if event is not None and isinstance(evaluation, dg.AssetCheckEvaluation):
        if not evaluation.passed and event.timestamp > max((t for t, _ in candidates), default=0):
            return "drifted at its last reconcile (reconcile_repair's)"
        if evaluation.passed:
            candidates.append((event.timestamp, evaluation.metadata))
    if not candidates:
        return "never materialised"
    _, metadata = max(candidates, key=lambda c: c[0])
    value = metadata.get(LIVE_OBJECTS)
    if value is None:
        return "no fingerprints recorded (it holds Helm releases, or was unreadable then)"
    return dict(LiveRef.from_record(r) for r in value.value)


def _busy(instance: dg.DagsterInstance, keys: Sequence[dg.AssetKey]) -> set[dg.AssetKey]:
    """The assets of ``keys`` a run in progress materialises or checks (all, for a run that
    selects no assets by name)."""
    busy: set[dg.AssetKey] = set()
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=_IN_PROGRESS)):
        if run.asset_selection is None and run.asset_check_selection is None:
            return set(keys)
        busy |= set(run.asset_selection or ())
        busy |= {check.asset_key for check in run.asset_check_selection or ()}
    return busy


def _watch_tick(
    context: dg.SensorEvaluationContext,
    stacks: Sequence[dg.AssetKey],
    kubernetes: KubernetesClusters,
) -> dg.SensorResult:
    instance = context.instance
    busy = _busy(instance, stacks)
    watched: dict[dg.AssetKey, dict[LiveRef, str]] = {}
    for key in stacks:
        recorded = "a run in progress works on it" if key in busy else _recorded(instance, key)
        if isinstance(recorded, str):
            context.log.debug(f"{key.to_user_string()}: not watched now: {recorded}")
        else:
            watched[key] = recorded
    suspects: dict[dg.AssetKey, str] = {}
    try:
        live = kubernetes.fingerprints(sorted({r for objs in watched.values() for r in objs}))
    except HomelabError as exc:
        live = {}
        suspects = {key: f"its objects cannot be read: {exc}" for key in watched}
    for key, recorded in watched.items():
        changed = changed_objects(
            {str(r): f for r, f in recorded.items()},
            {str(r): live[r] for r in recorded if r in live},
        )
        if changed and key not in suspects:
            suspects[key] = "; ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
    if not suspects:
        return dg.SensorResult(
            skip_reason=f"{len(watched)} stack(s) watched: every object as Pulumi left it"
        )
    for key, why in sorted(suspects.items()):
        context.log.info(f"{key.to_user_string()}: looking for drift: {why}")
    checks = dg.AssetSelection.checks_for_assets(*suspects).resolve_checks(
        context.repository_def.asset_graph
    )
    # The same objects in the same state are looked at once.
    seen = sorted(f"{r}={live.get(r)}" for key in suspects for r in watched[key])
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key="watch-" + hashlib.sha256("\n".join(seen).encode()).hexdigest()[:16],
                asset_selection=[],
                asset_check_keys=sorted(checks, key=str),
                tags={RECONCILE_TAG: "check", WATCH_TAG: str(len(suspects))},
            )
        ]
    )


def build_reconcile_defs(
    inventory: Inventory,
    *,
    cron: str,
    running: bool,
    repair_families: frozenset[str],
    automation_running: bool,
    watch_s: int,
) -> dg.Definitions:
    """The reconcile schedule, the repair sensor (repairing ``repair_families``), the drift
    watch (every ``watch_s`` seconds) and the automation sensor; the first three running from
    the start if ``running``, the last if ``automation_running`` (the UI can toggle each)."""
    schedule_status = (
        dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED
    )

    @dg.schedule(
        name=SCHEDULE_NAME,
        cron_schedule=cron,
        job_name=RECONCILE_JOB,
        default_status=schedule_status,
        description="Looks for drift in every stack, link and weights version (changes "
        "nothing; reconcile_repair repairs what drifted).",
    )
    def reconcile(context: dg.ScheduleEvaluationContext, git: GitRepository) -> dg.RunRequest:
        tags = {RECONCILE_TAG: "check"}
        try:
            tags[COMMIT_TAG] = git.fetch()
        except GitError as exc:  # drift is looked for all the same, without the commit
            context.log.warning(f"reconcile without a commit tag: {exc}")
        return dg.RunRequest(tags=tags)

    @dg.sensor(
        name=REPAIR_SENSOR,
        target=dg.AssetSelection.all(),
        minimum_interval_seconds=_REPAIR_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING
        if running
        else dg.DefaultSensorStatus.STOPPED,
        description="After each reconcile run: re-materialises the drifted assets of the "
        f"families with auto-repair on ({', '.join(sorted(repair_families)) or 'none'}), "
        "with back-off, until they stall.",
    )
    def reconcile_repair(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        return _repair_tick(context, repair_families)

    clusters, links = stack_specs(inventory)
    stacks = [spec.key for spec in clusters + links]

    @dg.sensor(
        name=WATCH_SENSOR,
        job_name=RECONCILE_JOB,
        minimum_interval_seconds=watch_s,
        default_status=dg.DefaultSensorStatus.RUNNING
        if running
        else dg.DefaultSensorStatus.STOPPED,
        description="Between reconciles: reads every stack's Kubernetes objects and checks "
        "only the stacks whose objects changed since Pulumi last agreed with them (their "
        "drift refreshed by a reconcile run of their checks).",
    )
    def drift_watch(
        context: dg.SensorEvaluationContext, kubernetes: KubernetesClusters
    ) -> dg.SensorResult:
        return _watch_tick(context, stacks, kubernetes)

    automation = dg.AutomationConditionSensorDefinition(
        AUTOMATION_SENSOR,
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING
        if automation_running
        else dg.DefaultSensorStatus.STOPPED,
        description="Links follow their clusters, weights their training runs, endpoints "
        "their weights; held back while a blocking check upstream fails.",
    )
    return dg.Definitions(
        schedules=[reconcile], sensors=[reconcile_repair, drift_watch, automation]
    )

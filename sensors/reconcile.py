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
- The automation sensor evaluates the assets' automation conditions (links follow their
  clusters, weights their training runs, endpoints their weights).
"""

from __future__ import annotations

import time

import dagster as dg

from assets._stack import COMMIT_TAG, DRIFT_CHECK
from assets.jobs import RECONCILE_JOB, RECONCILE_TAG
from assets.weights import INTACT_CHECK
from homelab_dagster.errors import GitError
from homelab_dagster.reconcile import repair_decision
from resources.git import GitRepository
from sensors.failures import repair_record

__all__ = [
    "AUTOMATION_SENSOR",
    "DRIFT_CHECKS",
    "REPAIR_SENSOR",
    "SCHEDULE_NAME",
    "build_reconcile_defs",
    "drifted_assets",
]

SCHEDULE_NAME = "reconcile"
REPAIR_SENSOR = "reconcile_repair"
AUTOMATION_SENSOR = "automation"
DRIFT_CHECKS = frozenset({DRIFT_CHECK, "link_works", INTACT_CHECK})
"""The checks whose failure means an asset drifted (and a materialisation repairs it)."""
REPAIRED_FROM_TAG = "homelab/reconciled-by"  # on a repair run: the reconcile run it follows
_REPAIR_INTERVAL_S = 30


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
            statuses=[
                dg.DagsterRunStatus.QUEUED,
                dg.DagsterRunStatus.NOT_STARTED,
                dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED,
            ],
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


def build_reconcile_defs(
    *, cron: str, running: bool, repair_families: frozenset[str], automation_running: bool
) -> dg.Definitions:
    """The reconcile schedule, the repair sensor (repairing ``repair_families``) and the
    automation sensor; the first two running from the start if ``running``, the last if
    ``automation_running`` (the UI can toggle each)."""
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

    automation = dg.AutomationConditionSensorDefinition(
        AUTOMATION_SENSOR,
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING
        if automation_running
        else dg.DefaultSensorStatus.STOPPED,
        description="Links follow their clusters, weights their training runs, endpoints "
        "their weights; held back while a blocking check upstream fails.",
    )
    return dg.Definitions(schedules=[reconcile], sensors=[reconcile_repair, automation])

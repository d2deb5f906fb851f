"""Failures reach people: each failed run is recorded per asset, and announced by webhook.

The sensor ``run_failures`` (Dagster's run-failure sensor) handles every failed run of the
code location: each asset the run planned and did not materialise gets a
:class:`~homelab_dagster.reconcile.RepairRecord`: its consecutive failures (one more than
its record before, unless it was materialised since), the failed step's reason and run.
The record is an **observation of the asset** in the Dagster instance (metadata keys
``homelab_failures``, ``homelab_last_failure``, ... in docs/metadata.md), so it is kept
where runs are kept (SQLite files on the twin, PostgreSQL on the homelab), shows in the
asset's history in the UI, and survives a daemon restart; a successful materialisation
makes it old news (:func:`repair_record` ignores a record older than the last one).

Then one message goes to the webhook (:class:`resources.webhook.Webhook`, where configured):
the run, its job, its commit, and per asset the reason, the failure count and whether it is
now stalled. No secret is in it: reasons are Pulumi's and the cluster's (secrets masked
there), the URL is never logged.
"""

from __future__ import annotations

import time

import dagster as dg

from assets._stack import COMMIT_TAG
from homelab_dagster.reconcile import RepairRecord
from resources.kubernetes import KubernetesClusters
from resources.orchestrator import POD_NOTE, DagsterOnKubernetes, StepPodWatch
from resources.webhook import Webhook

__all__ = [
    "FAILURE_SENSOR",
    "build_failure_sensor",
    "failed_assets",
    "failure_message",
    "record_failure",
    "repair_record",
]

FAILURE_SENSOR = "run_failures"
# How many of an asset's newest observations are searched for its record.
_OBSERVATIONS_SEARCHED = 25
_REASON_LIMIT = 2000
_K8S_JOB = "Kubernetes job"  # dagster-k8s's words for a step whose pod failed or vanished


def repair_record(instance: dg.DagsterInstance, key: dg.AssetKey) -> RepairRecord | None:
    """The asset's record of consecutive failures, None when it has none since its last
    materialisation."""
    materialised = instance.get_latest_materialization_event(key)
    since = materialised.timestamp if materialised else 0.0
    found = instance.fetch_observations(key, limit=_OBSERVATIONS_SEARCHED).records
    for record in found:  # newest first
        if record.timestamp <= since:
            return None
        observation = record.asset_observation
        if observation is None:
            continue
        values = {label: entry.value for label, entry in observation.metadata.items()}
        parsed = RepairRecord.from_metadata(values, record.timestamp)
        if parsed is not None:
            return parsed
    return None


def record_failure(
    instance: dg.DagsterInstance, key: dg.AssetKey, reason: str, run_id: str
) -> RepairRecord:
    """Record one more failed materialisation of ``key`` (an observation); the new record."""
    before = repair_record(instance, key)
    now = time.time()
    reason = reason.strip()[:_REASON_LIMIT] or "no reason given"
    record = (
        before.then_failed(reason, run_id, now)
        if before
        else RepairRecord.first(reason, run_id, now)
    )
    instance.report_runless_asset_event(
        dg.AssetObservation(asset_key=key, metadata=record.metadata())
    )
    return record


def failed_assets(
    instance: dg.DagsterInstance, run_id: str, pods: StepPodWatch | None = None
) -> dict[dg.AssetKey, str]:
    """The assets run ``run_id`` planned and did not materialise, each with the reason its
    step failed (or the run's, where its step never ran). ``pods``: where the steps ran as
    pods, what a failed step's pod says is added to its reason (dagster-k8s only says that
    the step's Job failed)."""
    records = instance.get_records_for_run(
        run_id,
        of_type={
            dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
            dg.DagsterEventType.ASSET_MATERIALIZATION,
            dg.DagsterEventType.STEP_FAILURE,
            dg.DagsterEventType.RUN_FAILURE,
            dg.DagsterEventType.ENGINE_EVENT,
        },
    ).records
    planned: dict[dg.AssetKey, str | None] = {}
    done: set[dg.AssetKey] = set()
    step_reasons: dict[str, str] = {}
    pod_notes: dict[str, str] = {}  # step key -> its pod's reason, noted in the run's log
    run_reason = "the run failed"
    for record in records:
        event = record.event_log_entry.dagster_event
        if event is None:
            continue
        kind = event.event_type
        if kind is dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED and event.asset_key:
            planned[event.asset_key] = event.step_key
        elif kind is dg.DagsterEventType.ASSET_MATERIALIZATION and event.asset_key:
            done.add(event.asset_key)
        elif kind is dg.DagsterEventType.STEP_FAILURE and event.step_key:
            error = event.step_failure_data.error
            step_reasons[event.step_key] = error.message.strip() if error else "the step failed"
        elif kind is dg.DagsterEventType.RUN_FAILURE and event.message:
            run_reason = event.message
        elif kind is dg.DagsterEventType.ENGINE_EVENT and (event.message or "").startswith(
            POD_NOTE
        ):
            pod_notes[event.step_key or ""] = (event.message or "").removeprefix(POD_NOTE)
    if pods is not None and any(_K8S_JOB in reason for reason in step_reasons.values()):
        pod_notes.update(pods.check())
    for step, said in pod_notes.items():
        if step in step_reasons:
            step_reasons[step] = f"{step_reasons[step]} ({said})"
    return {
        key: step_reasons.get(step or "", run_reason)
        for key, step in planned.items()
        if key not in done
    }


def failure_message(
    run: dg.DagsterRun, records: dict[dg.AssetKey, RepairRecord]
) -> dict[str, object]:
    """The webhook's message for failed run ``run`` (no secret: no URL, no configuration)."""
    return {
        "event": "run_failed",
        "run_id": run.run_id,
        "job": run.job_name,
        "commit": run.tags.get(COMMIT_TAG),
        "assets": [
            {
                "asset": key.to_user_string(),
                "reason": record.reason,
                "failures": record.failures,
                "stalled": record.stalled,
            }
            for key, record in sorted(records.items(), key=lambda item: item[0].to_user_string())
        ],
    }


def _announce(
    context: dg.RunFailureSensorContext, webhook: Webhook, message: dict[str, object]
) -> None:
    if not webhook.configured:
        return
    delivery = webhook.post(message)
    if delivery.sent:
        context.log.info(f"run {message['run_id']}: announced by webhook ({delivery.detail})")
    else:  # the URL is a secret: never in the log
        context.log.warning(f"run {message['run_id']}: the webhook failed: {delivery.detail}")


def build_failure_sensor(*, running: bool) -> dg.Definitions:
    """The run-failure sensor, running from the start if ``running``."""
    status = dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED

    @dg.run_failure_sensor(
        name=FAILURE_SENSOR,
        default_status=status,
        description="Records each failed run's assets (last reason, failures in a row, "
        "stalled) as observations, and announces the failure by webhook.",
    )
    def run_failures(
        context: dg.RunFailureSensorContext,
        webhook: Webhook,
        dagster_on_kubernetes: DagsterOnKubernetes,
        kubernetes: KubernetesClusters,
    ) -> None:
        run = context.dagster_run
        pods = StepPodWatch(dagster_on_kubernetes, kubernetes, run.run_id)
        failed = failed_assets(context.instance, run.run_id, pods)
        records = {
            key: record_failure(context.instance, key, reason, run.run_id)
            for key, reason in failed.items()
        }
        for key, record in records.items():
            state = "stalled" if record.stalled else f"failure {record.failures}"
            context.log.warning(f"{key.to_user_string()}: {state}: {record.reason}")
        message = failure_message(run, records)
        if not records:
            message["reason"] = context.failure_event.message or "the run failed"
        _announce(context, webhook, message)

    return dg.Definitions(sensors=[run_failures])

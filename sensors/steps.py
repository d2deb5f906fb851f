"""Step pods that cannot start fail their step, whoever launched the run.

With ``k8s_job_executor`` each step is a Kubernetes Job, and dagster-k8s watches only the Job:
a pod that can never start (an image that cannot be pulled, a missing Secret, no node to place
it) leaves the Job active and the step waiting for ever. The CLI's progress display watches the
pods of the runs it launched (:class:`resources.orchestrator.StepPodWatch`); the sensor
``step_pods`` does the same from the daemon for every run in progress, so that a run launched
from the UI, a schedule or a sensor fails too: a pod stuck for longer than the watch's grace
has its Job deleted (dagster-k8s then fails the step), and its reason goes into the run's log
as an engine event of the step (``step pod: ...``), where the UI shows it and the failure
sensor adds it to the asset's failure record.

It exists only where steps run as pods (:mod:`resources.deployment`).
"""

from __future__ import annotations

import dagster as dg

from resources.kubernetes import KubernetesClusters
from resources.orchestrator import POD_NOTE, DagsterOnKubernetes, StepPodWatch

__all__ = ["STEP_POD_SENSOR", "build_step_pod_sensor", "fail_stuck_steps"]

STEP_POD_SENSOR = "step_pods"


def fail_stuck_steps(
    instance: dg.DagsterInstance,
    dagster_on_kubernetes: DagsterOnKubernetes,
    kubernetes: KubernetesClusters,
    grace_s: float = StepPodWatch.grace_s,
) -> dict[str, dict[str, str]]:
    """Each run in progress whose step pods are stuck (for ``grace_s`` or more): those steps
    failed (their Jobs deleted), each with its pod's reason noted in the run's log. By run
    id."""
    failed: dict[str, dict[str, str]] = {}
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        watch = StepPodWatch(dagster_on_kubernetes, kubernetes, run.run_id, grace_s)
        news = watch.check(ended=False)
        for step, reason in news.items():
            instance.report_engine_event(f"{POD_NOTE}{reason}", dagster_run=run, step_key=step)
        if news:
            failed[run.run_id] = news
    return failed


def build_step_pod_sensor(*, running: bool) -> dg.Definitions:
    """The ``step_pods`` sensor, running from the start if ``running``."""
    status = dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED

    @dg.sensor(
        name=STEP_POD_SENSOR,
        minimum_interval_seconds=30,
        default_status=status,
        description="Fails the steps whose pod cannot start (image pull, missing Secret, no "
        "node) in every run in progress: deletes the step's Job and notes the pod's reason in "
        "the run's log.",
    )
    def step_pods(
        context: dg.SensorEvaluationContext,
        dagster_on_kubernetes: DagsterOnKubernetes,
        kubernetes: KubernetesClusters,
    ) -> dg.SkipReason:
        failed = fail_stuck_steps(context.instance, dagster_on_kubernetes, kubernetes)
        for run_id, steps in failed.items():
            for step, reason in steps.items():
                context.log.warning(f"run {run_id}: step {step} failed: {reason}")
        if not failed:
            return dg.SkipReason("no step pod is stuck")
        count = sum(len(steps) for steps in failed.values())
        return dg.SkipReason(f"failed {count} stuck step(s) in {len(failed)} run(s)")

    return dg.Definitions(sensors=[step_pods])

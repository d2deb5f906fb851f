"""What every infrastructure asset shares: its stack, its run configuration, its failures.

Every infrastructure asset (``cluster/<c>``, ``mesh_link/<a>__<b>``) has one Pulumi stack,
described by a :class:`StackSpec` that its factory makes; the ``preview`` and ``teardown``
jobs (:mod:`assets.jobs`) are built from the same specs. Each also has the check
:data:`DRIFT_CHECK` (:func:`drift_check`: ``pulumi refresh --preview-only``, run by the
``reconcile`` job), and records the commit its run came from (:func:`provenance`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import dagster as dg
from pydantic import Field

from homelab_dagster import reconcile
from homelab_dagster.checks import Verdict
from homelab_dagster.errors import HomelabError
from resources.kubernetes import KubernetesClusters
from resources.pulumi import Program, PulumiStacks, StackResult

__all__ = [
    "COMMIT_TAG",
    "DRIFT_CHECK",
    "LIVE_OBJECTS",
    "PENDING_TAGS",
    "STACK_STEP_TAGS",
    "StackConfig",
    "StackSpec",
    "check_result",
    "drift_check",
    "drift_check_spec",
    "key_slug",
    "live_record",
    "not_built_yet",
    "provenance",
    "record_preview",
    "step_failure",
]

DRIFT_CHECK = "no_drift"
LIVE_OBJECTS = "homelab_live_objects"
"""Metadata of a materialisation and of a passing drift check: the stack's Kubernetes objects
and their fingerprints when Pulumi and the world agreed (the drift watch compares them)."""
# The run tag naming the commit a run applies (the Git sensor's and the reconcile's runs).
COMMIT_TAG = "homelab/commit"

# Tags an asset whose materialisation is not built yet; `homelab up` leaves such assets out.
PENDING_TAGS = {"homelab/status": "not-built-yet"}

# What a stack step asks of the cluster when Dagster runs it as a pod (dagster-k8s's
# k8s_job_executor reads this tag; the local executor ignores it): the Pulumi engine, the
# Kubernetes provider and the program together peak near 1 GiB.
STACK_STEP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {
            "resources": {
                "requests": {"cpu": "250m", "memory": "768Mi"},
                "limits": {"memory": "2Gi"},
            }
        }
    }
}


@dataclass(frozen=True)
class StackSpec:
    """One infrastructure asset's stack: its key, the clusters it touches, its program.

    ``program`` builds the inline program when the stack runs (it may read the clusters
    through the Kubernetes resource, e.g. a link's exported services).
    """

    key: dg.AssetKey
    clusters: tuple[str, ...]
    program: Callable[[PulumiStacks, KubernetesClusters], Program]

    @property
    def slug(self) -> str:
        """The key as an op name part: ``cluster_forge``, ``mesh_link_studio__forge``."""
        return key_slug(self.key)


def key_slug(key: dg.AssetKey) -> str:
    """An asset key as an op name part: ``cluster_forge``, ``vllm_endpoint_sre_agent``."""
    return "_".join(key.path).replace("-", "_")


class StackConfig(dg.Config):
    """Run configuration of an infrastructure asset's materialisation."""

    refresh: bool = Field(
        default=True,
        description="Refresh the stack from the cluster before updating, so that changes made "
        "behind Pulumi's back (drift) are repaired. Off: apply the inventory's changes only.",
    )


def record_preview(
    context: dg.OpExecutionContext, key: dg.AssetKey, stack: str, result: StackResult
) -> None:
    """A ``preview`` op's outcome: the per-resource plan in the run's log, and as an
    observation of ``key`` (not a materialisation: nothing changed)."""
    context.log.info(f"{stack}: {result.changed} change(s)\n{result.plan_markdown()}")
    context.log_event(dg.AssetObservation(asset_key=key, metadata=result.metadata()))


def step_failure(exc: HomelabError) -> dg.Failure:
    """The step failure for a core error: its message (Pulumi's reason included), no retry."""
    return dg.Failure(description=str(exc), allow_retries=False)


def not_built_yet(key: dg.AssetKey, what: str) -> NoReturn:
    """Fail the materialisation of ``key``, saying what is not built yet.

    Such an asset is declared (so the graph is whole in the UI) but never pretends to succeed.
    """
    raise dg.Failure(
        description=(
            f"{key.to_user_string()}: {what} is not built yet. The asset is declared so the "
            "graph is complete; see docs/architecture.md, 'What is built'."
        ),
        allow_retries=False,
    )


def check_result(key: dg.AssetKey, name: str, verdict: Verdict) -> dg.AssetCheckResult:
    """The result of check ``name`` of ``key`` for a verdict (:mod:`homelab_dagster.checks`)."""
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=name,
        passed=verdict.passed,
        description=verdict.description,
        metadata=dict(verdict.metadata),
    )


def drift_check_spec(key: dg.AssetKey) -> dg.AssetCheckSpec:
    """The drift check of an infrastructure asset (not blocking: drift is reported, and
    repaired by the reconcile where auto-repair is on, without holding back what follows)."""
    return dg.AssetCheckSpec(
        DRIFT_CHECK,
        asset=key,
        blocking=False,
        description="pulumi refresh --preview-only finds nothing changed behind Pulumi's back "
        "(else it names each drifted resource and the properties that differ).",
    )


def drift_check(
    spec: StackSpec, pulumi: PulumiStacks, kubernetes: KubernetesClusters, log: dg.DagsterLogManager
) -> dg.AssetCheckResult:
    """Refresh ``spec``'s stack in preview mode (nothing recorded) and judge the drift; a
    refresh that fails is a failed check with Pulumi's reason."""
    stack = pulumi.stack_name(spec.key.path)
    # Read before the refresh: a change made in between makes the next watch refresh again.
    live = live_record(stack, pulumi, kubernetes, log)
    try:
        result = pulumi.refresh(stack, spec.program(pulumi, kubernetes), log, preview_only=True)
    except HomelabError as exc:
        verdict = Verdict(False, f"{stack}: cannot look for drift: {exc}", {"pulumi_stack": stack})
    else:
        verdict = reconcile.drift_verdict(stack, result.steps)
    if verdict.passed:
        verdict = dataclasses.replace(verdict, metadata={**verdict.metadata, **live})
    else:
        log.warning(verdict.description)
    return check_result(spec.key, DRIFT_CHECK, verdict)


def live_record(
    stack: str, pulumi: PulumiStacks, kubernetes: KubernetesClusters, log: dg.DagsterLogManager
) -> dict[str, Any]:
    """Metadata recording each Kubernetes object of ``stack`` with its fingerprint now
    (:data:`LIVE_OBJECTS`), for the drift watch; nothing when the stack holds something that
    is not one object (a Helm release) or cannot be read (the watch then refreshes it)."""
    try:
        refs = pulumi.kubernetes_objects(stack)
        if refs is None:
            log.info(f"{stack}: not watched between reconciles (it holds Helm releases)")
            return {}
        prints = kubernetes.fingerprints(refs)
    except HomelabError as exc:
        log.warning(f"{stack}: its objects' fingerprints were not recorded: {exc}")
        return {}
    return {LIVE_OBJECTS: dg.MetadataValue.json([ref.record(prints[ref]) for ref in refs])}


def provenance(context: dg.AssetExecutionContext) -> dict[str, str]:
    """Materialisation metadata naming the commit the run applies (``homelab_commit``), where
    its run is tagged with one (:data:`COMMIT_TAG`)."""
    commit = context.run.tags.get(COMMIT_TAG)
    return {"homelab_commit": commit} if commit else {}

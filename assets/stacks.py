"""Infrastructure stacks outside materialisation: the ``preview`` and ``teardown`` jobs.

Every infrastructure asset (``cluster/<c>``, ``mesh_link/<a>__<b>``) has one Pulumi stack,
described by a :class:`StackSpec` that its factory makes. From the specs:

- ``preview``: one op per stack, in parallel, running ``pulumi preview``. The per-resource
  plan goes to the run's log and, as an observation of the asset (not a materialisation:
  nothing changed), to the asset's metadata.
- ``teardown``: one op per stack running ``pulumi destroy``; links first, then each
  cluster once every link touching it is gone (reverse dependency order).

Both jobs run each op in its own process (a process runs one Pulumi program at a time).
Ops carry the tag ``homelab/clusters`` (the clusters a stack touches), which the CLI uses to
select one cluster's stacks.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dagster as dg
from pydantic import Field

from homelab_dagster import step_server
from homelab_dagster.errors import HomelabError
from homelab_dagster.launch import CLUSTERS_TAG, PREVIEW_JOB, TEARDOWN_JOB
from resources.kubernetes import KubernetesClusters
from resources.pulumi import Program, PulumiStacks

__all__ = [
    "CLUSTERS_TAG",
    "STACK_EXECUTOR",
    "StackConfig",
    "StackSpec",
    "build_stack_jobs",
    "fail",
]

# One process per step (one Pulumi program per process), forked from a server that has
# imported the heavy libraries once (homelab_dagster/step_server.py).
STACK_EXECUTOR = dg.multiprocess_executor.configured(
    {
        "max_concurrent": 8,
        "start_method": {"forkserver": {"preload_modules": list(step_server.PRELOAD)}},
    }
)


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
        return "_".join(self.key.path).replace("-", "_")


class StackConfig(dg.Config):
    """Run configuration of an infrastructure asset's materialisation."""

    refresh: bool = Field(
        default=True,
        description="Refresh the stack from the cluster before updating, so that changes made "
        "behind Pulumi's back (drift) are repaired. Off: apply the inventory's changes only.",
    )


def fail(exc: HomelabError) -> dg.Failure:
    """A step failure whose message is the error's (Pulumi's reason included)."""
    return dg.Failure(description=str(exc), allow_retries=False)


def _preview_op(spec: StackSpec) -> dg.OpDefinition:
    @dg.op(
        name=f"preview_{spec.slug}",
        tags={CLUSTERS_TAG: ",".join(spec.clusters)},
        description=f"pulumi preview of {spec.key.to_user_string()}'s stack.",
    )
    def _op(context: dg.OpExecutionContext, pulumi: PulumiStacks, kubernetes: KubernetesClusters):
        stack = pulumi.stack_name(spec.key.path)
        try:
            result = pulumi.preview(stack, spec.program(pulumi, kubernetes), context.log)
        except HomelabError as exc:
            raise fail(exc) from exc
        context.log.info(f"{stack}: {result.changed} change(s)\n{result.plan_markdown()}")
        context.log_event(dg.AssetObservation(asset_key=spec.key, metadata=result.metadata()))

    return _op


def _destroy_op(spec: StackSpec, after: bool) -> dg.OpDefinition:
    @dg.op(
        name=f"destroy_{spec.slug}",
        ins={"after": dg.In(dg.Nothing)} if after else {},
        tags={CLUSTERS_TAG: ",".join(spec.clusters)},
        description=f"pulumi destroy of {spec.key.to_user_string()}'s stack.",
    )
    def _op(context: dg.OpExecutionContext, pulumi: PulumiStacks):
        stack = pulumi.stack_name(spec.key.path)
        try:
            result = pulumi.destroy(stack, context.log)
        except HomelabError as exc:
            raise fail(exc) from exc
        context.log_event(dg.AssetObservation(asset_key=spec.key, metadata=result.metadata()))

    return _op


def build_stack_jobs(clusters: Sequence[StackSpec], links: Sequence[StackSpec]) -> dg.Definitions:
    """The ``preview`` and ``teardown`` jobs over the stacks of ``clusters`` and ``links``."""
    specs = [*clusters, *links]
    previews = [_preview_op(s) for s in specs]

    @dg.job(
        name=PREVIEW_JOB,
        executor_def=STACK_EXECUTOR,
        description="What materialising would change in every stack (pulumi preview).",
    )
    def preview() -> None:
        for op in previews:
            op()

    link_ops = {s.key: _destroy_op(s, after=False) for s in links}
    touching = {
        c.key: [ln.key for ln in links if set(c.clusters) & set(ln.clusters)] for c in clusters
    }
    cluster_ops = {c.key: _destroy_op(c, after=bool(touching[c.key])) for c in clusters}

    @dg.job(
        name=TEARDOWN_JOB,
        executor_def=STACK_EXECUTOR,
        description="Destroy every stack: mesh links first, then the clusters (pulumi destroy).",
    )
    def teardown() -> None:
        gone = {key: op() for key, op in link_ops.items()}
        for key, op in cluster_ops.items():
            if touching[key]:
                op(after=[gone[k] for k in touching[key]])
            else:
                op()

    return dg.Definitions(jobs=[preview, teardown])

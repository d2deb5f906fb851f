"""``vllm_endpoint/<endpoint>``: an OpenAI-compatible vLLM server for a model's weights.

Materialising deploys (or updates) the endpoint for its model's current weights version with
the stack ``<target>.vllm_endpoint.<endpoint>`` (the program of :mod:`infra.endpoint`), waits
until the server's pod serves (failing at once, in the scheduler's or the server's words, when
it cannot be placed or crashes), then checks the server through the API server's
port-forward (:mod:`resources.vllm`). Three blocking checks, one invariant each:

- ``serves_weights``: ``/v1/models`` lists ``<served name>@<digest[:12]>``;
- ``completion_within_budget``: a completion returns tokens within the inventory's
  ``latency_budget_ms`` (the real liveness test: vLLM's health route answers before the first
  request can crash the engine); p50/p95 latency and tokens/s over a few requests;
- ``chat_completion``: a chat completion answers, where the endpoint has a chat template.

**Roll forward and back.** A new current version rolls the endpoint forward. When the new
version's rollout fails or a check fails, the version served before is deployed again and the
failure says so (the checks fail with the reason; the materialisation records what serves).
The config ``serve_version`` serves a named registered version, or ``previous`` (the one
served before the current): ``homelab rollback <endpoint> [VERSION]``.

An endpoint whose model has no version in the weights store, where the deployment cannot
fetch it (the twin, offline: the external Llama), is deployed until the scheduler places its
pod (its scheduling is proven), then scaled to zero; its serving checks are recorded as
skipped (failed with severity WARN, ``skipped: true`` and the reason), never as passed.
"""

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import dagster as dg
from pydantic import Field

from assets._automation import follow_upstream
from assets._keys import cluster_key, endpoint_key, model_weights_key
from assets._stack import STACK_STEP_TAGS, record_preview, step_failure
from homelab_dagster import serving
from homelab_dagster.checks import Verdict
from homelab_dagster.errors import EndpointError, HomelabError
from homelab_dagster.inventory import Cluster, Endpoint, Model
from homelab_dagster.weights import WeightsVersion
from infra.endpoint import (
    ServedWeights,
    endpoint_labels,
    endpoint_program,
    served_names,
    service_url,
)
from resources.kubernetes import KubernetesClusters
from resources.pulumi import Program, PulumiStacks, StackResult
from resources.registry import ImageRegistry
from resources.vllm import Completion, VllmServers
from resources.weights import WeightsStore

__all__ = [
    "CHECKS",
    "FRESHNESS_CHECK",
    "GPUS",
    "GPU_SECONDS_SERVED",
    "SAMPLE_PROMPTS",
    "EndpointConfig",
    "build_endpoint_defs",
    "endpoint_op_name",
    "endpoint_preview_op",
    "gpu_seconds_served",
]

CHECKS = {
    "serves_weights": "/v1/models lists <served name>@<digest>: the server serves exactly the "
    "weights version the asset deployed.",
    "completion_within_budget": "A completion returns tokens within the inventory's "
    "latency_budget_ms; p50/p95 latency and tokens/s over the sample prompts in metadata.",
    "chat_completion": "A chat completion answers through the endpoint's chat template "
    "(where one is set).",
}
# Not blocking (a lagging endpoint still serves): its failure is a warning and an alert.
FRESHNESS_CHECK = "serves_current_version"
FRESHNESS_DESCRIPTION = (
    "The endpoint serves its model's current weights version; failing names both digests and "
    "how long the current one has waited."
)
# A fixed prompt set: the latency figures of two materialisations compare.
SAMPLE_PROMPTS = (
    "When the vllm pod on forge restarts,",
    "Before paging the on-call engineer, check",
    "The mesh link from studio to forge",
    "A training run on forge fails when",
    "To roll back an endpoint,",
)
_MAX_TOKENS = 16
_HISTORY = 20  # versions the stack remembers
_POLL_S = 2.0
GPUS = "gpus"  # metadata: the GPUs the materialised deployment's pods hold
GPU_SECONDS_SERVED = "gpu_seconds_served"  # metadata: what the deployment before it served


class EndpointConfig(dg.Config):
    """Run configuration of ``vllm_endpoint/<endpoint>``."""

    serve_version: str | None = Field(
        default=None,
        description="Serve this registered weights version (a digest, or a unique prefix of "
        "8+ characters) instead of the store's current one; 'previous': the version served "
        "before the current one.",
    )


def gpu_seconds_served(previous: dg.EventLogEntry | None, now: float) -> float:
    """The GPU-seconds the deployment materialised by ``previous`` served until ``now``: its
    ``gpus`` times the seconds since (0.0 where there is none, or it held no GPU)."""
    materialization = previous.asset_materialization if previous else None
    held = materialization.metadata.get(GPUS) if materialization else None
    if previous is None or not isinstance(held, dg.IntMetadataValue) or not held.value:
        return 0.0
    return round(held.value * max(0.0, now - previous.timestamp), 3)


def endpoint_op_name(name: str) -> str:
    """The op of endpoint ``name``'s asset (its run configuration is keyed by it)."""
    return endpoint_key(name).to_python_identifier()


@dataclass
class _Served:
    """What the stack says it serves: the digest and the history (digests, oldest first)."""

    digest: str | None = None
    history: list[str] = field(default_factory=list)


def build_endpoint_defs(
    name: str,
    endpoint: Endpoint,
    model: Model,
    cluster: Cluster,
    export_label: str = "mirror.linkerd.io/exported",
) -> dg.Definitions:
    """The asset of endpoint ``name`` (the mesh links that mirror its Service follow it:
    :func:`assets.mesh.build_mesh_link_defs`)."""
    entry = _EndpointEntry(name, endpoint, model, cluster, export_label)
    key = endpoint_key(name)
    deps = [cluster_key(endpoint.cluster), model_weights_key(endpoint.model)]

    @dg.multi_asset(
        name=endpoint_op_name(name),
        specs=[
            dg.AssetSpec(
                key,
                deps=deps,
                group_name="ml",
                kinds={"vllm", "kubernetes"},
                description=f"{endpoint.model} on {endpoint.cluster}, tensor-parallel "
                f"{endpoint.tensor_parallel_size}, served as "
                f"{endpoint.served_model_name(name)}.",
                metadata={
                    "model": endpoint.model,
                    "cluster": endpoint.cluster,
                    "tensor_parallel_size": endpoint.tensor_parallel_size,
                    "node_port": endpoint.node_port or 0,
                },
                # Rolled forward when its weights (or cluster, or links) change, once each
                # exists and their blocking checks pass (the weights' gate among them).
                automation_condition=follow_upstream(),
            )
        ],
        check_specs=[
            dg.AssetCheckSpec(check, asset=key, blocking=True, description=text)
            for check, text in CHECKS.items()
        ]
        + [
            dg.AssetCheckSpec(
                FRESHNESS_CHECK, asset=key, blocking=False, description=FRESHNESS_DESCRIPTION
            )
        ],
        # The checks can also run alone, on what serves now (select only them).
        can_subset=True,
        op_tags=STACK_STEP_TAGS,
    )
    def _endpoint(
        context: dg.AssetExecutionContext,
        config: EndpointConfig,
        pulumi: PulumiStacks,
        kubernetes: KubernetesClusters,
        vllm: VllmServers,
        weights_store: WeightsStore,
        image_registry: ImageRegistry,
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        selected = {k.name for k in context.selected_asset_check_keys}
        try:
            if key in context.selected_asset_keys:
                # Before anything changes: an image its nodes cannot pull fails the step now.
                for image in vllm.pulled_images(endpoint):
                    image_registry.require(image)
                events = entry.materialise(
                    context.log, context.instance, config, pulumi, kubernetes, vllm, weights_store
                )
            else:
                events = entry.check_serving(pulumi, kubernetes, vllm, weights_store)
            for event in events:
                if isinstance(event, dg.AssetCheckResult) and event.check_name not in selected:
                    continue
                yield event
            if FRESHNESS_CHECK in selected:  # on what is deployed now, whatever happened above
                yield entry.freshness(pulumi, weights_store)
        except HomelabError as exc:
            raise step_failure(exc) from exc

    return dg.Definitions(assets=[_endpoint])


def _unfetchable(version: WeightsVersion | None, vllm: VllmServers) -> bool:
    """The store holds no version and this deployment cannot fetch the model from its hub:
    the endpoint is only scheduled, then scaled to zero."""
    return version is None and not vllm.serves_unstored


def endpoint_preview_op(
    name: str,
    endpoint: Endpoint,
    model: Model,
    cluster: Cluster,
    export_label: str,
    *,
    op_name: str,
    tags: Mapping[str, object],
) -> dg.OpDefinition:
    """The ``preview`` job's op of endpoint ``name`` (assets/jobs.py names and tags it)."""
    entry = _EndpointEntry(name, endpoint, model, cluster, export_label)

    @dg.op(
        name=op_name,
        tags=dict(tags),
        description=f"pulumi preview of {entry.key.to_user_string()}'s stack, for the weights "
        "version materialising would serve.",
    )
    def _op(
        context: dg.OpExecutionContext,
        pulumi: PulumiStacks,
        kubernetes: KubernetesClusters,
        vllm: VllmServers,
        weights_store: WeightsStore,
    ) -> None:
        try:
            stack, result = entry.preview(context.log, pulumi, kubernetes, vllm, weights_store)
        except HomelabError as exc:
            raise step_failure(exc) from exc
        if isinstance(result, str):
            context.log.warning(f"{stack}: not previewed: {result}")
            context.log_event(
                dg.AssetObservation(
                    asset_key=entry.key,
                    metadata={"pulumi_operation": "preview", "not_previewed": result},
                )
            )
            return
        record_preview(context, entry.key, stack, result)

    return _op


class _EndpointEntry:
    """One inventory endpoint, as its asset deploys, checks and rolls it back."""

    def __init__(
        self, name: str, endpoint: Endpoint, model: Model, cluster: Cluster, export_label: str
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.model = model
        self.cluster = cluster
        self.export_label = export_label
        self.key = endpoint_key(name)
        labels = endpoint_labels(name)
        self.selector = ",".join(f"{k}={v}" for k, v in labels.items())

    # ------------------------------------------------------------------ materialise

    def materialise(
        self,
        log: dg.DagsterLogManager,
        instance: dg.DagsterInstance,
        config: EndpointConfig,
        pulumi: PulumiStacks,
        kubernetes: KubernetesClusters,
        vllm: VllmServers,
        store: WeightsStore,
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        stack = pulumi.stack_name(self.key.path)
        before = self._served(pulumi, stack)
        version = self._version(config, store, before)
        if _unfetchable(version, vllm):
            yield from self._schedule_only(log, instance, stack, pulumi, kubernetes, vllm, before)
            return
        digest = version.digest if version else None
        result, rollout = self._deploy(log, stack, pulumi, kubernetes, vllm, version, before)
        verdicts = (
            self._checks(kubernetes, vllm, rollout, digest)
            if rollout.state == "serving"
            else {c: Verdict(False, f"not serving: {rollout.reason}") for c in CHECKS}
        )
        failed = [c for c, v in verdicts.items() if not v.passed]
        restored: str | None = None
        fallback = (
            before.digest
            if before.digest and before.digest != digest
            else serving.previous_version(before.history, digest)
        )
        if failed and fallback:
            why = rollout.reason if rollout.state != "serving" else ", ".join(failed) + " failed"
            log.warning(
                f"{self.name}: version {(digest or '')[:12]} does not serve ({why}); "
                f"restoring {fallback[:12]}"
            )
            previous = store.get(self.endpoint.model, fallback)
            kept = _Served(fallback, [d for d in before.history if d != digest])
            result, rollout = self._deploy(
                log, stack, pulumi, kubernetes, vllm, previous, kept, rolling_back=True
            )
            restored = fallback
            verdicts = {
                c: Verdict(
                    False,
                    f"version {(digest or '')[:12]}: {v.description}; the previous version "
                    f"{restored[:12]} was restored ({rollout.reason})",
                    {**v.metadata, "restored_digest": restored},
                )
                for c, v in verdicts.items()
            }
        elif rollout.state == "failed":
            raise EndpointError(f"{self.key.to_user_string()}: {rollout.reason}")
        yield dg.MaterializeResult(
            asset_key=self.key,
            data_version=dg.DataVersion(restored or digest or "unstored"),
            metadata={
                **self._metadata(result, rollout, store, restored or digest, verdicts, restored),
                **self._gpu_usage(instance, held=True),
            },
        )
        for check, verdict in verdicts.items():
            yield _result(self.key, check, verdict)

    def _version(
        self, config: EndpointConfig, store: WeightsStore, before: _Served
    ) -> WeightsVersion | None:
        """The version to serve: the config's, else the store's current one (None: none)."""
        model = self.endpoint.model
        wanted = config.serve_version
        if wanted == "previous":
            wanted = serving.previous_version(before.history, before.digest)
            if wanted is None:
                raise EndpointError(
                    f"{self.key.to_user_string()}: no version was served before "
                    f"{(before.digest or 'none')[:12]}: nothing to roll back to"
                )
        if wanted:
            version = store.get(model, wanted)
            if not store.verify(model, version.digest):
                raise EndpointError(
                    f"version {version.digest[:12]} of {model} no longer matches its digest"
                )
            return version
        current = store.current(model)
        if current is None and self.model.source == "trained":
            raise EndpointError(
                f"{self.key.to_user_string()}: {model} has no current weights version: "
                f"materialise {model_weights_key(model).to_user_string()} first"
            )
        return current

    def _served(self, pulumi: PulumiStacks, stack: str) -> _Served:
        outputs = pulumi.outputs(stack)
        history = outputs.get("history") or []
        return _Served(outputs.get("weights_digest") or None, [str(d) for d in history])

    def _deploy(
        self,
        log: dg.DagsterLogManager,
        stack: str,
        pulumi: PulumiStacks,
        kubernetes: KubernetesClusters,
        vllm: VllmServers,
        version: WeightsVersion | None,
        before: _Served,
        *,
        rolling_back: bool = False,
        replicas: int | None = None,
        scheduled_is_enough: bool = False,
    ) -> tuple[Any, serving.Rollout]:
        """``pulumi up`` for ``version``, then wait for its rollout."""
        digest = version.digest if version else None
        history = before.history if rolling_back else [*before.history, digest or ""]
        program = self._program(pulumi, kubernetes, vllm, digest, history, replicas)
        result = pulumi.up(stack, program, log)
        if replicas == 0:  # scaled to zero: no rollout to wait for, only its pods to go
            return result, self._scaled_down(log, kubernetes, vllm)
        rollout = self._wait(log, kubernetes, vllm, digest or "", scheduled_is_enough)
        log.info(f"{self.name}: {rollout.state}: {rollout.reason}")
        return result, rollout

    def _program(
        self,
        pulumi: PulumiStacks,
        kubernetes: KubernetesClusters,
        vllm: VllmServers,
        digest: str | None,
        history: list[str],
        replicas: int | None,
    ) -> Program:
        """The stack's program serving ``digest`` (None: the model's hub id), remembering
        ``history`` (digests, oldest first; repeats keep their last place)."""
        history = [d for i, d in enumerate(history) if d and d not in history[i + 1 :]]
        weights = ServedWeights(
            digest,
            f"{self.endpoint.model}/versions/{digest}" if digest else "",
            self.model.base_model or "",
        )
        access = kubernetes.access(self.endpoint.cluster)
        return endpoint_program(
            self.name,
            self.endpoint,
            self.cluster,
            weights,
            vllm.runtime(),
            kubeconfig=access.kubeconfig,
            context=access.context,
            cluster_identifier=f"{pulumi.target}.{self.endpoint.cluster}",
            export_label=self.export_label,
            replicas=replicas,
            history=history[-_HISTORY:],
        )

    # ------------------------------------------------------------------ preview

    def preview(
        self,
        log: dg.DagsterLogManager,
        pulumi: PulumiStacks,
        kubernetes: KubernetesClusters,
        vllm: VllmServers,
        store: WeightsStore,
    ) -> tuple[str, StackResult | str]:
        """``pulumi preview`` of what materialising would deploy now: the store's current
        version (scaled to zero where this deployment cannot fetch the model). Changes
        nothing. Returns the stack's name and Pulumi's plan, or why there is none (a trained
        model with no version yet: ``up`` registers one before it deploys)."""
        stack = pulumi.stack_name(self.key.path)
        if self.model.source == "trained" and store.current(self.endpoint.model) is None:
            return stack, (
                f"{self.endpoint.model} has no weights version yet: materialising "
                f"{model_weights_key(self.endpoint.model).to_user_string()} registers the one "
                "this endpoint would serve"
            )
        before = self._served(pulumi, stack)
        version = self._version(EndpointConfig(), store, before)
        replicas = 0 if _unfetchable(version, vllm) else None  # as _schedule_only ends
        digest = version.digest if version else None
        program = self._program(
            pulumi, kubernetes, vllm, digest, [*before.history, digest or ""], replicas
        )
        return stack, pulumi.preview(stack, program, log)

    def _scaled_down(
        self, log: dg.DagsterLogManager, kubernetes: KubernetesClusters, vllm: VllmServers
    ) -> serving.Rollout:
        """Poll until the endpoint has no pod left (their GPUs given back), or
        ``ready_timeout_s`` passes."""
        deadline = time.monotonic() + vllm.ready_timeout_s
        while pods := kubernetes.pods(
            self.endpoint.cluster, self.endpoint.namespace, self.selector
        ):
            if time.monotonic() > deadline:
                names = ", ".join(p.name for p in pods)
                return serving.Rollout("failed", f"scaled to zero, still running: {names}")
            time.sleep(_POLL_S)
        log.info(f"{self.name}: scaled to zero, no pod left")
        return serving.Rollout("serving", "scaled to zero, no pod left")

    def _wait(
        self,
        log: dg.DagsterLogManager,
        kubernetes: KubernetesClusters,
        vllm: VllmServers,
        digest: str,
        scheduled_is_enough: bool,
    ) -> serving.Rollout:
        """Poll the pods until the rollout serves or fails, or ``ready_timeout_s`` passes.

        A server whose engine was killed by a signal (no error of its own: the node short of
        memory, a native crash) gets the kubelet's restart, once; one that fails with an error
        of its own (a version vLLM cannot load) fails the rollout at once."""
        deadline = time.monotonic() + vllm.ready_timeout_s
        said = ""
        refused_since: float | None = None
        forgiven: dict[str, int] = {}
        while True:
            pods = kubernetes.pods(self.endpoint.cluster, self.endpoint.namespace, self.selector)
            rollout = serving.rollout_state(
                pods, digest, scheduled_is_enough=scheduled_is_enough, restarts_forgiven=forgiven
            )
            refused = rollout.state == "failed" and rollout.pod and rollout.pod.unschedulable
            if refused:
                # GPUs another rollout is giving back (a Recreate, a scaled-down pod) free up
                # in seconds: a refusal stands once it lasts the grace period.
                refused_since = refused_since or time.monotonic()
                if time.monotonic() - refused_since < vllm.unschedulable_grace_s:
                    rollout = serving.Rollout("waiting", rollout.reason, rollout.pod)
            else:
                refused_since = None
            if rollout.state == "failed" and rollout.pod and "crashed" in rollout.reason:
                log_text = kubernetes.pod_log(
                    self.endpoint.cluster, self.endpoint.namespace, rollout.pod.name, tail=400
                )
                cause = serving.crash_cause(log_text)
                reason = f"{rollout.reason}; its log says: {cause}"
                pod = rollout.pod
                if serving.killed_by_signal(cause) and pod.name not in forgiven:
                    log.warning(f"{self.name}: {reason}; waiting for the kubelet's restart, once")
                    forgiven[pod.name] = max(pod.restarts, 1)
                    time.sleep(_POLL_S)
                    continue
                return serving.Rollout("failed", reason, pod)
            if rollout.done:
                return rollout
            if time.monotonic() > deadline:
                return serving.Rollout(
                    "failed",
                    f"not serving after {vllm.ready_timeout_s:.0f} s: {rollout.reason}",
                    rollout.pod,
                )
            if rollout.reason != said:
                log.info(f"{self.name}: {rollout.reason}")
                said = rollout.reason
            time.sleep(_POLL_S)

    def _schedule_only(
        self,
        log: dg.DagsterLogManager,
        instance: dg.DagsterInstance,
        stack: str,
        pulumi: PulumiStacks,
        kubernetes: KubernetesClusters,
        vllm: VllmServers,
        before: _Served,
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        """Prove the scheduling of an endpoint whose weights this deployment cannot fetch:
        deploy until its pod is placed, then scale to zero (its GPUs go back)."""
        _, rollout = self._deploy(
            log, stack, pulumi, kubernetes, vllm, None, before, scheduled_is_enough=True
        )
        if rollout.state != "serving":
            raise EndpointError(f"{self.key.to_user_string()}: {rollout.reason}")
        result, _ = self._deploy(
            log, stack, pulumi, kubernetes, vllm, None, before, replicas=0, scheduled_is_enough=True
        )
        reason = (
            f"skipped: no version of {self.endpoint.model} is in this deployment's weights "
            f"store, and it cannot fetch {self.model.base_model or 'the model'}; its scheduling "
            f"is proven ({rollout.reason}), then it is scaled to zero"
        )
        yield dg.MaterializeResult(
            asset_key=self.key,
            data_version=dg.DataVersion("unstored"),
            metadata={
                **result.metadata(),
                "scheduled_on": rollout.pod.node if rollout.pod and rollout.pod.node else "",
                "serving": False,
                "skipped_reason": reason,
                **self._gpu_usage(instance, held=False),  # scaled to zero: none held
            },
        )
        yield from self._skipped(reason)

    # ------------------------------------------------------------------ checks

    def freshness(self, pulumi: PulumiStacks, store: WeightsStore) -> dg.AssetCheckResult:
        """:data:`FRESHNESS_CHECK`: the version the stack deploys against the store's current
        one (since when it is current: the store's history)."""
        served = self._served(pulumi, pulumi.stack_name(self.key.path)).digest
        current = store.current(self.endpoint.model)
        since = next(
            (
                datetime.fromisoformat(h["set_at"])
                for h in reversed(store.history(self.endpoint.model))
                if current and h["digest"] == current.digest
            ),
            None,
        )
        verdict = serving.serves_current_version(
            served,
            current.digest if current else None,
            since,
            datetime.now(UTC),
            f"materialising {self.key.to_user_string()} (`homelab up`)",
        )
        return _result(self.key, FRESHNESS_CHECK, verdict, severity=dg.AssetCheckSeverity.WARN)

    def _skipped(self, reason: str) -> Iterator[dg.AssetCheckResult]:
        """Every check recorded as skipped: failed at WARN, with ``skipped`` and the reason
        (Dagster has no "skipped" outcome for a check that ran), never passed."""
        skipped = Verdict(False, reason, {"skipped": True, "reason": reason})
        for check in CHECKS:
            yield _result(self.key, check, skipped, severity=dg.AssetCheckSeverity.WARN)

    def check_serving(
        self,
        pulumi: PulumiStacks,
        kubernetes: KubernetesClusters,
        vllm: VllmServers,
        store: WeightsStore,
    ) -> Iterator[dg.AssetCheckResult]:
        """The serving checks alone (a run of the checks only: after a pod was killed, from
        the UI), on the version the stack serves now: nothing is deployed or rolled back, and
        a version whose pod does not serve fails every check with the pod's state."""
        served = self._served(pulumi, pulumi.stack_name(self.key.path)).digest
        if served is None and _unfetchable(store.current(self.endpoint.model), vllm):
            reason = (
                f"skipped: no version of {self.endpoint.model} is in this deployment's weights "
                "store, and it cannot fetch it: its serving cannot be checked here"
            )
            yield from self._skipped(reason)
            return
        if served is None:
            why = "nothing was deployed yet: materialise it first"
            rollout = serving.Rollout("failed", why)
        else:
            pods = kubernetes.pods(self.endpoint.cluster, self.endpoint.namespace, self.selector)
            rollout = serving.rollout_state(pods, served)
            why = f"version {served[:12]} does not serve: {rollout.reason}"
        verdicts = (
            self._checks(kubernetes, vllm, rollout, served)
            if rollout.state == "serving"
            else {c: Verdict(False, why) for c in CHECKS}
        )
        for check, verdict in verdicts.items():
            yield _result(self.key, check, verdict)

    def _checks(
        self,
        kubernetes: KubernetesClusters,
        vllm: VllmServers,
        rollout: serving.Rollout,
        digest: str | None,
    ) -> dict[str, Verdict]:
        """The serving checks, on the pod the rollout found serving."""
        assert rollout.pod is not None
        names = served_names(self.name, self.endpoint, digest)
        budget = self.endpoint.latency_budget_ms
        try:
            with vllm.connect(
                kubernetes, self.endpoint.cluster, self.endpoint.namespace, rollout.pod.name
            ) as client:
                listed = client.models()
                answers = [client.complete(names[0], p, _MAX_TOKENS) for p in SAMPLE_PROMPTS]
                chat = (
                    client.chat(names[0], SAMPLE_PROMPTS[0], _MAX_TOKENS)
                    if self.endpoint.chat_template or self.model.source == "external"
                    else None
                )
        except EndpointError as exc:
            return {c: Verdict(False, f"the server does not answer: {exc}") for c in CHECKS}
        stats = serving.latency_stats(
            [a.latency_s for a in answers], [a.completion_tokens for a in answers]
        )
        first = answers[0]
        completion = serving.within_budget(
            first.text, first.completion_tokens, max(a.latency_s for a in answers), budget
        )
        return {
            "serves_weights": serving.serves_weights(listed, names[-1]),
            "completion_within_budget": Verdict(
                completion.passed,
                completion.description,
                {**completion.metadata, **stats, "ttft_ms": _ms(first)},
            ),
            "chat_completion": (
                serving.chat_answers(chat.text, chat.completion_tokens, chat.latency_s)
                if chat
                else Verdict(
                    True,
                    "no chat template is set and the model has none: chat is not offered",
                    {"chat_template": False},
                )
            ),
        }

    # ------------------------------------------------------------------ metadata

    def _gpu_usage(self, instance: dg.DagsterInstance, *, held: bool) -> dict[str, int | float]:
        """``gpus``: the GPUs this deployment's pods hold (none when ``held`` is False);
        ``gpu_seconds_served``: what the deployment materialised before it served until now."""
        previous = instance.get_latest_materialization_event(self.key)
        return {
            GPUS: self.endpoint.gpus * self.endpoint.replicas if held else 0,
            GPU_SECONDS_SERVED: gpu_seconds_served(previous, time.time()),
        }

    def _metadata(
        self,
        result: Any,
        rollout: serving.Rollout,
        store: WeightsStore,
        digest: str | None,
        verdicts: Mapping[str, Verdict],
        restored: str | None,
    ) -> dict[str, Any]:
        """Provenance (weights, training run, execution, stack update), serving figures, and
        where clients reach it in its cluster (``url``) with a sample answer."""
        version = store.get(self.endpoint.model, digest) if digest else None
        latency = verdicts["completion_within_budget"].metadata
        return {
            **result.metadata(),
            "weights_digest": digest or "",
            "served_names": served_names(self.name, self.endpoint, digest),
            "training_run": (version.source_run if version else None) or "",
            "training_execution_id": (version.execution_id if version else None) or "",
            "weights_uri": version.uri if version else "",
            "pod": rollout.pod.name if rollout.pod else "",
            "node": rollout.pod.node if rollout.pod and rollout.pod.node else "",
            "serving": rollout.state == "serving",
            "url": service_url(self.name, self.endpoint),
            "sample_completion": str(latency.get("sample", "")),
            "rolled_back_to": restored or "",
            **{
                k: latency[k]
                for k in ("latency_p50_ms", "latency_p95_ms", "tokens_per_s")
                if k in latency
            },
        }


def _ms(answer: Completion) -> float:
    return round(answer.first_token_s * 1000, 1)


def _result(
    key: dg.AssetKey,
    check: str,
    verdict: Verdict,
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=check,
        passed=verdict.passed,
        severity=severity,
        description=verdict.description,
        metadata=dict(verdict.metadata),
    )

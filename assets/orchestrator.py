"""``orchestrator``: Dagster itself on the orchestrator's cluster (Studio by default).

Materialising runs ``pulumi up`` on the stack ``<target>.orchestrator`` with the program of
:mod:`infra.orchestrator`: the namespace, the ServiceAccount and Role that dagster-k8s's run
launcher and step executor use, the pods' ``dagster.yaml``, and Dagster's processes (the
official chart on the homelab, plain Deployments on the twin). Where the processes are
plain Deployments, it waits for the webserver to serve. Two blocking checks:

- ``webserver_answers``: the webserver's ``/server_info`` answers through a port-forward;
- ``runs_allowed``: the ServiceAccount may create Jobs and read pods' logs in its
  namespace (the API's own answer, a SubjectAccessReview).
"""

import json
import time
import urllib.request
from collections.abc import Iterator

import dagster as dg

from assets._keys import ORCHESTRATOR_KEY, cluster_key
from assets._stack import STACK_STEP_TAGS, StackConfig, check_result, step_failure
from homelab_dagster.checks import Verdict
from homelab_dagster.errors import HomelabError, KubernetesError
from homelab_dagster.inventory import Orchestrator
from infra.orchestrator import orchestrator_program
from resources.kubernetes import KubernetesClusters
from resources.orchestrator import DagsterOnKubernetes
from resources.pulumi import Program, PulumiStacks
from resources.registry import ImageRegistry

__all__ = ["build_orchestrator_defs"]

_CHECKS = {
    "webserver_answers": "Dagster's webserver answers /server_info through a port-forward.",
    "runs_allowed": "The ServiceAccount may create Jobs and read pods and their logs.",
}
_WEBSERVER_SELECTORS = (
    "app.kubernetes.io/name=dagster-webserver",  # the twin's Deployment
    "component=dagster-webserver",  # the official chart's
)
_READY_TIMEOUT_S = 300


def build_orchestrator_defs(orchestrator: Orchestrator) -> dg.Definitions:
    """The ``orchestrator`` asset and its checks."""
    key = ORCHESTRATOR_KEY

    @dg.multi_asset(
        name="orchestrator",
        specs=[
            dg.AssetSpec(
                key,
                deps=[cluster_key(orchestrator.cluster)],
                group_name="platform",
                kinds={"pulumi", "kubernetes", "dagster"},
                description=f"Dagster on {orchestrator.cluster} (namespace "
                f"{orchestrator.namespace}): its runs and steps run as pods there.",
                skippable=True,
            )
        ],
        check_specs=[
            dg.AssetCheckSpec(check, asset=key, blocking=True, description=text)
            for check, text in _CHECKS.items()
        ],
        can_subset=True,
        op_tags=STACK_STEP_TAGS,
    )
    def _orchestrator(
        context: dg.AssetExecutionContext,
        config: StackConfig,
        pulumi: PulumiStacks,
        kubernetes: KubernetesClusters,
        dagster_on_kubernetes: DagsterOnKubernetes,
        image_registry: ImageRegistry,
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        entry = _Orchestrator(orchestrator.cluster, dagster_on_kubernetes)
        if key in context.selected_asset_keys:
            try:
                # Before anything changes: an image its nodes cannot pull fails the step now.
                image_registry.require(dagster_on_kubernetes.image)
                yield entry.provision(context.log, config, pulumi, kubernetes)
            except HomelabError as exc:
                raise step_failure(exc) from exc
        selected = {k.name for k in context.selected_asset_check_keys}
        yield from entry.check_results(selected, kubernetes)

    return dg.Definitions(assets=[_orchestrator])


class _Orchestrator:
    def __init__(self, cluster: str, dagster: DagsterOnKubernetes) -> None:
        self.cluster = cluster
        self.dagster = dagster

    def program(self, pulumi: PulumiStacks, kubernetes: KubernetesClusters) -> Program:
        access = kubernetes.access(self.cluster)
        return orchestrator_program(
            self.dagster.orchestrator_spec(),
            cluster_identifier=f"{pulumi.target}.{self.cluster}",
            kubeconfig=access.kubeconfig,
            context=access.context,
        )

    def provision(
        self,
        log: dg.DagsterLogManager,
        config: StackConfig,
        pulumi: PulumiStacks,
        kubernetes: KubernetesClusters,
    ) -> dg.MaterializeResult:
        stack = pulumi.stack_name(ORCHESTRATOR_KEY.path)
        result = pulumi.up(stack, self.program(pulumi, kubernetes), log, refresh=config.refresh)
        log.info(f"{stack}: {result.changed} change(s) in {result.duration_s:.1f} s")
        pod = self.wait_for_webserver(kubernetes, log)
        return dg.MaterializeResult(
            asset_key=ORCHESTRATOR_KEY,
            metadata={
                **result.metadata(),
                "namespace": self.dagster.namespace,
                "image": self.dagster.image,
                "deploy": self.dagster.deploy,
                "webserver_pod": pod,
            },
        )

    def webserver_pod(self, kubernetes: KubernetesClusters) -> str | None:
        """The name of a Ready webserver pod (not one being replaced), or None.

        Raises:
            KubernetesError: the pods cannot be listed.
        """
        for selector in _WEBSERVER_SELECTORS:
            for pod in kubernetes.pods(self.cluster, self.dagster.namespace, selector):
                if pod.ready and not pod.deleting:
                    return pod.name
        return None

    def wait_for_webserver(self, kubernetes: KubernetesClusters, log: dg.DagsterLogManager) -> str:
        """Wait until a webserver pod answers (a rollout replaces the pod: the old one may
        still be listed, or answer no more); the pod's name."""
        deadline = time.monotonic() + _READY_TIMEOUT_S
        log.info(f"waiting for Dagster's webserver in {self.cluster}/{self.dagster.namespace}")
        while not (verdict := self._webserver_answers(kubernetes)).passed:
            if time.monotonic() > deadline:
                raise KubernetesError(
                    f"cluster {self.cluster}: Dagster's webserver does not answer after "
                    f"{_READY_TIMEOUT_S} s: {verdict.description} "
                    f"(kubectl -n {self.dagster.namespace} describe pods)"
                )
            time.sleep(3)
        return str(verdict.metadata["webserver_pod"])

    def check_results(
        self, selected: set[str], kubernetes: KubernetesClusters
    ) -> Iterator[dg.AssetCheckResult]:
        verdicts = {
            "webserver_answers": lambda: self._webserver_answers(kubernetes),
            "runs_allowed": lambda: self._runs_allowed(kubernetes),
        }
        for check in _CHECKS:
            if check in selected:
                try:
                    verdict = verdicts[check]()
                except KubernetesError as exc:
                    verdict = Verdict(False, str(exc))
                yield check_result(ORCHESTRATOR_KEY, check, verdict)

    def _webserver_answers(self, kubernetes: KubernetesClusters) -> Verdict:
        pod = self.webserver_pod(kubernetes)
        if pod is None:
            return Verdict(False, f"no Ready webserver pod in {self.dagster.namespace}")
        port = self.dagster.webserver_port
        with kubernetes.port_forward(self.cluster, self.dagster.namespace, pod, port) as local:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{local}/server_info", timeout=30
                ) as response:
                    info = json.loads(response.read())
            except (OSError, ValueError) as exc:
                return Verdict(False, f"webserver pod {pod}: /server_info failed: {exc}")
        version = info.get("dagster_webserver_version") or info.get("dagit_version")
        return Verdict(
            bool(version),
            f"webserver pod {pod} answers: dagster-webserver {version}",
            {"webserver_pod": pod, "webserver_version": str(version)},
        )

    def _runs_allowed(self, kubernetes: KubernetesClusters) -> Verdict:
        from kubernetes import client

        api = client.AuthorizationV1Api(kubernetes.api_client(self.cluster))
        user = f"system:serviceaccount:{self.dagster.namespace}:{self.dagster.service_account}"
        wanted = [("batch", "jobs", "create", ""), ("", "pods", "get", "log")]
        denied = []
        for group, resource, verb, sub in wanted:
            review = client.V1SubjectAccessReview(
                spec=client.V1SubjectAccessReviewSpec(
                    user=user,
                    resource_attributes=client.V1ResourceAttributes(
                        group=group,
                        resource=resource,
                        verb=verb,
                        subresource=sub or None,
                        namespace=self.dagster.namespace,
                    ),
                )
            )
            try:
                answer = api.create_subject_access_review(review)
            except Exception as exc:
                raise KubernetesError(f"cluster {self.cluster}: access review: {exc}") from exc
            if not answer.status.allowed:
                denied.append(f"{verb} {resource}{'/' + sub if sub else ''}")
        if denied:
            return Verdict(False, f"{user} may not: {', '.join(denied)}")
        return Verdict(True, f"{user} may create Jobs and read pods and their logs")

"""Training runs as pods on their cluster's GPU nodes, launched with dagster-k8s's Pipes client.

:class:`PodTrainingLauncher` is the :class:`~resources.training.TrainingLauncher` of both
targets (the homelab may choose Flyte instead: ``ml.launcher``). For one run it:

1. stores the corpus in the weights store (``_corpora/<digest>``, once per content);
2. writes the Secret ``training-weights-store`` in the run's namespace from the keys this
   process reaches the store with (the same on both targets);
3. runs one pod (:func:`training_pod`) through :class:`dagster_k8s.PipesK8sClient`: the
   training image; its init container ``fetch-corpus`` copies the corpus from the store,
   verifying every file (:mod:`resources.weights_copy`); then
   ``torchrun --nproc-per-node=<gpus_per_node>`` over :mod:`resources.training_task`; a
   node selector on the run's ``node_role`` and tolerations for its taints,
   ``nvidia.com/gpu`` = ``gpus_per_node`` and the run's memory, in the run's namespace
   (``ml-training``, where the inventory's GPU quota applies); rank 0's log lines and result
   arrive in Dagster as they are written;
4. returns the outcome: the weights already in the store, the pod, its node, the ranks and the
   GPU-seconds (GPUs held x the seconds its container ran).

What the Pipes client does not say, the launcher's watch does (:class:`_PodWatch`), in the
cluster's own words: a pod the scheduler cannot place fails the step after
``unschedulable_grace_s`` with the scheduler's message; a quota that refuses it, with the
quota's; an image that cannot be pulled, a Secret it names that is missing, an init container
that fails (the client waits for ever: dagster-io/dagster#32428); a kubelet that cannot set the
placed pod up (its sandbox, a volume: the pod stays Pending) past the same grace; a pod deleted
under it (the client waits for ever: dagster-io/dagster#22453); a container killed (out of
memory, a signal). The pod is deleted when the step ends, however it ends (a terminated Dagster
run included), within seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import dagster as dg
from pydantic import Field

from homelab_dagster.errors import TrainingError
from homelab_dagster.ml.spec import EvalReport, TrainOptions, TrainReport, from_dict
from resources.kubernetes import KubernetesClusters
from resources.training import TrainingLaunch, TrainingLauncher, TrainingOutcome
from resources.training_task import REQUEST_VAR, RESULT_MESSAGE, WORK_DIR_VAR
from resources.weights import WeightsStore

__all__ = ["STORE_SECRET", "PodTrainingLauncher", "training_pod"]

GPU_RESOURCE = "nvidia.com/gpu"
# The Secret with the store's keys in the run's namespace (keys AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY), written by the launcher before each pod.
STORE_SECRET = "training-weights-store"
CONTAINER = "train"
_WORK = "/work"
# Waiting reasons after which a container will not start without someone's help.
_STUCK = {
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerError",
    "CreateContainerConfigError",  # a Secret or key it names is missing
}
# The kubelet's warnings while it cannot set a placed pod up (no container's waiting reason
# says so: the pod just stays Pending): its sandbox (a pause image gone, the network), a volume.
_SETUP_FAILURES = {"FailedCreatePodSandBox", "FailedMount", "FailedAttachVolume"}
# The kubelet's events that say it got further (its other warnings, MissingClusterDNS say,
# come with every try and say nothing of progress).
_SETUP_PROGRESS = {"Pulling", "Pulled", "Created", "Started"}


def training_pod(
    launch: TrainingLaunch,
    *,
    image: str,
    request: dict[str, Any],
    corpus_uri: str,
    memory: str,
    node_selector: dict[str, str],
    threads: int,
    hf_token_secret: str | None,
    timeout_s: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pod's metadata and spec (as ``PipesK8sClient.run`` takes them) for ``launch``."""
    gpus = launch.gpu.gpus_per_node
    env: list[dict[str, Any]] = [
        {"name": REQUEST_VAR, "value": json.dumps(request, sort_keys=True)},
        {"name": WORK_DIR_VAR, "value": _WORK},
        {"name": "OMP_NUM_THREADS", "value": str(threads)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        {"name": "HOME", "value": f"{_WORK}/home"},
        *(
            {
                "name": name,
                "valueFrom": {"secretKeyRef": {"name": STORE_SECRET, "key": name}},
            }
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        ),
    ]
    if hf_token_secret:
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": hf_token_secret, "key": "token"}},
            }
        )
    else:
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    labels = {
        "app.kubernetes.io/name": "homelab-training",
        "app.kubernetes.io/managed-by": "homelab-dagster",
        "homelab.dev/training-run": launch.run,
        "homelab.dev/model": launch.spec.model,
    }
    command = [
        "torchrun",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={gpus}",
        "-m",
        "resources.training_task",
    ]
    fetch = {
        "name": "fetch-corpus",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": [
            "python",
            "-m",
            "resources.weights_copy",
            "--what=corpus",
            f"--endpoint-url={request['store']['endpoint_url']}",
            corpus_uri,
            f"{_WORK}/corpus",
        ],
        "env": [e for e in env if e["name"].startswith("AWS_")],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "work", "mountPath": _WORK}],
    }
    spec = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": int(timeout_s),
        "terminationGracePeriodSeconds": 5,
        "nodeSelector": node_selector,
        "tolerations": launch.tolerations,
        "initContainers": [fetch],
        "containers": [
            {
                "name": CONTAINER,
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": command,
                "env": env,
                "resources": {
                    "requests": {"memory": memory, GPU_RESOURCE: str(gpus)},
                    "limits": {"memory": memory, GPU_RESOURCE: str(gpus)},
                },
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "volumeMounts": [
                    {"name": "work", "mountPath": _WORK},
                    {"name": "shm", "mountPath": "/dev/shm"},
                ],
            }
        ],
        "volumes": [
            {"name": "work", "emptyDir": {}},
            # NCCL (and torch's worker processes) exchange through shared memory.
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
        ],
    }
    return {"labels": labels}, spec


class PodTrainingLauncher(TrainingLauncher):
    """Trains in a pod on the run's cluster: torchrun over every GPU the pod reserves."""

    image: str = Field(description="The training image (the project with its ml extra).")
    kubernetes: KubernetesClusters
    weights_store: WeightsStore
    store_endpoint_url: str = Field(description="The store's S3 endpoint as pods reach it.")
    namespace: str = Field(default="ml-training", description="Where the training pods run.")
    memory: str | None = Field(
        default=None,
        description="Each pod's memory instead of the run's (the twin: its real nodes have "
        "this machine's memory, not the inventory's).",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Labels the pod's node must have besides its role (the twin: a real node).",
    )
    threads: int = Field(default=1, ge=1, description="CPU threads per rank (OMP_NUM_THREADS).")
    hf_token_secret: str | None = Field(
        default=None,
        description="A Secret in the namespace whose key `token` is the Hugging Face token a "
        "gated base model needs (set: the pod may reach the hub; unset: offline).",
    )
    compile_model: bool = Field(default=False, description="torch.compile (CUDA only).")
    unschedulable_grace_s: float = Field(default=60.0, gt=0)
    timeout_s: float = Field(default=6 * 3600.0, gt=0)
    poll_s: float = Field(default=1.0, gt=0)

    def launch(self, context: dg.AssetExecutionContext, launch: TrainingLaunch) -> TrainingOutcome:
        """Run ``launch`` in a pod and wait; the weights are in the store when it returns.

        Raises:
            TrainingError: the pod could not be created, placed or started, failed, was
                deleted, or reported no result; the message is the cluster's or the pod's.
        """
        from kubernetes.client.exceptions import ApiException

        if launch.gpu.nodes > 1:
            raise TrainingError(
                f"{launch.run}: asks {launch.gpu.nodes} nodes; a training pod spans one node "
                "(torchrun's rendezvous across pods is not built: docs/training.md)"
            )
        log = context.log
        corpus_uri = self.weights_store.stage_corpus(launch.corpus)
        self._write_store_secret(launch.cluster)
        cuda = bool(launch.gpu.product) and not self.scaled_down
        options = TrainOptions(
            device="cuda" if cuda else "cpu",
            precision="bf16" if cuda else "fp32",
            log_every=10 if self.scaled_down else 50,
            threads=self.threads,
            compile=self.compile_model and cuda,
        )
        request = {
            "run": launch.run,
            "model": launch.spec.model,
            "spec": asdict(launch.spec),
            "options": asdict(options),
            "store": {"bucket": self.weights_store.bucket, "endpoint_url": self.store_endpoint_url},
        }
        meta, spec = training_pod(
            launch,
            image=self.image,
            request=request,
            corpus_uri=corpus_uri,
            memory=self.memory or launch.gpu.memory,
            node_selector={"role": launch.node_role, **self.node_selector},
            threads=self.threads,
            hf_token_secret=self.hf_token_secret,
            timeout_s=self.timeout_s,
        )
        access = self.kubernetes.access(launch.cluster)
        watch = _PodWatch(self.kubernetes, launch, self.namespace, self.unschedulable_grace_s, log)
        client = _watched_client(
            watch,
            kubeconfig_file=access.kubeconfig,
            kube_context=access.context,
            poll_interval=self.poll_s,
        )
        log.info(
            f"training {launch.run} in a pod on {launch.cluster}/{self.namespace} "
            f"({launch.gpu.describe()}, {launch.gpu.gpus_per_node} rank(s)), image {self.image}"
        )
        started = time.monotonic()
        try:
            invocation = client.run(
                context=context,
                namespace=self.namespace,
                base_pod_meta=meta,
                base_pod_spec=spec,
                pod_wait_timeout=self.timeout_s,
                delete_pod_on_completion=False,
            )
        except ApiException as exc:
            raise TrainingError(
                f"{launch.run}: the cluster refused the pod: {_reason(exc)}"
            ) from exc
        except TrainingError:
            raise
        except Exception as exc:  # dagster-k8s's own errors (DagsterK8sError, timeouts)
            raise TrainingError(f"{launch.run}: {watch.describe() or exc}") from exc
        finally:
            watch.delete()
        results = [
            m[RESULT_MESSAGE] for m in invocation.get_custom_messages() if RESULT_MESSAGE in m
        ]
        if not results:
            raise TrainingError(f"{launch.run}: pod {watch.pod} ended without reporting a result")
        result = results[-1]
        return TrainingOutcome(
            execution_id=watch.pod or launch.run,
            execution_url=f"kubernetes://{launch.cluster}/{self.namespace}/pods/{watch.pod}",
            weights_uri=result["weights_uri"],
            weights_digest=result["digest"],
            weights_size_bytes=int(result["size_bytes"]),
            train=from_dict(TrainReport, result["train"]),
            evaluation=from_dict(EvalReport, result["evaluation"]),
            duration_s=time.monotonic() - started,
            pod=watch.pod,
            node=watch.node,
            world_size=int(result["world_size"]),
            gpu_seconds=watch.gpu_seconds(launch.gpu.gpus_per_node * launch.gpu.nodes),
        )

    def _write_store_secret(self, cluster: str) -> None:
        """The store's keys as the Secret the pod reads (created or replaced)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        key, secret = self.weights_store.access_keys()
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": STORE_SECRET,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/managed-by": "homelab-dagster"},
            },
            "type": "Opaque",
            "stringData": {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret},
        }
        core = client.CoreV1Api(self.kubernetes.api_client(cluster))
        try:
            try:
                core.replace_namespaced_secret(STORE_SECRET, self.namespace, body)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                core.create_namespaced_secret(self.namespace, body)
        except ApiException as exc:
            raise TrainingError(
                f"cannot write the Secret {self.namespace}/{STORE_SECRET} on {cluster}: "
                f"{_reason(exc)}"
            ) from None


def _reason(exc: Any) -> str:
    """The API server's message of an ``ApiException`` (its Status body), else its reason."""
    try:
        return str(json.loads(exc.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(getattr(exc, "reason", exc))


def _raise_if_stuck(pod_name: str, status: Any) -> None:
    """Fail when ``status`` (a container's or an init container's) waits for what will not come
    by itself (:data:`_STUCK`): the client would wait for ever."""
    waiting = status.state.waiting
    if waiting is not None and waiting.reason in _STUCK:
        raise TrainingError(
            f"pod {pod_name}: {status.name} cannot start: {waiting.reason}: "
            f"{waiting.message or ''}".rstrip(": ")
        )


class _PodWatch:
    """Reads the training pod's state the Pipes client does not act on, and deletes it."""

    def __init__(
        self,
        kubernetes: KubernetesClusters,
        launch: TrainingLaunch,
        namespace: str,
        grace_s: float,
        log: Any,
    ) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(kubernetes.api_client(launch.cluster))
        self.namespace, self.grace_s, self.log = namespace, grace_s, log
        self.pod: str | None = None
        self.node: str | None = None
        self._ran: tuple[float, float] | None = None
        self._last: Any = None

    def _read(self) -> Any:
        from kubernetes.client.exceptions import ApiException

        assert self.pod is not None
        try:
            self._last = self.core.read_namespaced_pod(
                self.pod, self.namespace, _request_timeout=10
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            return None
        return self._last

    def until_running(self, pod_name: str, poll_s: float) -> None:
        """Wait until the training container runs (or has ended); fail, in the cluster's words,
        when it will not: unschedulable past the grace, an init container or image pull that
        failed, the pod deleted or failed before it started."""
        self.pod = pod_name
        created = time.monotonic()
        said = ""
        while True:
            pod = self._read()
            if pod is None:
                raise TrainingError(f"pod {pod_name} was deleted before it started")
            self.node = pod.spec.node_name or self.node
            if pod.status.phase in ("Succeeded", "Failed"):
                return
            for status in pod.status.init_container_statuses or []:
                ended = status.state.terminated
                if ended is not None and ended.exit_code != 0:
                    raise TrainingError(
                        f"pod {pod_name}: init container {status.name} failed "
                        f"({ended.reason}, exit {ended.exit_code}): {(ended.message or '').strip()}"
                    )
                _raise_if_stuck(pod_name, status)
            for status in pod.status.container_statuses or []:
                if status.state.running is not None or status.state.terminated is not None:
                    return
                _raise_if_stuck(pod_name, status)
            scheduled = next(
                (c for c in pod.status.conditions or [] if c.type == "PodScheduled"), None
            )
            if scheduled is not None and scheduled.status == "False":
                message = f"{scheduled.reason}: {scheduled.message}"
                if message != said:
                    self.log.warning(f"pod {pod_name} is not placed yet: {message}")
                    said = message
                if time.monotonic() - created > self.grace_s:
                    raise TrainingError(
                        f"pod {pod_name} could not be placed on any node in {self.grace_s:.0f} s: "
                        f"{scheduled.message}"
                    )
            elif self.node and time.monotonic() - created > self.grace_s:
                failing = self._setup_failure()
                if failing is not None:
                    raise TrainingError(
                        f"pod {pod_name} is on {self.node}, whose kubelet cannot set it up "
                        f"({failing.count or 1} tries): {failing.reason}: {failing.message}"
                    )
            time.sleep(poll_s)

    def _setup_failure(self) -> Any:
        """The kubelet's warning that it cannot set the pod up (:data:`_SETUP_FAILURES`) where
        it has not got further since (:data:`_SETUP_PROGRESS`: an image pulling, a container
        made); None where it has said nothing of the kind."""
        events = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={self.pod}", _request_timeout=10
        ).items

        def seen(event: Any) -> float:
            when = event.last_timestamp or event.event_time or event.metadata.creation_timestamp
            return when.timestamp() if when is not None else 0.0

        kubelet = [
            e
            for e in events
            if (e.source and e.source.component) == "kubelet"
            and e.reason in _SETUP_FAILURES | _SETUP_PROGRESS
        ]
        latest = max(kubelet, key=seen, default=None)
        return latest if latest is not None and latest.reason in _SETUP_FAILURES else None

    def after_logs(self) -> None:
        """Once the log stream ended: fail, saying why, when the container did not succeed
        (deleted, killed, out of memory, an error); record how long it ran."""
        assert self.pod is not None
        pod = self._read()
        if pod is None or pod.metadata.deletion_timestamp is not None:
            raise TrainingError(
                f"pod {self.pod} was deleted while it ran (not by this run: `kubectl get events "
                f"-n {self.namespace}` says by what)"
            )
        for _ in range(20):  # the log ends a moment before the kubelet reports the exit
            status = next(
                (s for s in pod.status.container_statuses or [] if s.name == CONTAINER), None
            )
            if status is not None and status.state.terminated is not None:
                break
            time.sleep(0.5)
            pod = self._read() or pod
        else:
            return  # still running (the log stream broke): the client's own wait goes on
        ended = status.state.terminated
        if ended.started_at and ended.finished_at:
            self._ran = (ended.started_at.timestamp(), ended.finished_at.timestamp())
        if ended.exit_code == 0:
            return
        why = {
            "OOMKilled": "killed: out of memory (its limit is the run's memory)",
            "Error": f"exited with status {ended.exit_code}",
        }.get(ended.reason or "", f"{ended.reason} (exit {ended.exit_code})")
        if ended.exit_code in (137, 143) and ended.reason != "OOMKilled":
            why = f"killed by signal {ended.exit_code - 128}"
        last = (ended.message or "").strip().splitlines()
        raise TrainingError(
            f"pod {self.pod} on {self.node}: {why}" + (f": {last[-1]}" if last else "")
        )

    def gpu_seconds(self, gpus: int) -> float:
        """GPUs held x the seconds the training container ran."""
        return round(gpus * (self._ran[1] - self._ran[0]), 1) if self._ran else 0.0

    def describe(self) -> str:
        """What the pod's last state says, for an error the client raised."""
        pod = self._last
        if pod is None:
            return ""
        statuses = [f"{s.name}: {s.state.to_dict()}" for s in pod.status.container_statuses or []]
        return f"pod {self.pod} is {pod.status.phase}; " + "; ".join(statuses)

    def delete(self) -> None:
        """Delete the pod (its containers get 5 s to stop) and wait until it is gone."""
        from kubernetes.client.exceptions import ApiException

        if self.pod is None:
            return
        try:
            self.core.delete_namespaced_pod(
                self.pod, self.namespace, grace_period_seconds=5, _request_timeout=10
            )
        except ApiException as exc:
            if exc.status != 404:
                self.log.error(f"could not delete pod {self.pod}: {_reason(exc)}")
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._read() is not None:
            time.sleep(0.5)


def _watched_client(watch: _PodWatch, **kwargs: Any) -> Any:
    """A ``PipesK8sClient`` whose log consumption the watch frames (see the module)."""
    from dagster_k8s import PipesK8sClient

    class WatchedPipesK8sClient(PipesK8sClient):
        @contextmanager
        def consume_pod_logs(  # type: ignore[override]
            self, context: Any, client: Any, namespace: str, pod_name: str, **more: Any
        ) -> Iterator[None]:
            watch.until_running(pod_name, self.poll_interval)
            with super().consume_pod_logs(context, client, namespace, pod_name, **more):
                pass
            watch.after_logs()
            yield

    return WatchedPipesK8sClient(**kwargs)

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
   arrive in Dagster as they are written. A run over several nodes (``nodes > 1``) is that
   pod as torchrun's node rank 0 plus one pod per other node, made by the watch once rank 0
   has an address and meeting it there (torchrun's static rendezvous at its pod IP);
4. returns the outcome: the weights already in the store, the pod, its node (and every node
   of the run), the ranks and the GPU-seconds (GPUs held x the seconds each pod's container
   ran).

What the Pipes client does not say, the launcher's watch does (:class:`_PodWatch`), in the
cluster's own words: a pod the scheduler cannot place fails the step after
``unschedulable_grace_s`` with the scheduler's message; a quota that refuses it, with the
quota's; an image that cannot be pulled, a Secret it names that is missing, an init container
that fails (the client waits for ever: dagster-io/dagster#32428); a kubelet that cannot set the
placed pod up (its sandbox, a volume: the pod stays Pending) past the same grace; a pod deleted
under it (the client waits for ever: dagster-io/dagster#22453); a container killed (out of
memory, a signal); a worker pod of a run over several nodes that fails or is deleted (rank 0 is
stopped, the step fails naming the worker). The pods are deleted when the step ends, however
it ends (a terminated Dagster run included), within seconds.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
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

__all__ = ["RENDEZVOUS_PORT", "STORE_SECRET", "PodTrainingLauncher", "training_pod"]

GPU_RESOURCE = "nvidia.com/gpu"
# The Secret with the store's keys in the run's namespace (keys AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY), written by the launcher before each pod.
STORE_SECRET = "training-weights-store"
CONTAINER = "train"
# Where node rank 0's torchrun listens for the other pods of a run over several nodes.
RENDEZVOUS_PORT = 29500
NODE_RANK_LABEL = "homelab.dev/node-rank"
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
    node_rank: int = 0,
    rendezvous: str = "$(POD_IP)",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metadata and spec (as ``PipesK8sClient.run`` takes them) of the pod of ``launch``
    that is torchrun's node ``node_rank``.

    One node: torchrun ``--standalone``. Several: torchrun's static rendezvous at
    ``rendezvous`` (node rank 0's pod IP; rank 0 itself names its own, ``$(POD_IP)``), port
    :data:`RENDEZVOUS_PORT`, and the scheduler asked to put the run's pods on different nodes.
    """
    gpus, nodes = launch.gpu.gpus_per_node, launch.gpu.nodes
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
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
        NODE_RANK_LABEL: str(node_rank),
    }
    if nodes == 1:
        where = ["--standalone", "--nnodes=1"]
    else:
        where = [
            f"--nnodes={nodes}",
            f"--node-rank={node_rank}",
            f"--master-addr={rendezvous}",
            f"--master-port={RENDEZVOUS_PORT}",
        ]
    command = ["torchrun", *where, f"--nproc-per-node={gpus}", "-m", "resources.training_task"]
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
    spec: dict[str, Any] = {
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
    if nodes > 1:
        # A node each where the nodes allow; where one node has room for two (the twin's one
        # real training node), the scheduler may pack them.
        spec["affinity"] = {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "labelSelector": {
                                "matchLabels": {"homelab.dev/training-run": launch.run}
                            },
                            "topologyKey": "kubernetes.io/hostname",
                        },
                    }
                ]
            }
        }
        if node_rank == 0:
            spec["containers"][0]["ports"] = [
                {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}
            ]
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

        def pod(node_rank: int = 0, rendezvous: str = "$(POD_IP)") -> tuple[dict, dict]:
            return training_pod(
                launch,
                image=self.image,
                request=request,
                corpus_uri=corpus_uri,
                memory=self.memory or launch.gpu.memory,
                node_selector={"role": launch.node_role, **self.node_selector},
                threads=self.threads,
                hf_token_secret=self.hf_token_secret,
                timeout_s=self.timeout_s,
                node_rank=node_rank,
                rendezvous=rendezvous,
            )

        meta, spec = pod()
        access = self.kubernetes.access(launch.cluster)
        watch = _PodWatch(
            self.kubernetes,
            launch,
            self.namespace,
            self.unschedulable_grace_s,
            log,
            workers=(
                (lambda address: [pod(rank, address) for rank in range(1, launch.gpu.nodes)])
                if launch.gpu.nodes > 1
                else None
            ),
        )
        client = _watched_client(
            watch,
            kubeconfig_file=access.kubeconfig,
            kube_context=access.context,
            poll_interval=self.poll_s,
        )
        pods = f"{launch.gpu.nodes} pods" if launch.gpu.nodes > 1 else "a pod"
        log.info(
            f"training {launch.run} in {pods} on {launch.cluster}/{self.namespace} "
            f"({launch.gpu.describe()}, {launch.gpu.nodes * launch.gpu.gpus_per_node} rank(s)), "
            f"image {self.image}"
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
            nodes=tuple(watch.nodes()),
            gpu_seconds=watch.gpu_seconds(launch.gpu.gpus_per_node),
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


def _trainer(pod: Any) -> Any:
    """The training container's status in ``pod``, None before the kubelet reports it."""
    return next((s for s in pod.status.container_statuses or [] if s.name == CONTAINER), None)


def _ending(pod_name: str, node: str | None, ended: Any) -> str:
    """Why a training container that ended (``ended``: its terminated state) did not succeed:
    out of memory, a signal, or its exit status, with its last line."""
    why = {
        "OOMKilled": "killed: out of memory (its limit is the run's memory)",
        "Error": f"exited with status {ended.exit_code}",
    }.get(ended.reason or "", f"{ended.reason} (exit {ended.exit_code})")
    if ended.exit_code in (137, 143) and ended.reason != "OOMKilled":
        why = f"killed by signal {ended.exit_code - 128}"
    last = (ended.message or "").strip().splitlines()
    return f"pod {pod_name} on {node}: {why}" + (f": {last[-1]}" if last else "")


class _PodWatch:
    """Reads the state of the run's pods that the Pipes client does not act on, and deletes
    them.

    The Pipes client creates node rank 0's pod and streams its log. A run over several nodes
    has its other pods (``workers``: given rank 0's address, their metadata and spec) created
    here once rank 0 has an address, owned by rank 0's pod, and watched while rank 0 trains: a
    worker that fails or is deleted stops rank 0 (its collectives would wait for the lost rank
    until their timeout) and fails the step naming the worker.
    """

    def __init__(
        self,
        kubernetes: KubernetesClusters,
        launch: TrainingLaunch,
        namespace: str,
        grace_s: float,
        log: Any,
        workers: Callable[[str], list[tuple[dict[str, Any], dict[str, Any]]]] | None = None,
    ) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(kubernetes.api_client(launch.cluster))
        self.namespace, self.grace_s, self.log = namespace, grace_s, log
        self._workers = workers
        self.pod: str | None = None  # node rank 0's
        self.node: str | None = None
        self._placed: dict[str, str | None] = {}  # every pod of the run: its node
        self._seen: dict[str, float] = {}
        self._said: dict[str, str] = {}
        self._ran: dict[str, tuple[float, float]] = {}
        self._last: Any = None
        self._worker_failure: str | None = None
        self._stop = threading.Event()

    def _read(self, name: str) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            pod = self.core.read_namespaced_pod(name, self.namespace, _request_timeout=10)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return None
        if name == self.pod:
            self._last = pod
        return pod

    def until_running(self, pod_name: str, poll_s: float) -> None:
        """Wait until every pod's training container runs (or rank 0's has ended), creating
        the workers once rank 0 has an address; fail, in the cluster's words, when one will
        not: unschedulable past the grace, an init container or image pull that failed, a
        kubelet that cannot set it up, the pod deleted or failed before it started."""
        self.pod = pod_name
        self._placed[pod_name] = None
        while True:
            started = [self._started(name) for name in list(self._placed)]
            if self._workers is not None and self._last is not None and self._last.status.pod_ip:
                self._create_workers(self._workers(self._last.status.pod_ip))
                self._workers = None
                continue
            if all(started) and self._workers is None:
                return
            time.sleep(poll_s)

    def _started(self, name: str) -> bool:
        """Whether pod ``name``'s training container runs or has ended (rank 0's: whichever
        way; a worker's: successfully); raises where it will not start by itself."""
        pod = self._read(name)
        if pod is None:
            raise TrainingError(f"pod {name} was deleted before it started")
        node = self._placed[name] = pod.spec.node_name or self._placed[name]
        if name == self.pod:
            self.node = node
        for status in pod.status.init_container_statuses or []:
            ended = status.state.terminated
            if ended is not None and ended.exit_code != 0:
                raise TrainingError(
                    f"pod {name}: init container {status.name} failed "
                    f"({ended.reason}, exit {ended.exit_code}): {(ended.message or '').strip()}"
                )
            _raise_if_stuck(name, status)
        trainer = _trainer(pod)
        if trainer is not None:
            ended = trainer.state.terminated
            if ended is not None and ended.exit_code != 0 and name != self.pod:
                raise TrainingError(_ending(name, node, ended))
            if trainer.state.running is not None or ended is not None:
                return True
            _raise_if_stuck(name, trainer)
        if pod.status.phase in ("Succeeded", "Failed"):
            return True  # rank 0: the log and after_logs say how
        waited = time.monotonic() - self._seen.setdefault(name, time.monotonic())
        scheduled = next((c for c in pod.status.conditions or [] if c.type == "PodScheduled"), None)
        if scheduled is not None and scheduled.status == "False":
            message = f"{scheduled.reason}: {scheduled.message}"
            if message != self._said.get(name):
                self.log.warning(f"pod {name} is not placed yet: {message}")
                self._said[name] = message
            if waited > self.grace_s:
                raise TrainingError(
                    f"pod {name} could not be placed on any node in {self.grace_s:.0f} s: "
                    f"{scheduled.message}"
                )
        elif node and waited > self.grace_s:
            failing = self._setup_failure(name)
            if failing is not None:
                raise TrainingError(
                    f"pod {name} is on {node}, whose kubelet cannot set it up "
                    f"({failing.count or 1} tries): {failing.reason}: {failing.message}"
                )
        return False

    def _create_workers(self, pods: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Create the workers' pods, named after rank 0's and owned by it (deleting rank 0's
        pod deletes them, whoever deletes it)."""
        from kubernetes.client.exceptions import ApiException

        assert self.pod is not None and self._last is not None
        owner = {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": self.pod,
            "uid": self._last.metadata.uid,
        }
        for meta, spec in pods:
            name = f"{self.pod}-node-{meta['labels'][NODE_RANK_LABEL]}"
            body = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {**meta, "name": name, "ownerReferences": [owner]},
                "spec": spec,
            }
            try:
                self.core.create_namespaced_pod(self.namespace, body, _request_timeout=10)
            except ApiException as exc:
                raise TrainingError(f"the cluster refused pod {name}: {_reason(exc)}") from None
            self._placed[name] = None
        self.log.info(
            f"node rank 0 ({self.pod}) listens at {self._last.status.pod_ip}:{RENDEZVOUS_PORT}; "
            f"{len(pods)} more pod(s) join it: {', '.join(list(self._placed)[1:])}"
        )

    def _setup_failure(self, name: str) -> Any:
        """The kubelet's warning that it cannot set pod ``name`` up (:data:`_SETUP_FAILURES`)
        where it has not got further since (:data:`_SETUP_PROGRESS`: an image pulling, a
        container made); None where it has said nothing of the kind."""
        events = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}", _request_timeout=10
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

    @contextmanager
    def workers_watched(self, poll_s: float) -> Iterator[None]:
        """While the block streams rank 0's log, watch the workers (see the class)."""
        workers = [name for name in self._placed if name != self.pod]
        if not workers:
            yield
            return
        thread = threading.Thread(
            target=self._watch_workers, args=(workers, poll_s), name="training-workers", daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join(timeout=30)

    def _watch_workers(self, workers: list[str], poll_s: float) -> None:
        from kubernetes.client.exceptions import ApiException

        while not self._stop.wait(poll_s):
            for name in workers:
                try:
                    failure = self._failed_worker(name)
                except ApiException:
                    continue  # the API server's hiccup: the next poll asks again
                if failure is not None:
                    self._worker_failure = failure
                    # Rank 0 (and with it the Pipes client's log stream) stops; the step
                    # fails with the worker's reason (after_logs).
                    assert self.pod is not None
                    self.core.delete_namespaced_pod(
                        self.pod, self.namespace, grace_period_seconds=5, _request_timeout=10
                    )
                    return

    def _failed_worker(self, name: str) -> str | None:
        """Why worker ``name`` failed (deleted, killed, an error); None while it runs or once
        it succeeded."""
        pod = self._read(name)
        if pod is None or pod.metadata.deletion_timestamp is not None:
            return f"pod {name} was deleted while it ran"
        trainer = _trainer(pod)
        ended = trainer.state.terminated if trainer is not None else None
        if ended is None or ended.exit_code == 0:
            return None
        return _ending(name, self._placed.get(name), ended)

    def after_logs(self) -> None:
        """Once rank 0's log stream ended: fail, saying why, when rank 0's container did not
        succeed (deleted, killed, out of memory, an error; a failed worker named first, as the
        cause); record how long each pod's container ran."""
        assert self.pod is not None
        pod = self._read(self.pod)
        deleted = pod is None or pod.metadata.deletion_timestamp is not None
        ended: Any = None if deleted else self._trainer_ended(pod)
        if not deleted and ended is None:
            return  # still running (the log stream broke): the client's own wait goes on
        if deleted or ended.exit_code != 0:
            workers = [name for name in self._placed if name != self.pod]
            failure = self._worker_failure or next(
                (f for f in map(self._failed_worker, workers) if f is not None), None
            )
            if failure is not None:
                raise TrainingError(failure)
        if deleted:
            raise TrainingError(
                f"pod {self.pod} was deleted while it ran (not by this run: `kubectl get events "
                f"-n {self.namespace}` says by what)"
            )
        for name in self._placed:
            self._record_run(name, pod if name == self.pod else self._read(name))
        if ended.exit_code != 0:
            raise TrainingError(_ending(self.pod, self.node, ended))

    def _trainer_ended(self, pod: Any) -> Any:
        """Rank 0's training container's terminated state; None where it still runs 10 s on
        (the log ends a moment before the kubelet reports the exit)."""
        for _ in range(20):
            status = _trainer(pod)
            if status is not None and status.state.terminated is not None:
                return status.state.terminated
            time.sleep(0.5)
            pod = self._read(pod.metadata.name) or pod
        return None

    def _record_run(self, name: str, pod: Any) -> None:
        """How long pod ``name``'s training container ran (until now where it still runs)."""
        trainer = _trainer(pod) if pod is not None else None
        if trainer is None:
            return
        if trainer.state.terminated is not None:
            state = trainer.state.terminated
            if state.started_at and state.finished_at:
                self._ran[name] = (state.started_at.timestamp(), state.finished_at.timestamp())
        elif trainer.state.running is not None and trainer.state.running.started_at:
            self._ran[name] = (trainer.state.running.started_at.timestamp(), time.time())

    def nodes(self) -> list[str]:
        """The nodes the run's pods ran on, node rank 0's first."""
        return list(dict.fromkeys(node for node in self._placed.values() if node))

    def gpu_seconds(self, gpus_per_pod: int) -> float:
        """GPUs held x the seconds each pod's training container ran, summed over the pods."""
        return round(sum(gpus_per_pod * (end - start) for start, end in self._ran.values()), 1)

    def describe(self) -> str:
        """What rank 0's pod's last state says, for an error the client raised."""
        pod = self._last
        if pod is None:
            return ""
        statuses = [f"{s.name}: {s.state.to_dict()}" for s in pod.status.container_statuses or []]
        return f"pod {self.pod} is {pod.status.phase}; " + "; ".join(statuses)

    def delete(self) -> None:
        """Delete the run's pods (their containers get 5 s to stop) and wait until they are
        gone."""
        from kubernetes.client.exceptions import ApiException

        self._stop.set()
        asked = []
        for name in reversed(list(self._placed)):
            try:
                self.core.delete_namespaced_pod(
                    name, self.namespace, grace_period_seconds=5, _request_timeout=10
                )
            except ApiException as exc:
                if exc.status != 404:
                    self.log.error(f"could not delete pod {name}: {_reason(exc)}")
                continue
            asked.append(name)
        deadline = time.monotonic() + 30
        while asked and time.monotonic() < deadline:
            asked = [name for name in asked if self._read(name) is not None]
            if asked:
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
            with (
                watch.workers_watched(self.poll_interval),
                super().consume_pod_logs(context, client, namespace, pod_name, **more),
            ):
                pass
            watch.after_logs()
            yield

    return WatchedPipesK8sClient(**kwargs)

"""Training runs as Flyte workflows: flytekit's local execution here, or FlyteRemote on Forge.

Two :class:`~resources.training.TrainingLauncher` implementations (which one runs where:
:mod:`resources.deployment`):

- :class:`LocalFlyteLauncher` (the twin without real nodes, the non-root fallback): flytekit's
  local execution of the real workflow, on the CPU with the run's ``twin_hyperparameters``,
  in a child process
  (``python -m homelab_dagster.workflows.local``) so torch never loads into Dagster's
  process and terminating the Dagster run kills the training.
- :class:`RemoteFlyteLauncher` (the homelab with ``ml.launcher: flyte``): ``FlyteRemote``
  against Flyte on Forge:
  fetch the run's launch plan at the code's version or register the workflow, execute,
  poll until done or the timeout, read the outputs; the execution is terminated when the
  Dagster run is.

Both log progress and the execution's URL to the Dagster log and return a
:class:`TrainingOutcome`.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from homelab_dagster.errors import TrainingError
from homelab_dagster.ml.spec import EvalReport, TrainOptions, TrainReport, code_version, from_dict
from resources.training import TrainingLaunch, TrainingLauncher, TrainingOutcome

__all__ = ["LocalFlyteLauncher", "RemoteFlyteLauncher"]


def _stop(proc: subprocess.Popen[str]) -> None:
    """Terminate the child's process group, then kill it if it lingers."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


class LocalFlyteLauncher(TrainingLauncher):
    """The twin without real nodes: flytekit's local execution in a child process, on the CPU
    (the run's ``twin_hyperparameters``, its model's architecture from scratch)."""

    scaled_down: bool = True
    work_dir: str = Field(description="Executions' directories (corpus, logs, weights).")
    threads: int = Field(default=1, description="torch CPU threads (the twin shares a small CPU).")
    timeout_s: float = Field(default=3600.0, gt=0)

    def launch(self, context: dg.AssetExecutionContext, launch: TrainingLaunch) -> TrainingOutcome:
        """Run the workflow locally; its weights land in ``<work_dir>/<execution>/weights``."""
        log = context.log
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        execution_id = f"local-{launch.run}-{stamp}-{uuid.uuid4().hex[:6]}"
        directory = Path(self.work_dir).resolve() / execution_id
        scratch = directory / "tmp"
        scratch.mkdir(parents=True)
        corpus_dir = launch.corpus.stage(directory / "corpus")
        options = TrainOptions(device="cpu", precision="fp32", log_every=10, threads=self.threads)
        request = {
            "run": launch.run,
            "spec": asdict(launch.spec),
            "options": asdict(options),
            "corpus_dir": str(corpus_dir),
            "output_dir": str(directory / "weights"),
            "result": str(directory / "result.json"),
        }
        (directory / "request.json").write_text(json.dumps(request, indent=2))
        url = directory.as_uri()
        log.info(
            f"Flyte local execution {execution_id} ({url}); the GPU request "
            f"({launch.gpu.describe()}) is recorded, the twin trains on the CPU"
        )
        env = self._environment(scratch)
        started = time.monotonic()
        command = [sys.executable, "-m", "homelab_dagster.workflows.local"]
        try:
            returncode = self._run([*command, str(directory / "request.json")], env, directory, log)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        result_file = directory / "result.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        if returncode != 0 or "error" in result:
            reason = result.get("error") or f"the process exited with status {returncode}"
            raise TrainingError(f"{execution_id} failed: {reason} (log: {directory / 'log.txt'})")
        return TrainingOutcome(
            execution_id=execution_id,
            execution_url=url,
            weights_uri=result["weights_dir"],
            weights_digest=result["digest"],
            weights_size_bytes=int(result["size_bytes"]),
            train=from_dict(TrainReport, result["train"]),
            evaluation=from_dict(EvalReport, result["evaluation"]),
            duration_s=time.monotonic() - started,
        )

    def _environment(self, scratch: Path) -> dict[str, str]:
        """The training process's environment: offline, on ``threads`` CPU threads."""
        package_root = str(Path(__file__).resolve().parent.parent)
        return {
            **os.environ,
            "TMPDIR": str(scratch),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(self.threads),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [package_root, os.environ.get("PYTHONPATH")])
            ),
        }

    def _run(self, command: list[str], env: dict[str, str], directory: Path, log: Any) -> int:
        """Run ``command``, streaming its lines to ``log`` and ``log.txt``; kill it on interrupt."""
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=directory,
            start_new_session=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line.rstrip())
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + self.timeout_s
        try:
            with (directory / "log.txt").open("w") as transcript:
                while True:
                    if time.monotonic() > deadline:
                        raise TrainingError(
                            f"local training exceeded its {self.timeout_s:.0f}s timeout"
                        )
                    try:
                        line = lines.get(timeout=1.0)
                    except queue.Empty:
                        continue
                    if line is None:
                        break
                    transcript.write(line + "\n")
                    if line and not line.startswith(("Loading weights", "Writing model")):
                        log.info(line)
            return proc.wait()
        except BaseException:
            # The Dagster run was terminated (or timed out): the training must not outlive it.
            log.warning(f"stopping local training (pid {proc.pid})")
            _stop(proc)
            raise


class RemoteFlyteLauncher(TrainingLauncher):
    """The homelab: FlyteRemote against Flyte on Forge.

    The Flyte endpoint and credentials come from flytekit's own configuration, read at
    launch: ``config_file`` where set, else ``FLYTECTL_CONFIG`` or ``FLYTE_PLATFORM_URL``
    (with ``FLYTE_PLATFORM_INSECURE``) and the other ``FLYTE_*`` variables.
    """

    project: str
    domain: str
    image: str = Field(description="The training image (homelab-dagster with the ml extra).")
    config_file: str | None = None
    timeout_s: float = Field(default=6 * 3600.0, gt=0)
    poll_s: float = Field(default=30.0, gt=0)
    compile_model: bool = Field(
        default=True, description="torch.compile the model (1.7-1.9x on an H200: docs/training.md)."
    )

    def _version(self, launch: TrainingLaunch) -> str:
        """The registered version: the training code, the image and the run's resources."""
        identity = json.dumps([code_version(), self.image, asdict(launch.gpu)], sort_keys=True)
        return hashlib.sha256(identity.encode()).hexdigest()[:20]

    def launch(self, context: dg.AssetExecutionContext, launch: TrainingLaunch) -> TrainingOutcome:
        """Register (once per version), execute and wait; weights stay in Flyte's blob store."""
        from flytekit.exceptions.base import FlyteException

        log = context.log
        if launch.gpu.nodes > 1:
            raise TrainingError(
                f"{launch.run}: asks {launch.gpu.nodes} nodes, but a Flyte execution trains in "
                "one pod; ml.launcher 'pods' runs a pod per node (homelab validate says so too)"
            )
        started = time.monotonic()
        remote, execution = self._start(log, launch)
        url = remote.generate_console_url(execution)
        log.info(f"Flyte execution {execution.id.name} ({launch.gpu.describe()}): {url}")
        try:
            execution = self._wait(remote, execution, log)
        except FlyteException as exc:
            raise TrainingError(f"lost track of {execution.id.name}: {exc} ({url})") from exc
        except BaseException:
            # The Dagster run was terminated (or the wait timed out): stop the GPUs too.
            log.warning(f"terminating Flyte execution {execution.id.name}")
            try:
                remote.terminate(execution, "the Dagster run was terminated or timed out")
            except FlyteException as exc:
                log.error(f"could not terminate {execution.id.name}: {exc}; stop it in {url}")
            raise
        return _remote_outcome(execution, url, time.monotonic() - started)

    def _start(self, log: Any, launch: TrainingLaunch) -> tuple[Any, Any]:
        """The remote, and the execution of the run's workflow started on it (registered first
        when this version is new)."""
        from flytekit.configuration import Config, ImageConfig, SerializationSettings
        from flytekit.exceptions.base import FlyteException
        from flytekit.exceptions.user import FlyteEntityNotExistException
        from flytekit.remote import FlyteRemote
        from flytekit.types.directory import FlyteDirectory

        from homelab_dagster.workflows import TaskResources, build_training_workflow

        gpu = launch.gpu
        resources = TaskResources(gpu.gpus_per_node, gpu.memory, gpu.product, self.image)
        workflow = build_training_workflow(launch.run, resources)
        version = self._version(launch)
        options = TrainOptions(
            device="cuda", precision="bf16", log_every=50, compile=self.compile_model
        )
        try:
            remote = FlyteRemote(
                Config.auto(self.config_file),
                default_project=self.project,
                default_domain=self.domain,
            )
            try:
                plan = remote.fetch_launch_plan(name=workflow.name, version=version)
            except FlyteEntityNotExistException:
                where = f"{self.project}/{self.domain}"
                log.info(f"registering {workflow.name} version {version} in {where}")
                settings = SerializationSettings(
                    image_config=ImageConfig.from_images(self.image),
                    project=self.project,
                    domain=self.domain,
                    version=version,
                )
                remote.register_workflow(workflow, settings, version=version)
                plan = remote.fetch_launch_plan(name=workflow.name, version=version)
            with tempfile.TemporaryDirectory(prefix="homelab-corpus-") as staged:
                corpus = FlyteDirectory(str(launch.corpus.stage(staged)))
                execution = remote.execute(
                    plan,
                    inputs={"corpus": corpus, "spec": launch.spec, "options": options},
                    type_hints=dict(workflow.python_interface.inputs),
                    wait=False,
                )
        except (FlyteException, OSError) as exc:
            raise TrainingError(f"cannot launch {workflow.name} on Flyte: {exc}") from exc
        return remote, execution

    def _wait(self, remote: Any, execution: Any, log: Any) -> Any:
        """Poll ``execution`` until it is done, logging each phase change."""
        from flytekit.models.core.execution import WorkflowExecutionPhase

        deadline = time.monotonic() + self.timeout_s
        phase = None
        while True:
            execution = remote.sync_execution(execution)
            if execution.closure.phase != phase:
                phase = execution.closure.phase
                log.info(f"{execution.id.name}: {WorkflowExecutionPhase.enum_to_string(phase)}")
            if execution.is_done:
                return execution
            if time.monotonic() > deadline:
                raise TrainingError(
                    f"Flyte execution {execution.id.name} did not finish in {self.timeout_s:.0f}s"
                )
            time.sleep(self.poll_s)


def _remote_outcome(execution: Any, url: str, seconds: float) -> TrainingOutcome:
    """What a finished Flyte execution produced; a failed one is a :class:`TrainingError`."""
    if execution.error is not None or execution.outputs is None:
        message = execution.error.message if execution.error else "no outputs"
        raise TrainingError(f"Flyte execution {execution.id.name} failed: {message} ({url})")
    outputs = execution.outputs
    return TrainingOutcome(
        execution_id=execution.id.name,
        execution_url=url,
        weights_uri=outputs.literals["weights"].scalar.blob.uri,
        weights_digest=outputs.get("digest", as_type=str),
        weights_size_bytes=outputs.get("size_bytes", as_type=int),
        train=outputs.get("train", as_type=TrainReport),
        evaluation=outputs.get("evaluation", as_type=EvalReport),
        duration_s=seconds,
    )

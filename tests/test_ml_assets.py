"""training_run/<run> and model_weights/<model>, materialised against the twin's local Flyte.

Real flytekit local execution in a child process, real torch on the CPU, a real weights
store on the twin's S3 server (a bucket of this module's own): nothing is mocked. Each training
takes seconds.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import dagster as dg
import pytest
from _ml_support import needs_ml, write_corpus

from assets import build_model_weights_defs, build_training_run_defs
from assets._keys import model_weights_key, training_run_key
from homelab_dagster.errors import InventoryError
from homelab_dagster.inventory import Inventory
from homelab_dagster.loader import load_inventory, parse_inventory
from homelab_dagster.ml.digest import directory_digest
from resources.flyte import LocalFlyteLauncher
from resources.weights import WeightsStore, version_prefix
from resources.weights_copy import copy_version
from sensors.training import build_training_schedules

RUN, MODEL = "sre-runbook", "sre-agent"
RUN_KEY, WEIGHTS_KEY = training_run_key(RUN), model_weights_key(MODEL)


def with_run(inventory: Inventory, **changes) -> Inventory:
    """``inventory`` with the run's fields (or twin hyperparameters, as a dict) changed."""
    run = inventory.training_runs[RUN]
    if "twin_hyperparameters" in changes:
        hp = run.twin_hyperparameters.model_copy(update=changes.pop("twin_hyperparameters"))
        changes["twin_hyperparameters"] = hp
    runs = {**inventory.training_runs, RUN: run.model_copy(update=changes)}
    return inventory.model_copy(update={"training_runs": runs})


def ml_assets(inventory: Inventory) -> list:
    run = inventory.training_runs[RUN]
    model = inventory.models[MODEL]
    defs = dg.Definitions.merge(
        build_training_run_defs(RUN, run, model, inventory.clusters[run.cluster]),
        build_model_weights_defs(MODEL, model, {RUN: run}),
    )
    return list(defs.assets)


class Lab:
    """A corpus, a state directory, a weights store and one Dagster instance kept across
    materialisations."""

    def __init__(self, tmp: Path, inventory: Inventory, store: WeightsStore) -> None:
        self.root = write_corpus(tmp / "project")
        self.inventory = inventory
        self.store = store
        self.work = tmp / "state" / "flyte"
        self.resources = {
            "training": LocalFlyteLauncher(corpus_root=str(self.root), work_dir=str(self.work)),
            "weights_store": self.store,
        }
        self.instance = dg.DagsterInstance.ephemeral()

    def materialize(
        self, inventory: Inventory | None = None, **kwargs
    ) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            ml_assets(inventory or self.inventory),
            resources=self.resources,
            instance=self.instance,
            raise_on_error=False,
            **kwargs,
        )

    def executions(self) -> list[Path]:
        return sorted(self.work.iterdir()) if self.work.exists() else []


def metadata(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == key]
    return {k: v.value for k, v in event.materialization.metadata.items()}


@pytest.fixture(scope="module")
def shipped(project_root) -> Inventory:
    return load_inventory(project_root / "homelab.yaml").inventory


def store_on(server, bucket: str) -> WeightsStore:
    """A weights store of the twin's configuration on ``bucket`` of the twin's object store."""
    return WeightsStore(
        bucket=bucket,
        endpoint_url=f"http://{server.address}",
        credentials_file=str(server.credentials),
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory, shipped, object_store) -> Lab:
    # A run of seconds: these tests are about the flow (reuse, versions, the gate), not the
    # model (the shipped twin run, about a minute: tests/test_training_pods_twin.py).
    small = with_run(shipped, twin_hyperparameters={"steps": 60, "batch_size": 8, "seq_len": 64})
    return Lab(tmp_path_factory.mktemp("ml"), small, store_on(object_store, "test-ml-assets"))


@pytest.fixture(scope="module")
def first(lab: Lab) -> dg.ExecuteInProcessResult:
    return lab.materialize()


@needs_ml
@pytest.mark.slow
def test_training_run_trains_on_the_cpu(first: dg.ExecuteInProcessResult, lab: Lab) -> None:
    assert first.success
    meta = metadata(first, RUN_KEY)
    assert meta["reused"] is False
    assert meta["execution_id"].startswith(f"local-{RUN}-")
    assert meta["execution_url"].startswith("file://")
    assert meta["train_steps"] == lab.inventory.training_runs[RUN].twin_hyperparameters.steps
    curve = meta["loss_curve"]
    assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10 - 0.3  # the loss goes down
    assert meta["eval_loss"] > 0 and meta["perplexity"] > 1
    assert meta["parameter_count"] > 100_000 and meta["duration_s"] > 0
    assert len(lab.executions()) == 1


@needs_ml
@pytest.mark.slow
def test_model_weights_registers_a_version_whose_digest_matches_the_files(
    first: dg.ExecuteInProcessResult, lab: Lab, tmp_path_factory
) -> None:
    run_meta, weights_meta = metadata(first, RUN_KEY), metadata(first, WEIGHTS_KEY)
    digest = weights_meta["digest"]
    assert digest == run_meta["weights_digest"]
    assert weights_meta["weights_uri"] == f"s3://{lab.store.bucket}/{MODEL}/versions/{digest}"
    assert run_meta["weights_uri"] == weights_meta["weights_uri"]  # staged by the run
    copied = tmp_path_factory.mktemp("copied")
    copy_version(lab.store.store, version_prefix(MODEL, digest), copied)
    assert directory_digest(copied)[0] == digest
    assert weights_meta["promoted"] is True and weights_meta["new_version"] is True
    version = lab.store.current(MODEL)
    assert version.digest == digest and version.fingerprint == run_meta["fingerprint"]
    assert version.metrics["eval_loss"] == pytest.approx(run_meta["eval_loss"])
    assert version.source_run == RUN and version.execution_id == run_meta["execution_id"]
    (check,) = first.get_asset_check_evaluations()
    assert check.passed
    # The UI's history: the materialisation's data version is the digest.
    record = lab.instance.get_latest_materialization_event(WEIGHTS_KEY)
    assert record.asset_materialization.tags["dagster/data_version"] == digest


@needs_ml
@pytest.mark.slow
def test_the_registered_weights_generate_offline(
    first: dg.ExecuteInProcessResult, lab: Lab, tmp_path: Path
) -> None:
    """What the serving pod's copy step puts in /models/<digest> loads and generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    current = lab.store.current(MODEL)
    path = tmp_path / current.digest
    copy_version(lab.store.store, version_prefix(MODEL, current.digest), path)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    prompt = tokenizer("Check the flyte pod", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 6


@needs_ml
@pytest.mark.slow
def test_the_same_inputs_reuse_the_version_without_training(
    first: dg.ExecuteInProcessResult, lab: Lab
) -> None:
    before = lab.executions()
    again = lab.materialize()
    assert again.success
    meta = metadata(again, RUN_KEY)
    assert meta["reused"] is True
    assert meta["weights_digest"] == metadata(first, WEIGHTS_KEY)["digest"]
    assert meta["execution_id"] == metadata(first, RUN_KEY)["execution_id"]  # the original run
    assert lab.executions() == before  # the training function did not run again
    logs = [entry.user_message for entry in lab.instance.all_logs(again.run_id)]
    assert any(m.startswith("reusing sre-agent version") for m in logs)
    weights = metadata(again, WEIGHTS_KEY)
    assert weights["new_version"] is False and weights["version_count"] == 1


@needs_ml
@pytest.mark.slow
def test_changed_hyperparameters_train_a_new_version_and_both_stay_listed(
    first: dg.ExecuteInProcessResult, lab: Lab
) -> None:
    changed = with_run(lab.inventory, twin_hyperparameters={"learning_rate": 4e-3})
    result = lab.materialize(changed)
    assert result.success
    assert metadata(result, RUN_KEY)["reused"] is False
    new = metadata(result, WEIGHTS_KEY)
    old_digest = metadata(first, WEIGHTS_KEY)["digest"]
    assert new["digest"] != old_digest and new["new_version"] is True
    listed = {v.digest for v in lab.store.versions(MODEL)}
    assert {old_digest, new["digest"]} <= listed


@needs_ml
@pytest.mark.slow
def test_a_changed_corpus_trains_a_new_version(first: dg.ExecuteInProcessResult, lab: Lab) -> None:
    page = lab.root / "docs" / "drain.md"
    page.write_text("Drain a Forge node: cordon it, evict the vLLM pods, wait for Flux.\n" * 20)
    try:
        result = lab.materialize()
    finally:
        page.unlink()
    meta = metadata(result, RUN_KEY)
    assert meta["reused"] is False
    assert meta["corpus_digest"] != metadata(first, RUN_KEY)["corpus_digest"]
    assert meta["corpus_files"] == metadata(first, RUN_KEY)["corpus_files"] + 1
    # Registered and listed whatever the gate decides (the held-out blocks changed too).
    registered = metadata(result, WEIGHTS_KEY)
    assert registered["new_version"] is True
    assert registered["digest"] in {v.digest for v in lab.store.versions(MODEL)}
    assert metadata(first, WEIGHTS_KEY)["digest"] in {v.digest for v in lab.store.versions(MODEL)}


@needs_ml
@pytest.mark.slow
def test_a_regressing_version_is_listed_but_blocked(
    first: dg.ExecuteInProcessResult, lab: Lab
) -> None:
    current = lab.store.current(MODEL)
    worse = with_run(lab.inventory, twin_hyperparameters={"steps": 2, "learning_rate": 1e-4})
    result = lab.materialize(worse)
    assert not result.success  # the blocking check fails the step
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and "worse than the current version" in check.description
    assert (
        check.metadata["max_allowed_eval_loss"].value < check.metadata["observed_eval_loss"].value
    )
    rejected = metadata(result, WEIGHTS_KEY)
    assert rejected["promoted"] is False
    assert lab.store.current(MODEL).digest == current.digest  # still the good one
    assert rejected["digest"] in {v.digest for v in lab.store.versions(MODEL)}


@needs_ml
@pytest.mark.slow
def test_rollback_makes_an_older_version_current(
    first: dg.ExecuteInProcessResult, lab: Lab
) -> None:
    target = metadata(first, WEIGHTS_KEY)["digest"]
    result = lab.materialize(
        selection=[WEIGHTS_KEY],
        run_config={"ops": {"model_weights__sre_agent": {"config": {"rollback_to": target[:12]}}}},
    )
    assert result.success
    assert lab.store.current(MODEL).digest == target
    assert metadata(result, WEIGHTS_KEY)["digest"] == target


def report_training(instance: dg.DagsterInstance, tmp: Path, tag: int, eval_loss: float) -> str:
    """Record a materialisation of the training run as training records it, of weights
    written here (the store never parses them): the gate needs no training. Returns their
    digest."""
    weights = tmp / f"weights-{tag}"
    weights.mkdir()
    (weights / "config.json").write_text('{"model_type": "gpt2"}')
    (weights / "model.safetensors").write_bytes(bytes([tag]) * 100)
    digest = directory_digest(weights)[0]
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=RUN_KEY,
            metadata={
                "weights_uri": str(weights),
                "weights_digest": digest,
                "execution_id": f"local-{RUN}-{tag}",
                "execution_url": dg.MetadataValue.url(weights.as_uri()),
                "fingerprint": f"{tag:064x}",
                "parameter_count": 1000,
                "train_loss_final": eval_loss - 0.2,
                "eval_loss": eval_loss,
                "perplexity": math.exp(eval_loss),
            },
        )
    )
    return digest


def test_the_gate_promotes_holds_and_rolls_back_reported_runs(
    tmp_path: Path, shipped: Inventory, weights_store: WeightsStore
) -> None:
    """model_weights' own path through Dagster, fed by reported training materialisations."""
    run = shipped.training_runs[RUN]
    assets = list(build_model_weights_defs(MODEL, shipped.models[MODEL], {RUN: run}).assets)
    store = weights_store
    instance = dg.DagsterInstance.ephemeral()

    def weights(rollback_to: str | None = None) -> dg.ExecuteInProcessResult:
        config = {"rollback_to": rollback_to} if rollback_to else {}
        return dg.materialize(
            assets,
            resources={"weights_store": store},
            instance=instance,
            raise_on_error=False,
            run_config={"ops": {"model_weights__sre_agent": {"config": config}}},
        )

    def check(result: dg.ExecuteInProcessResult) -> dg.AssetCheckEvaluation:
        (evaluation,) = result.get_asset_check_evaluations()
        return evaluation

    nothing = weights()
    (failure,) = [e for e in nothing.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "no training run of sre-agent has been materialised yet" in (
        failure.step_failure_data.user_failure_data.description
    )

    good = report_training(instance, tmp_path, 1, eval_loss=3.0)
    first = weights()
    assert first.success and check(first).passed
    meta = metadata(first, WEIGHTS_KEY)
    assert meta["promoted"] is True and meta["new_version"] is True and meta["digest"] == good
    assert meta["execution_id"] == f"local-{RUN}-1" and meta["parameter_count"] == 1000
    assert store.current(MODEL).source_run == RUN

    worse_loss = 3.0 * (1 + run.max_eval_loss_regression) + 0.1
    worse = report_training(instance, tmp_path, 2, eval_loss=worse_loss)
    held = weights()
    assert not held.success and not check(held).passed  # blocking: the step fails
    assert metadata(held, WEIGHTS_KEY)["promoted"] is False
    assert store.current(MODEL).digest == good
    assert {good, worse} == {v.digest for v in store.versions(MODEL)}

    better = report_training(instance, tmp_path, 3, eval_loss=2.5)
    assert metadata(weights(), WEIGHTS_KEY)["current_digest"] == better

    back = weights(rollback_to=good[:12])
    assert back.success and check(back).passed
    assert metadata(back, WEIGHTS_KEY)["rolled_back_from"] == better
    assert store.current(MODEL).digest == good

    # The newest run's version again: registered before and not current, so it stays held.
    again = weights()
    assert again.success and check(again).passed
    assert metadata(again, WEIGHTS_KEY)["promoted"] is False
    assert f"rollback_to: {better[:12]}" in check(again).description
    assert store.current(MODEL).digest == good


def test_an_empty_corpus_fails_before_launching(
    tmp_path: Path, shipped: Inventory, weights_store: WeightsStore
) -> None:
    lab = Lab(tmp_path, shipped, weights_store)
    empty = with_run(shipped, corpus=["nothing/**/*.md"])
    result = lab.materialize(empty, selection=[RUN_KEY])
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.user_failure_data.description
    assert "the corpus is empty" in message and "nothing/**/*.md" in message
    assert lab.executions() == []  # nothing was launched


def test_a_run_on_a_cluster_without_gpus_is_refused_by_the_inventory(inventory_text) -> None:
    text = inventory_text(lambda d: d["training_runs"]["sre-runbook"].update(cluster="air"))
    with pytest.raises(InventoryError, match="has no GPU nodes to train on"):
        parse_inventory(text)


def test_an_external_model_is_observed_not_trained(
    shipped: Inventory, weights_store: WeightsStore
) -> None:
    name = "llama-3.1-70b-instruct"
    model = shipped.models[name]
    defs = dg.Definitions(
        assets=list(build_model_weights_defs(name, model, {}).assets),
        jobs=[dg.define_asset_job("observe", selection=[model_weights_key(name)])],
        resources={"weights_store": weights_store},
    )
    result = defs.resolve_job_def("observe").execute_in_process()
    assert result.success
    (event,) = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    observation = event.event_specific_data.asset_observation
    expected = hashlib.sha256(f"external:{model.base_model}".encode()).hexdigest()
    assert observation.tags["dagster/data_version"] == expected
    assert observation.metadata["stored"].value is False


def test_schedules_come_from_the_inventory_and_start_as_asked(shipped: Inventory) -> None:
    (stopped,) = build_training_schedules(shipped, running=False).schedules
    (running,) = build_training_schedules(shipped, running=True).schedules
    assert stopped.name == "training_sre_runbook"
    assert stopped.cron_schedule == shipped.training_runs[RUN].schedule
    assert stopped.default_status == dg.DefaultScheduleStatus.STOPPED
    assert running.default_status == dg.DefaultScheduleStatus.RUNNING


@needs_ml
@pytest.mark.slow
def test_a_failure_inside_the_workflow_surfaces_its_reason(
    tmp_path: Path, shipped: Inventory, weights_store: WeightsStore
) -> None:
    lab = Lab(tmp_path, shipped, weights_store)
    (lab.root / "tiny").mkdir()
    (lab.root / "tiny" / "a.md").write_text("far too short to train on")
    result = lab.materialize(with_run(shipped, corpus=["tiny/*.md"]), selection=[RUN_KEY])
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.user_failure_data.description
    assert "TrainingError" in message and "too few" in message and "log.txt" in message


class _Log:
    """Collects what a launcher logs (Dagster's log manager has the same methods)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)

    warning = error = info


def test_the_local_child_process_is_killed_when_the_wait_ends(tmp_path: Path) -> None:
    import os
    import re
    import sys

    from homelab_dagster.errors import TrainingError

    launcher = LocalFlyteLauncher(corpus_root=str(tmp_path), work_dir=str(tmp_path), timeout_s=1)
    log = _Log()
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"]
    with pytest.raises(TrainingError, match="timeout"):
        launcher._run(command, dict(os.environ), tmp_path, log)
    assert "started" in log.lines
    (pid,) = [int(m.group(1)) for line in log.lines if (m := re.search(r"pid (\d+)", line))]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

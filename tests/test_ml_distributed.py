"""Data-parallel training: two real gloo ranks under torchrun, measured against one rank.

The two-rank run is this file itself, started as torchrun's script (``_rank_main`` below):
each rank trains, then writes its final parameters and the token blocks its model saw, so
the tests compare tensors that each process really produced.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from _ml_support import CPU, TINY, needs_ml, tiny_spec

from homelab_dagster.errors import TrainingError
from homelab_dagster.ml.spec import TrainReport, from_dict

STEPS = 6
BLOCKS = 64


def _recording(train: ModuleType) -> tuple[Callable[..., Any], dict[str, Any]]:
    """A ``build_model`` for ``train`` that keeps the model and every batch it is given."""
    build = train.build_model
    seen: dict[str, Any] = {"batches": []}

    def recording(*args: Any, **kwargs: Any) -> Any:
        model = build(*args, **kwargs)
        seen["model"] = model

        def keep(_: Any, args: Any, kwargs: Any) -> None:
            seen["batches"].append(kwargs["input_ids"].detach().cpu().clone())

        model.register_forward_pre_hook(keep, with_kwargs=True)
        return model

    return recording, seen


def _dump(seen: dict[str, Any], path: Path) -> None:
    import torch

    state = {k: v.detach().cpu().clone() for k, v in seen["model"].state_dict().items()}
    torch.save({"state": state, "batches": seen["batches"]}, path)


def _rank_main(dataset: Path, out: Path, results: Path) -> None:
    """One rank of the two-rank run (torchrun starts this file as its script)."""
    import torch.distributed as dist

    from homelab_dagster.ml import train
    from homelab_dagster.ml.distributed import world_from_env

    world = world_from_env(backend="gloo")
    recording, seen = _recording(train)
    train.build_model = recording  # this process is the rank: nothing to restore
    # Each rank gets a checkpoint directory of its own: rank 1's must stay absent.
    report = train.train_model(
        dataset, out / f"rank{world.rank}", tiny_spec(steps=STEPS), CPU, world=world
    )
    left_joined = dist.is_initialized()  # train_model joined, so it left
    _dump(seen, results / f"rank{world.rank}.pt")
    (results / f"rank{world.rank}.json").write_text(
        json.dumps(
            {
                "world": asdict(world),
                "report": asdict(report),
                "left_joined": left_joined,
            }
        )
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random token blocks of the twin's shape (no tokenizer: quick to make and to load)."""
    from homelab_dagster.ml.data import synthetic_dataset

    root = tmp_path_factory.mktemp("dataset")
    synthetic_dataset(root, TINY.vocab_size, tiny_spec().hyperparameters.seq_len, BLOCKS)
    return root


@pytest.fixture(scope="module")
def two_ranks(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run torchrun with two CPU ranks on this file; what each rank wrote."""
    import torch

    root = tmp_path_factory.mktemp("two-ranks")
    out, results = root / "out", root / "results"
    results.mkdir()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a rendezvous on a free local port
        "--nproc-per-node=2",
        __file__,
        str(dataset),
        str(out),
        str(results),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A session of its own: a hung rank is killed with torchrun, not left behind.
    launched = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        output, _ = launched.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(launched.pid, signal.SIGKILL)
        output, _ = launched.communicate()
        pytest.fail(f"torchrun ran past 300 s:\n{output[-4000:]}")
    assert launched.returncode == 0, f"torchrun failed:\n{output[-6000:]}"
    ranks = []
    for rank in (0, 1):
        meta = json.loads((results / f"rank{rank}.json").read_text())
        dumped = torch.load(results / f"rank{rank}.pt")
        ranks.append({**meta, **dumped, "report": from_dict(TrainReport, meta["report"])})
    return {"out": out, "ranks": ranks}


@pytest.fixture(scope="module")
def one_rank(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same run in this process, one rank on the whole batch."""
    from homelab_dagster.ml import train

    out = tmp_path_factory.mktemp("one-rank") / "checkpoint"
    with pytest.MonkeyPatch.context() as patch:
        recording, seen = _recording(train)
        patch.setattr(train, "build_model", recording)
        report = train.train_model(dataset, out, tiny_spec(steps=STEPS), CPU)
    return {"out": out, "report": report, "batches": seen["batches"]}


def _weights(checkpoint: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


@needs_ml
@pytest.mark.slow
def test_two_ranks_end_with_identical_parameters_and_only_rank_0_writes(
    two_ranks: dict[str, Any],
) -> None:
    import torch

    from homelab_dagster.ml.model import build_model

    zero, one = two_ranks["ranks"]
    assert (zero["world"]["rank"], one["world"]["rank"]) == (0, 1)
    assert zero["world"]["world_size"] == one["world"]["world_size"] == 2
    assert zero["state"].keys() == one["state"].keys() and zero["state"]
    for name, tensor in zero["state"].items():
        assert torch.equal(tensor, one["state"][name]), f"{name} differs between the ranks"
    # They trained: no parameter matrix is where the seeded initialisation left it.
    initial = build_model(tiny_spec(steps=STEPS), TINY.vocab_size, 0).state_dict()
    for name, tensor in zero["state"].items():
        if tensor.dim() >= 2:
            assert not torch.equal(tensor, initial[name]), f"{name} did not move"
    # Rank 0 wrote the checkpoint, and it holds these parameters; rank 1 wrote nothing.
    out = two_ranks["out"]
    assert sorted(p.name for p in out.iterdir()) == ["rank0"]
    assert {"config.json", "model.safetensors", "train_report.json"} <= {
        p.name for p in (out / "rank0").iterdir()
    }
    for name, tensor in _weights(out / "rank0").items():
        assert torch.equal(tensor, zero["state"][name]), f"checkpoint's {name} differs"
    # Both return the one report (the ranks' mean losses); both leave the process group.
    same = ("losses", "first_loss", "final_loss", "tokens_seen", "world_size")
    assert [getattr(zero["report"], f) for f in same] == [getattr(one["report"], f) for f in same]
    assert zero["report"].world_size == 2
    assert json.loads((out / "rank0" / "train_report.json").read_text())["world_size"] == 2
    assert not zero["left_joined"] and not one["left_joined"]


@needs_ml
@pytest.mark.slow
def test_two_ranks_on_half_batches_are_one_rank_on_the_whole_batch(
    two_ranks: dict[str, Any], one_rank: dict[str, Any]
) -> None:
    import torch

    from homelab_dagster.ml.model import build_model

    zero, one = two_ranks["ranks"]
    # The split: rank 0 saw the first half of each global batch, rank 1 the second half.
    assert len(one_rank["batches"]) == len(zero["batches"]) == len(one["batches"]) == STEPS
    for step, whole in enumerate(one_rank["batches"]):
        assert zero["batches"][step].shape[0] == one["batches"][step].shape[0] == 4
        halves = torch.cat([zero["batches"][step], one["batches"][step]])
        assert torch.equal(halves, whole), f"step {step}: the ranks' halves are not the batch"
    # The same losses, step by step, and the same tokens (global ones).
    single: TrainReport = one_rank["report"]
    double: TrainReport = zero["report"]
    assert double.losses == pytest.approx(single.losses, rel=1e-4, abs=1e-5)
    assert double.first_loss == pytest.approx(single.first_loss, rel=1e-5)
    assert (double.tokens_seen, single.world_size) == (single.tokens_seen, 1)
    # The same weights, up to fp32 rounding: the sums run in another order, and AdamW
    # divides each gradient by its own magnitude, so a gradient near zero turns rounding
    # into up to a step's worth (lr 3e-3) of one element; observed here: at most 2e-5.
    reference = _weights(one_rank["out"])
    trained = _weights(two_ranks["out"] / "rank0")
    initial = build_model(tiny_spec(steps=STEPS), TINY.vocab_size, 0).state_dict()
    assert reference.keys() == trained.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(trained[name], tensor, rtol=1e-4, atol=1e-4, msg=name)
        if tensor.dim() >= 2:  # and far closer to each other than to where they started
            apart = (trained[name] - tensor).norm() / (tensor - initial[name]).norm()
            assert apart < 1e-3, f"{name}: {apart:.1e} of its training movement apart"


@needs_ml
def test_a_batch_the_ranks_cannot_split_evenly_is_refused(tmp_path: Path) -> None:
    from homelab_dagster.ml.distributed import World
    from homelab_dagster.ml.train import train_model

    with pytest.raises(TrainingError, match=r"batch_size 8 .*world_size 3"):
        train_model(tmp_path, None, tiny_spec(), CPU, world=World(rank=1, world_size=3))


@needs_ml
def test_the_world_comes_from_torchruns_environment() -> None:
    from homelab_dagster.ml.distributed import World, world_from_env

    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}
    world = world_from_env(env, backend="gloo")
    assert world == World(rank=3, local_rank=1, world_size=4, backend="gloo")
    assert world.distributed and not world.is_main
    alone = world_from_env({}, backend="gloo")
    assert alone == World() and alone.is_main and not alone.distributed
    for bad in ({"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "2", "WORLD_SIZE": "2"}):
        with pytest.raises(TrainingError, match="RANK"):
            world_from_env(bad, backend="gloo")


@needs_ml
def test_one_rank_joins_nothing_and_a_missing_rendezvous_is_a_training_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch
    import torch.distributed as dist

    from homelab_dagster.ml.distributed import World, barrier, joined, mean_across

    value = torch.tensor([1.5, 2.5])
    with joined(World()) as world:
        assert not dist.is_initialized()
        barrier(world)
        assert mean_across(value, world) is value
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TrainingError, match="rank 0 of 2"), joined(World(world_size=2)):
        pass
    assert not dist.is_initialized()


@needs_ml
def test_the_group_is_left_also_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control flow only (a real group needs real ranks: the torchrun tests above)."""
    import torch.distributed as dist

    from homelab_dagster.ml.distributed import World, joined

    calls: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(calls) and calls[-1] == "init")
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append("init"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    with pytest.raises(KeyError), joined(World(rank=1, world_size=2)):
        with joined(World(rank=1, world_size=2)):  # inner: uses the group, leaves it be
            assert calls == ["init"]
        assert calls == ["init"]
        raise KeyError("a failure while joined")
    assert calls == ["init", "destroy"]


if __name__ == "__main__":
    _rank_main(*(Path(arg) for arg in sys.argv[1:]))

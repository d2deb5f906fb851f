"""What cannot fit its GPUs' memory is refused by `homelab validate`, with the numbers.

Each inventory test changes the shipped homelab.yaml once and names the GPUs it relies on
(the forge pools' products are set here, not read from the shipped file); the arithmetic of
homelab_dagster.gpus is checked against counts known from real models.
"""

from __future__ import annotations

import typing

import pytest
from _cli_support import validate

from homelab_dagster.errors import InventoryError
from homelab_dagster.gpus import (
    GPU_MEMORY_GIB,
    SERVING_BYTES_PER_PARAMETER,
    ModelSize,
    ServingNeed,
    TrainingNeed,
    architecture_parameters,
    model_size,
)
from homelab_dagster.inventory import TrainingHyperparameters, WeightsDtype
from homelab_dagster.loader import load_inventory, parse_inventory
from homelab_dagster.rules import check

A100_40 = "NVIDIA-A100-SXM4-40GB"
LLAMA = "llama-3.1-70b-instruct"


def problems_of(text: str) -> list[str]:
    with pytest.raises(InventoryError) as info:
        parse_inventory(text, "homelab.yaml")
    return [str(p) for p in info.value.problems]


def _gpus(data, role: str, product: str, count: int = 2) -> int:
    """Give every forge pool of ``role`` ``count`` x ``product``; the first one's index."""
    pools = data["clusters"]["forge"]["nodes"]
    found = [i for i, pool in enumerate(pools) if pool["role"] == role]
    for i in found:
        pools[i]["gpu"] = {"count": count, "product": product}
    return found[0]


def _owners_70b(data) -> None:
    """The owner's vLLM line: Llama 3.1 70B in bf16, tensor-parallel 2, on 2 x A100-40GB."""
    data["models"][LLAMA].update(
        base_model="meta-llama/Meta-Llama-3.1-70B-Instruct", parameters="70.6B", dtype="bf16"
    )
    data["endpoints"]["vllm"]["tensor_parallel_size"] = 2
    _gpus(data, "inference", A100_40)


def _training(data, parameters: str, lora_rank: int | None) -> None:
    """sre-runbook fine-tunes a base of ``parameters`` on one node's 2 x A100-40GB."""
    data["models"]["sre-agent"]["parameters"] = parameters
    run = data["training_runs"]["sre-runbook"]
    run.update(nodes=1, gpus_per_node=2)
    hp = {"steps": 10, "batch_size": 16, "seq_len": 1024, "learning_rate": 2.0e-4}
    run["hyperparameters"] = hp | ({"lora_rank": lora_rank} if lora_rank else {})
    _gpus(data, "training", A100_40)


# ----------------------------------------------------------------------------- the shipped file


def test_the_shipped_inventory_fits_and_serves_the_70b_in_4_bits(project_root):
    inventory = load_inventory(project_root / "homelab.yaml").inventory
    assert check(inventory) == []
    model = inventory.models[LLAMA]
    assert model.dtype == "int4" and model.parameter_count == 70_600_000_000
    assert model.base_model == "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"
    endpoint = inventory.endpoints["vllm"]
    need = ServingNeed(model.parameter_count, model.dtype, endpoint.tensor_parallel_size)
    products = {
        n.gpu_product for n in inventory.clusters["forge"].expanded_nodes() if n.role == "inference"
    }
    budget = min(GPU_MEMORY_GIB[p] for p in products if p) * endpoint.tensor_parallel_size * 0.9
    assert need.total_gib <= budget
    # Every product the shipped file names has a memory, and every dtype a size.
    assert {n.gpu_product for c in inventory.clusters.values() for n in c.expanded_nodes()} - {
        None
    } <= set(GPU_MEMORY_GIB)
    assert set(typing.get_args(WeightsDtype)) == set(SERVING_BYTES_PER_PARAMETER)


# ----------------------------------------------------------------------------- serving


def test_the_owners_70b_in_bf16_on_two_a100_40gb_is_refused_by_validate(inventory_text, tmp_path):
    path = tmp_path / "homelab.yaml"
    path.write_text(inventory_text(_owners_70b))
    status, out = validate(path)
    assert status == 1, out
    assert "endpoints.vllm.model: llama-3.1-70b-instruct (70.6B parameters) at bf16 needs" in out
    assert (
        "131.5 GiB of weights + 4.0 GiB KV cache floor + 2.0 GiB runtime overhead "
        "(1 GiB a GPU) = 137.5 GiB; 2 x NVIDIA-A100-SXM4-40GB give 72.0 GiB at 0.9 utilisation"
    ) in out
    assert "1 problem(s)" in out


def test_the_same_70b_fits_two_h200s_and_an_8_bit_one_fits_two_a100_80gb(inventory_text):
    def h200(data):
        _owners_70b(data)
        _gpus(data, "inference", "NVIDIA-H200")

    def fp8_on_a100_80(data):
        _owners_70b(data)
        data["models"][LLAMA]["dtype"] = "fp8"
        _gpus(data, "inference", "NVIDIA-A100-SXM4-80GB")

    for edit in (h200, fp8_on_a100_80):
        parse_inventory(inventory_text(edit), "homelab.yaml")


@pytest.mark.parametrize(
    ("args", "fits"),
    [
        (["--gpu-memory-utilization", "0.5"], True),  # 40.0 GiB of the two GPUs' 80
        (["--gpu-memory-utilization=0.45"], False),  # 36.0 GiB < 38.9 GiB
    ],
)
def test_the_endpoints_own_gpu_memory_utilization_sets_the_budget(inventory_text, args, fits):
    def edit(data):
        _gpus(data, "inference", A100_40)
        data["endpoints"]["vllm"]["extra_args"] = args

    text = inventory_text(edit)
    if fits:
        parse_inventory(text, "homelab.yaml")
        return
    (problem,) = problems_of(text)
    assert "at int4 needs 32.9 GiB of weights" in problem and "= 38.9 GiB" in problem
    assert "give 36.0 GiB at 0.45 utilisation" in problem


def test_a_gpu_memory_utilization_that_is_not_a_share_is_refused(inventory_text):
    def edit(data):
        data["endpoints"]["vllm"]["extra_args"] = ["--gpu-memory-utilization", "90"]

    (problem,) = problems_of(inventory_text(edit))
    assert "endpoints.vllm.extra_args" in problem and "'90'" in problem and "(0, 1]" in problem


def test_an_unknown_gpu_product_is_named_and_the_fit_said_uncheckable(inventory_text):
    index = 0

    def edit(data):
        nonlocal index
        index = _gpus(data, "inference", "NVIDIA-B200")

    (problem,) = problems_of(inventory_text(edit))
    assert f"clusters.forge.nodes[{index}].gpu.product" in problem
    assert "GPU product 'NVIDIA-B200' has no known memory" in problem
    assert "whether endpoint 'vllm' fits on it cannot be checked" in problem
    assert "GPU_MEMORY_GIB (homelab_dagster/gpus.py)" in problem


def test_a_gpu_endpoint_of_a_model_without_parameters_cannot_be_checked(inventory_text):
    (problem,) = problems_of(inventory_text(lambda d: d["models"][LLAMA].pop("parameters")))
    assert f"models.{LLAMA}" in problem
    assert "declares no parameters, so whether endpoint 'vllm' fits" in problem


def test_a_cpu_endpoint_is_not_weighed_against_gpus(inventory_text):
    def edit(data):
        _owners_70b(data)
        data["endpoints"]["vllm"].update(accelerator="cpu", tensor_parallel_size=1)

    parse_inventory(inventory_text(edit), "homelab.yaml")


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("parameters", "70b", "not a parameter count"),
        ("parameters", "seventy", "not a parameter count"),
        ("dtype", "fp4", "'fp4'"),
    ],
)
def test_a_models_size_and_dtype_are_validated(inventory_text, field, value, reason):
    (problem,) = problems_of(inventory_text(lambda d: d["models"][LLAMA].update({field: value})))
    assert f"models.{LLAMA}.{field}" in problem and reason in problem


# ----------------------------------------------------------------------------- training


def test_a_full_fine_tune_that_cannot_fit_one_gpu_is_refused_with_the_numbers(inventory_text):
    (problem,) = problems_of(inventory_text(lambda d: _training(d, "3B", None)))
    assert "training_runs.sre-runbook.hyperparameters" in problem
    assert "sre-agent (3B parameters, full fine-tune) needs 55.9 GiB for 3B trainable" in problem
    assert "(20 B each: fp32 weights, gradients, AdamW moments, DDP's gradient buckets)" in problem
    assert "(16 over 2 ranks: 8 x 1024 tokens a GPU)" in problem
    assert "= 77.3 GiB a GPU; one NVIDIA-A100-SXM4-40GB has 40.0 GiB" in problem


def test_lora_trains_the_same_base_where_a_full_fine_tune_does_not_fit(inventory_text):
    parse_inventory(inventory_text(lambda d: _training(d, "3B", 16)), "homelab.yaml")
    size = ModelSize.of_parameters(3_000_000_000)
    hp = TrainingHyperparameters(steps=10, batch_size=16, seq_len=1024, learning_rate=2e-4)
    full = TrainingNeed(size, hp, ranks=2)
    lora = TrainingNeed(size, hp.model_copy(update={"lora_rank": 16}), ranks=2)
    # The base is frozen at 4 B a parameter; only the adapter (under 1%) carries 20 B.
    assert lora.frozen_gib == pytest.approx(3e9 * 4 / 1024**3)
    assert lora.trainable_parameters < 0.01 * full.trainable_parameters
    assert lora.activations_gib == full.activations_gib
    assert full.total_gib - lora.total_gib > 40
    assert "LoRA rank 16) needs 11.2 GiB of frozen fp32 weights" in lora.explain("m")


def test_more_ranks_split_the_batch_but_not_the_model(inventory_text):
    size = ModelSize.of_parameters(1_000_000_000)
    hp = TrainingHyperparameters(steps=1, batch_size=16, seq_len=1024, learning_rate=1e-4)
    one, four = TrainingNeed(size, hp, ranks=1), TrainingNeed(size, hp, ranks=4)
    assert (one.batch_per_rank, four.batch_per_rank) == (16, 4)
    assert four.activations_gib == pytest.approx(one.activations_gib / 4)
    assert (one.bytes_per_trainable, four.bytes_per_trainable) == (16, 20)


def test_an_unknown_training_gpu_is_named(inventory_text):
    def edit(data):
        _gpus(data, "training", "NVIDIA-GB200")

    (problem,) = problems_of(inventory_text(edit))
    assert "GPU product 'NVIDIA-GB200' has no known memory" in problem
    assert "training run 'sre-runbook'" in problem


def test_three_gpus_per_node_on_two_gpu_nodes_is_refused_once(inventory_text):
    def edit(data):
        _gpus(data, "training", A100_40)
        data["training_runs"]["sre-runbook"]["gpus_per_node"] = 3

    (problem,) = problems_of(inventory_text(edit))
    assert "training_runs.sre-runbook.gpus_per_node" in problem
    assert "asks 3 GPUs per node" in problem and "has 2" in problem


# ----------------------------------------------------------------------------- the arithmetic


def test_sizes_match_real_models(shipped_inventory):
    # The twin's GPT-2 (docs/training.md counts 141,056 parameters), exact from its architecture.
    arch = shipped_inventory.models["sre-agent"].architecture
    assert architecture_parameters(arch) == 141_056
    # A fine-tuned model is its base's size (sre-agent fine-tunes a 270M base on the homelab).
    size = model_size(shipped_inventory.models["sre-agent"])
    assert size is not None and size.parameters == 270_000_000
    # Llama 3.1 70B is 8192 wide and 80 deep; peft's all-linear LoRA at rank 16 is 207,093,760.
    llama = ModelSize.of_parameters(70_600_000_000)
    assert llama.width_x_depth == pytest.approx(8192 * 80, rel=0.02)
    hp = TrainingHyperparameters(steps=1, batch_size=1, seq_len=8, learning_rate=1e-4)
    adapter = TrainingNeed(llama, hp.model_copy(update={"lora_rank": 16}), 1)
    assert adapter.trainable_parameters == pytest.approx(207_093_760, rel=0.02)

"""GPU memory, and what serving or training a model needs of it: the fit rule's numbers.

``homelab validate`` (:mod:`homelab_dagster.rules`) refuses, before anything runs, an
endpoint or a training run whose need exceeds the memory of the GPUs it would get. A need
counts what cannot be avoided and leaves out what depends on what the inventory does not say
(a model's vocabulary, its attention heads, the layers a quantised checkpoint keeps in 16
bits), so a refusal is certain and a pass is no promise (docs/serving.md, docs/training.md).

Serving, one replica of an endpoint on ``tensor_parallel_size`` GPUs::

    weights = parameters x bytes a parameter of the model's dtype
    need    = weights + KV_CACHE_FLOOR_GIB + SERVING_OVERHEAD_GIB x GPUs
    budget  = GPU memory x GPUs x gpu_memory_utilization (vLLM's: 0.9, or extra_args')

Training, per GPU (data parallel: every rank holds the whole model and a slice of the batch)::

    frozen      = 4 B x parameters, with LoRA (the base, loaded in fp32, no gradient)
    trainable   = 16 B x trainable parameters (fp32 weights 4 + gradients 4 + AdamW 8),
                  + 4 B each with several ranks (DDP's gradient buckets)
    activations = 34 B x width x depth x tokens a rank
    need        = frozen + trainable + activations + TRAINING_OVERHEAD_GIB
    budget      = one GPU's memory
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from homelab_dagster.inventory import Model, ModelArchitecture, TrainingHyperparameters

__all__ = [
    "ACTIVATION_BYTES",
    "DEFAULT_GPU_MEMORY_UTILIZATION",
    "GIB",
    "GPU_MEMORY_GIB",
    "KV_CACHE_FLOOR_GIB",
    "LORA_WIDTHS_PER_LAYER",
    "SERVING_BYTES_PER_PARAMETER",
    "SERVING_OVERHEAD_GIB",
    "TRAINING_OVERHEAD_GIB",
    "WIDTH_PER_LAYER",
    "ModelSize",
    "ServingNeed",
    "TrainingNeed",
    "architecture_parameters",
    "gpu_memory_utilization",
    "model_size",
]

GIB = 1024**3

# Memory of a GPU, in GiB, by its product as GPU feature discovery labels it
# (nvidia.com/gpu.product: the NVML name, '-' for ' '): the total nvidia-smi reports, MiB / 1024.
GPU_MEMORY_GIB: dict[str, float] = {
    "NVIDIA-A100-SXM4-40GB": 40.0,  # 40960 MiB
    "NVIDIA-A100-PCIE-40GB": 40.0,  # 40960 MiB
    "NVIDIA-A100-SXM4-80GB": 80.0,  # 81920 MiB
    "NVIDIA-A100-80GB-PCIe": 80.0,  # 81920 MiB
    "NVIDIA-H100-80GB-HBM3": 79.6,  # 81559 MiB (SXM)
    "NVIDIA-H100-PCIe": 79.6,  # 81559 MiB
    "NVIDIA-H200": 140.4,  # 143771 MiB ("141GB")
    "NVIDIA-L40S": 45.0,  # 46068 MiB ("48GB")
    "NVIDIA-L4": 22.5,  # 23034 MiB ("24GB")
    "NVIDIA-A10": 22.5,  # 23028 MiB ("24GB")
    "NVIDIA-A10G": 22.5,  # 23028 MiB
    "NVIDIA-GeForce-RTX-4090": 24.0,  # 24564 MiB
    "Tesla-T4": 15.0,  # 15360 MiB ("16GB")
}

# Bytes a served parameter takes, by the model's dtype (inventory.WeightsDtype: a test keeps the
# two equal). int4 counts the packed weights only: group scales and the layers a checkpoint
# keeps in 16 bits (embeddings, output head) come on top.
SERVING_BYTES_PER_PARAMETER: dict[str, float] = {
    "bf16": 2,
    "fp16": 2,
    "fp8": 1,
    "int8": 1,
    "int4": 0.5,
}
# vLLM's --gpu-memory-utilization default: the share of each GPU it takes for everything.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# KV cache a replica needs at least: vLLM refuses to start without room for one sequence of
# max_model_len. Fixed, not computed: an external model's layers and KV heads are not in the
# inventory. (Llama 3.1 70B keeps 320 KiB a token: 4096 tokens are 1.25 GiB.)
KV_CACHE_FLOOR_GIB = 4.0
# A GPU's memory vLLM uses besides weights and KV cache: CUDA context, NCCL buffers, the
# activation peak of its profiling run and CUDA graphs, at the least.
SERVING_OVERHEAD_GIB = 1.0

# The shape assumed of a model known only by its size, a Llama-shaped decoder: parameters
# = 12 x depth x width^2 with width = 128 x depth (Llama 3.1 8B is 4096 x 32, 70B 8192 x 80),
# so width x depth = (128 x parameters / 12)^(2/3) / 128 (70.6B: 647k; the real 655k).
WIDTH_PER_LAYER = 128
# Activations a token keeps for the backward pass, per unit of width x depth: 16-bit tensors of
# a block with fused (flash or SDPA) attention and no recomputation (Korthikanti et al. 2022,
# "Reducing Activation Recomputation in Large Transformer Models": 34 x s x b x h a layer).
# The logits (about 10 B x vocabulary a token: bf16, and fp32 for the loss) are not counted.
ACTIVATION_BYTES = 34
# LoRA with target_modules="all-linear" adds rank x (in + out) parameters to every linear
# layer; a Llama-shaped block's seven (q, k, v, o with 8-way grouped KV heads; gate, up, down
# at 3.5 x width) sum to about 20 x width of in + out (70B at rank 16: 207M, as peft counts).
LORA_WIDTHS_PER_LAYER = 20
# Per training GPU besides the model: CUDA context, cuBLAS workspaces, allocator slack.
TRAINING_OVERHEAD_GIB = 1.0
_FP32 = 4
_ADAMW_STATE = 2 * _FP32  # two fp32 moments


def _count(n: float) -> str:
    """``70_600_000_000`` -> ``70.6B``: a parameter count as the inventory writes them."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + unit
    return str(round(n))


def architecture_parameters(arch: ModelArchitecture) -> int:
    """A GPT-2 architecture's parameters: token and position embeddings, per block
    12 x width^2 + 13 x width (attention and MLP weights and biases, two layer norms), a final
    layer norm; the output head is tied to the token embeddings."""
    width = arch.n_embd
    blocks = arch.n_layer * (12 * width * width + 13 * width)
    return (arch.vocab_size + arch.n_positions) * width + blocks + 2 * width


@dataclass(frozen=True)
class ModelSize:
    """What the homelab serves or trains of a model: its parameters and width x depth (the
    sum of the hidden widths of its blocks, which sizes activations and LoRA adapters)."""

    parameters: int
    width_x_depth: float

    @classmethod
    def of_parameters(cls, parameters: int) -> ModelSize:
        """A model known by its size only, shaped like Llama (``WIDTH_PER_LAYER``)."""
        width = (WIDTH_PER_LAYER * parameters / 12) ** (1 / 3)
        return cls(parameters, width * width / WIDTH_PER_LAYER)


def model_size(model: Model) -> ModelSize | None:
    """The size of what the homelab serves or trains of ``model``: its declared ``parameters``
    (a base model's, when it fine-tunes one); its ``architecture`` when it trains one from
    scratch (no ``base_model``); None when it declares neither."""
    arch = model.architecture
    if arch is not None and not model.base_model:
        return ModelSize(architecture_parameters(arch), arch.n_embd * arch.n_layer)
    count = model.parameter_count
    return None if count is None else ModelSize.of_parameters(count)


def gpu_memory_utilization(extra_args: Sequence[str]) -> float:
    """vLLM's ``--gpu-memory-utilization`` as ``extra_args`` set it, else its default.

    Raises:
        ValueError: the value is missing, not a number, or not in (0, 1].
    """
    flag = "--gpu-memory-utilization"
    value: str | None = None
    for i, arg in enumerate(extra_args):
        if arg == flag:
            value = extra_args[i + 1] if i + 1 < len(extra_args) else ""
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    if value is None:
        return DEFAULT_GPU_MEMORY_UTILIZATION
    try:
        share = float(value)
    except ValueError:
        share = math.nan
    if not 0 < share <= 1:
        raise ValueError(f"{flag} {value!r} in extra_args is not a number in (0, 1]")
    return share


@dataclass(frozen=True)
class ServingNeed:
    """What one replica of an endpoint needs, over all its GPUs."""

    parameters: int
    dtype: str
    gpus: int

    @property
    def weights_gib(self) -> float:
        """The weights at the served precision."""
        return self.parameters * SERVING_BYTES_PER_PARAMETER[self.dtype] / GIB

    @property
    def overhead_gib(self) -> float:
        """The runtime's own memory, on every GPU."""
        return SERVING_OVERHEAD_GIB * self.gpus

    @property
    def total_gib(self) -> float:
        """Weights, the KV cache floor and the overhead."""
        return self.weights_gib + KV_CACHE_FLOOR_GIB + self.overhead_gib

    def explain(self, model: str) -> str:
        """The need in words, with its numbers."""
        return (
            f"{model} ({_count(self.parameters)} parameters) at {self.dtype} needs "
            f"{self.weights_gib:.1f} GiB of weights + {KV_CACHE_FLOOR_GIB:.1f} GiB KV cache "
            f"floor + {self.overhead_gib:.1f} GiB runtime overhead ({SERVING_OVERHEAD_GIB:g} "
            f"GiB a GPU) = {self.total_gib:.1f} GiB"
        )


@dataclass(frozen=True)
class TrainingNeed:
    """What one GPU of a training run needs: every rank holds the model, a slice of the batch."""

    size: ModelSize
    hyperparameters: TrainingHyperparameters
    ranks: int

    @property
    def batch_per_rank(self) -> int:
        """Sequences each rank trains on per step (the global batch split over the ranks)."""
        return math.ceil(self.hyperparameters.batch_size / self.ranks)

    @property
    def trainable_parameters(self) -> int:
        """All parameters; with LoRA, the adapter's only."""
        rank = self.hyperparameters.lora_rank
        if rank is None:
            return self.size.parameters
        return round(rank * LORA_WIDTHS_PER_LAYER * self.size.width_x_depth)

    @property
    def frozen_gib(self) -> float:
        """The base model's fp32 weights without gradients (LoRA), else nothing."""
        if self.hyperparameters.lora_rank is None:
            return 0.0
        return self.size.parameters * _FP32 / GIB

    @property
    def bytes_per_trainable(self) -> int:
        """fp32 weights, gradients and AdamW moments; DDP's buckets with several ranks."""
        return _FP32 + _FP32 + _ADAMW_STATE + (_FP32 if self.ranks > 1 else 0)

    @property
    def trainable_gib(self) -> float:
        """The trainable parameters with their gradients and optimizer state."""
        return self.trainable_parameters * self.bytes_per_trainable / GIB

    @property
    def activations_gib(self) -> float:
        """What a rank's forward pass keeps for the backward pass."""
        tokens = self.batch_per_rank * self.hyperparameters.seq_len
        return ACTIVATION_BYTES * self.size.width_x_depth * tokens / GIB

    @property
    def total_gib(self) -> float:
        """Frozen weights, trainable state, activations and the overhead."""
        return self.frozen_gib + self.trainable_gib + self.activations_gib + TRAINING_OVERHEAD_GIB

    def explain(self, model: str) -> str:
        """The need in words, with its numbers."""
        hp = self.hyperparameters
        size = _count(self.size.parameters)
        trainable = _count(self.trainable_parameters)
        state = f"{self.bytes_per_trainable} B each: fp32 weights, gradients, AdamW moments"
        if self.ranks > 1:
            state += ", DDP's gradient buckets"
        if hp.lora_rank is None:
            head = f"{model} ({size} parameters, full fine-tune) needs "
        else:
            head = (
                f"{model} ({size} parameters, LoRA rank {hp.lora_rank}) needs "
                f"{self.frozen_gib:.1f} GiB of frozen fp32 weights + "
            )
        split = f"{hp.batch_size} over {self.ranks} ranks: " if self.ranks > 1 else ""
        return (
            f"{head}{self.trainable_gib:.1f} GiB for {trainable} trainable parameters "
            f"({state}) + {self.activations_gib:.1f} GiB of activations ({split}"
            f"{self.batch_per_rank} x {hp.seq_len} tokens a GPU) + "
            f"{TRAINING_OVERHEAD_GIB:.1f} GiB runtime = {self.total_gib:.1f} GiB a GPU"
        )

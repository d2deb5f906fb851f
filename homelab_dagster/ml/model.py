"""The model: a GPT-2-style decoder from an :class:`Architecture`, or a base model to fine-tune."""

from __future__ import annotations

from typing import Any

import torch

from homelab_dagster.errors import TrainingError
from homelab_dagster.ml.spec import Architecture, TrainOptions, TrainSpec

__all__ = [
    "build_model",
    "gpt2_config",
    "parameter_count",
    "quiet_loss_type",
    "resolve_device",
    "resolve_precision",
]


def gpt2_config(arch: Architecture, eos_token_id: int) -> Any:
    """The ``transformers`` GPT-2 configuration of ``arch`` (no dropout: short runs).

    No padding token is set: training blocks are never padded, and end-of-text tokens
    inside them are real tokens, not padding.
    """
    from transformers import GPT2Config

    if arch.n_embd % arch.n_head:
        raise TrainingError(f"n_embd {arch.n_embd} is not a multiple of n_head {arch.n_head}")
    return GPT2Config(
        vocab_size=arch.vocab_size,
        n_positions=arch.n_positions,
        n_embd=arch.n_embd,
        n_layer=arch.n_layer,
        n_head=arch.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )


def build_model(spec: TrainSpec, vocab_size: int, eos_token_id: int) -> Any:
    """A fresh model of ``spec.architecture`` (seeded), or ``spec.base_model`` loaded to fine-tune.

    ``vocab_size`` is the tokenizer's: it must fit the model's embedding table.

    Raises:
        TrainingError: the tokenizer does not fit the model, or LoRA is asked without ``peft``.
    """
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    torch.manual_seed(spec.hyperparameters.seed)
    model: Any
    if spec.base_model:
        model = AutoModelForCausalLM.from_pretrained(spec.base_model, dtype=torch.float32)
    else:
        assert spec.architecture is not None  # TrainSpec requires one without a base model
        model = GPT2LMHeadModel(gpt2_config(spec.architecture, eos_token_id))
    quiet_loss_type(model)
    embeddings = int(model.get_input_embeddings().num_embeddings)
    if vocab_size > embeddings:
        raise TrainingError(
            f"the tokenizer has {vocab_size} tokens but the model embeds only {embeddings}"
        )
    rank = spec.hyperparameters.lora_rank
    if rank:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise TrainingError(
                f"lora_rank {rank} needs the peft package in the training image"
            ) from exc
        model = get_peft_model(
            model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
        )
    return model


def quiet_loss_type(model: Any) -> Any:
    """Name the causal-LM loss on ``model`` (transformers warns when it is unset)."""
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def parameter_count(model: Any) -> int:
    """Distinct parameters of ``model`` (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def resolve_device(options: TrainOptions) -> torch.device:
    """The device ``options.device`` names; ``auto`` picks CUDA when present.

    Raises:
        TrainingError: CUDA is asked for and absent.
    """
    if options.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' was asked for but torch sees no CUDA device")
    return device


def resolve_precision(options: TrainOptions, device: torch.device) -> str:
    """``bf16`` or ``fp32``: ``auto`` is bf16 autocast on CUDA and fp32 on the CPU."""
    if options.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if options.precision not in ("bf16", "fp32"):
        raise TrainingError(f"precision {options.precision!r} is neither bf16 nor fp32")
    return options.precision

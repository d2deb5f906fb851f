"""A byte-level BPE tokenizer trained on the corpus: no download, any text encodes.

Byte-level means every UTF-8 byte is in the base alphabet, so no input is unknown; the
merges are learned from the corpus up to the architecture's ``vocab_size``. The one special
token ``<|endoftext|>`` separates documents and serves as BOS, EOS and padding, as in GPT-2.
The result is a ``transformers`` fast tokenizer, saved beside the weights.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from homelab_dagster.errors import TrainingError

__all__ = ["EOS_TOKEN", "build_tokenizer", "load_tokenizer"]

EOS_TOKEN = "<|endoftext|>"


def build_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> Any:
    """Train a byte-level BPE of at most ``vocab_size`` tokens on ``texts``.

    Returns a ``transformers`` fast tokenizer whose ``eos_token`` is :data:`EOS_TOKEN`.
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise TrainingError(f"vocab_size {vocab_size} is below the 256 bytes plus {EOS_TOKEN}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=max_length,
    )


def load_tokenizer(path_or_id: str) -> Any:
    """A saved tokenizer (a directory, or a hub id where the hub is reachable)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    if tokenizer.eos_token is None:
        raise TrainingError(f"the tokenizer of {path_or_id} has no end-of-text token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

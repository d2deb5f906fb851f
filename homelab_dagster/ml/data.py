"""Dataset preparation: corpus text to blocks of token ids, split into train and held-out.

A dataset directory holds::

    tokens.safetensors   int32 tensors "train" [n, seq_len] and "eval" [m, seq_len]
    dataset.json         counts, seq_len, vocabulary size, the corpus digest
    tokenizer/           the tokenizer (absent for synthetic benchmark data)

Documents are joined with the end-of-text token and cut into ``seq_len`` blocks; a seeded
permutation sends ``eval_fraction`` of the blocks (at least one) to the held-out split, so
the split is the same on every machine for the same corpus, tokenizer and seed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from homelab_dagster.errors import TrainingError
from homelab_dagster.ml.corpus import read_corpus_dir
from homelab_dagster.ml.spec import TrainSpec
from homelab_dagster.ml.tokenizer import build_tokenizer, load_tokenizer

__all__ = ["DatasetInfo", "load_dataset", "prepare_dataset", "synthetic_dataset", "tokenizer_dir"]

TOKENS_FILE = "tokens.safetensors"
INFO_FILE = "dataset.json"
TOKENIZER_DIR = "tokenizer"


@dataclass
class DatasetInfo:
    """The shape of a prepared dataset."""

    seq_len: int
    vocab_size: int
    tokens: int
    train_blocks: int
    eval_blocks: int
    corpus_digest: str
    has_tokenizer: bool


def prepare_dataset(corpus_dir: str | Path, out_dir: str | Path, spec: TrainSpec) -> DatasetInfo:
    """Tokenise the staged corpus in ``corpus_dir`` into a dataset directory ``out_dir``.

    Raises:
        TrainingError: the corpus is empty, or too short for one training and one held-out
            block of ``seq_len`` tokens, or ``seq_len`` exceeds the architecture's positions.
    """
    hp, arch = spec.hyperparameters, spec.architecture
    texts, digest = read_corpus_dir(corpus_dir)
    if spec.base_model:
        tokenizer = load_tokenizer(spec.base_model)
    else:
        assert arch is not None  # TrainSpec requires one without a base model
        if hp.seq_len > arch.n_positions:
            raise TrainingError(
                f"seq_len {hp.seq_len} exceeds the architecture's n_positions {arch.n_positions}"
            )
        tokenizer = build_tokenizer(texts, arch.vocab_size, arch.n_positions)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    blocks = len(ids) // hp.seq_len
    if blocks < 2:
        raise TrainingError(
            f"the corpus gives {len(ids)} tokens: too few for one training and one held-out "
            f"block of seq_len {hp.seq_len}"
        )
    stream = torch.tensor(ids[: blocks * hp.seq_len], dtype=torch.int32).view(blocks, hp.seq_len)
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(hp.seed))
    n_eval = min(blocks - 1, max(1, round(blocks * hp.eval_fraction)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {"train": stream[order[n_eval:]].contiguous(), "eval": stream[order[:n_eval]].contiguous()},
        str(out / TOKENS_FILE),
    )
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    info = DatasetInfo(
        seq_len=hp.seq_len,
        vocab_size=len(tokenizer),
        tokens=len(ids),
        train_blocks=blocks - n_eval,
        eval_blocks=n_eval,
        corpus_digest=digest,
        has_tokenizer=True,
    )
    (out / INFO_FILE).write_text(json.dumps(asdict(info), indent=2))
    return info


def synthetic_dataset(
    out_dir: str | Path, vocab_size: int, seq_len: int, blocks: int, seed: int = 0
) -> DatasetInfo:
    """Uniformly random token blocks (benchmarks: throughput does not depend on the text)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (blocks, seq_len), generator=generator, dtype=torch.int32)
    n_eval = max(1, blocks // 10)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {"train": tokens[n_eval:].contiguous(), "eval": tokens[:n_eval].contiguous()},
        str(out / TOKENS_FILE),
    )
    info = DatasetInfo(
        seq_len=seq_len,
        vocab_size=vocab_size,
        tokens=blocks * seq_len,
        train_blocks=blocks - n_eval,
        eval_blocks=n_eval,
        corpus_digest="synthetic",
        has_tokenizer=False,
    )
    (out / INFO_FILE).write_text(json.dumps(asdict(info), indent=2))
    return info


def load_dataset(directory: str | Path) -> tuple[torch.Tensor, torch.Tensor, DatasetInfo]:
    """``(train blocks, held-out blocks, info)`` of a prepared dataset directory."""
    directory = Path(directory)
    try:
        tensors = load_file(str(directory / TOKENS_FILE))
        raw: dict[str, Any] = json.loads((directory / INFO_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{directory} is not a prepared dataset: {exc}") from exc
    return tensors["train"], tensors["eval"], DatasetInfo(**raw)


def tokenizer_dir(directory: str | Path) -> Path:
    """Where a dataset directory keeps its tokenizer."""
    return Path(directory) / TOKENIZER_DIR

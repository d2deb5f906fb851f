"""The training code itself: corpus, digest, tokenizer, the training function, export."""

from __future__ import annotations

import hashlib
import re
import statistics
from pathlib import Path

import pytest
from _ml_support import CPU, needs_ml, tiny_spec, write_corpus

from homelab_dagster.errors import TrainingError
from homelab_dagster.inventory import Inventory
from homelab_dagster.ml.corpus import resolve_corpus
from homelab_dagster.ml.digest import directory_digest, tree_digest


def test_digest_is_sha256_over_sorted_path_and_file_digests(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_bytes(b"beta")
    (tmp_path / "sub" / "a.txt").write_bytes(b"alpha")
    lines = "".join(
        f"{path}\0{hashlib.sha256(data).hexdigest()}\n"
        for path, data in sorted([("b.txt", b"beta"), ("sub/a.txt", b"alpha")])
    )
    digest, files, size = directory_digest(tmp_path)
    assert digest == hashlib.sha256(lines.encode()).hexdigest()
    assert set(files) == {"b.txt", "sub/a.txt"} and size == 9
    assert tree_digest(reversed(list(files.items()))) == digest  # order does not matter


def test_corpus_digest_follows_content_not_location(tmp_path: Path) -> None:
    one = resolve_corpus(write_corpus(tmp_path / "one"), ["docs/**/*.md", "README.md"])
    two = resolve_corpus(write_corpus(tmp_path / "two"), ["docs/**/*.md", "README.md"])
    assert one.digest == two.digest and one.files
    (tmp_path / "two" / "docs" / "runbook.md").write_text("Something else entirely.")
    assert resolve_corpus(tmp_path / "two", ["docs/**/*.md"]).digest != one.digest


@pytest.mark.parametrize(
    ("files", "globs", "message"),
    [
        ({}, ["docs/**/*.md"], "match no files"),
        ({"docs/a.md": "", "docs/b.md": "  \n"}, ["docs/*.md"], "all of them empty"),
        ({"docs/a.md": "text"}, ["../*.md"], "stay below it"),
    ],
)
def test_empty_corpus_is_a_clear_error(
    tmp_path: Path, files: dict[str, str], globs: list[str], message: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(TrainingError, match=message):
        resolve_corpus(tmp_path, globs)


@needs_ml
def test_a_corpus_too_short_for_one_block_fails(tmp_path: Path) -> None:
    from homelab_dagster.ml.data import prepare_dataset

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "short.md").write_text("too short")
    with pytest.raises(TrainingError, match="too few"):
        prepare_dataset(tmp_path / "c", tmp_path / "d", tiny_spec())


@needs_ml
@pytest.mark.slow
def test_training_really_trains_and_exports_loadable_weights(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from homelab_dagster.ml.train import run_pipeline

    corpus = resolve_corpus(write_corpus(tmp_path / "src"), ["README.md", "docs/**/*.md"])
    weights, digest, report, evaluation = run_pipeline(
        corpus.stage(tmp_path / "corpus"), tmp_path / "work", tiny_spec(), CPU
    )
    # The loss goes down over the steps (means of the first and last ten, not two samples).
    assert statistics.mean(report.losses[-10:]) < statistics.mean(report.losses[:10]) - 0.3
    assert report.final_loss < report.first_loss
    assert evaluation.eval_loss < report.first_loss and evaluation.eval_tokens > 0
    # The digest is the files' digest; the files are Hugging Face format.
    assert directory_digest(weights)[0] == digest
    names = {p.name for p in weights.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    model = AutoModelForCausalLM.from_pretrained(weights)
    tokenizer = AutoTokenizer.from_pretrained(weights)
    assert sum(p.numel() for p in model.parameters()) == report.parameter_count
    prompt = tokenizer("When the vllm pod restarts,", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8
    assert isinstance(tokenizer.decode(out[0]), str)


@needs_ml
@pytest.mark.slow
def test_fine_tuning_starts_from_a_base_model(tmp_path: Path) -> None:
    """A base model (here a local directory: the hub is off limits) is fine-tuned, not re-built."""
    from dataclasses import replace

    from homelab_dagster.ml.train import run_pipeline

    corpus = resolve_corpus(write_corpus(tmp_path / "src"), ["docs/**/*.md"]).stage(tmp_path / "c")
    base, _, first, _ = run_pipeline(corpus, tmp_path / "base", tiny_spec(steps=40), CPU)
    tuned = replace(tiny_spec(steps=10, learning_rate=1e-3), base_model=str(base))
    _, _, report, _ = run_pipeline(corpus, tmp_path / "tuned", tuned, CPU)
    # It starts where the base model ended, far below a fresh model's first loss.
    assert report.first_loss < first.first_loss - 0.5


@needs_ml
@pytest.mark.slow
def test_lora_fine_tuning_trains_an_adapter_and_exports_it_merged(tmp_path: Path) -> None:
    """``lora_rank`` as the shipped run sets it (peft is in the ml extra and the training
    image): only the adapter trains, and the export is the base with the adapter merged in: a
    plain transformers model (no LoRA weights, no peft needed to load it) whose weights moved
    from the base's and which loads and generates offline."""
    from dataclasses import replace

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from homelab_dagster.ml.train import run_pipeline

    corpus = resolve_corpus(write_corpus(tmp_path / "src"), ["docs/**/*.md"]).stage(tmp_path / "c")
    base, _, _, _ = run_pipeline(corpus, tmp_path / "base", tiny_spec(steps=20), CPU)
    spec = tiny_spec(steps=10, learning_rate=1e-2)
    spec = replace(
        spec,
        base_model=str(base),
        hyperparameters=replace(spec.hyperparameters, lora_rank=4),
    )
    tuned, _, report, _ = run_pipeline(corpus, tmp_path / "tuned", spec, CPU)
    # Trainable: the adapter only, a few percent of the tiny model.
    assert report.parameter_count > 0
    merged = load_file(str(tuned / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    assert not [k for k in merged if "lora" in k.lower()]
    assert set(merged) == set(original)
    moved = [
        k
        for k in merged
        if merged[k].shape == original[k].shape and not torch.equal(merged[k], original[k])
    ]
    assert moved, "the merged adapter changed no weight"
    # Embeddings are not a LoRA target ("all-linear"): they stay the base's.
    assert torch.equal(merged["transformer.wte.weight"], original["transformer.wte.weight"])
    model = AutoModelForCausalLM.from_pretrained(str(tuned))
    assert not hasattr(model, "peft_config")


@needs_ml
def test_the_unigram_baseline_lies_between_an_untrained_and_a_trained_model(
    tmp_path: Path,
) -> None:
    import math
    from collections import Counter

    from homelab_dagster.ml.data import load_dataset, prepare_dataset
    from homelab_dagster.ml.train import evaluate_model, train_model

    # The runbook alone (some 1,600 tokens, repetitive): a model beats its frequencies in seconds.
    corpus = resolve_corpus(write_corpus(tmp_path / "src"), ["docs/runbook.md"])
    data = tmp_path / "dataset"
    info = prepare_dataset(corpus.stage(tmp_path / "corpus"), data, tiny_spec())
    reports = []
    for name, steps, rate in (("untrained", 1, 1e-6), ("trained", 30, 6e-3)):
        train_model(data, tmp_path / name, tiny_spec(steps=steps, learning_rate=rate), CPU)
        reports.append(evaluate_model(tmp_path / name, data, CPU))
    untrained, trained = reports
    # By hand: the training split's frequencies, add-one smoothed, over the tokens the eval
    # loss predicts (every held-out block but its first position).
    train, held_out, _ = load_dataset(data)
    counts = Counter(train.flatten().tolist())
    total = train.numel() + info.vocab_size
    targets = held_out[:, 1:].flatten().tolist()
    expected = -sum(math.log((counts[t] + 1) / total) for t in targets) / len(targets)
    assert math.isfinite(expected) and trained.eval_tokens == len(targets)
    assert trained.unigram_loss == pytest.approx(expected, rel=1e-9)
    assert untrained.unigram_loss == trained.unigram_loss  # the data's, not the model's
    # A model at its random start knows less than the frequencies; a trained one more.
    assert trained.eval_loss < expected < untrained.eval_loss


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]{3,}", text.lower())


@needs_ml
@pytest.mark.slow
def test_the_shipped_twin_run_continues_a_corpus_phrase_with_corpus_words(
    tmp_path: Path, project_root: Path, shipped_inventory: Inventory
) -> None:
    """The twin's model says something a person can read (about a minute: the whole run).

    One rank on the whole batch, which is the twin's two ranks on halves of it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from homelab_dagster.ml.spec import Architecture, Hyperparameters, TrainSpec
    from homelab_dagster.ml.train import run_pipeline

    run = shipped_inventory.training_runs["sre-runbook"]
    arch = shipped_inventory.models[run.model].architecture
    assert run.twin_hyperparameters is not None and arch is not None
    spec = TrainSpec(
        model=run.model,
        hyperparameters=Hyperparameters(**run.twin_hyperparameters.model_dump()),
        architecture=Architecture(**arch.model_dump(exclude={"family"})),
    )
    corpus = resolve_corpus(project_root, run.corpus)
    text = " ".join(
        " ".join((project_root / name).read_text(encoding="utf-8").split()) for name in corpus.files
    )
    vocabulary = set(_words(text))
    weights, _, _, evaluation = run_pipeline(
        corpus.stage(tmp_path / "corpus"), tmp_path / "work", spec, CPU
    )
    assert evaluation.unigram_loss is not None
    assert evaluation.eval_loss < evaluation.unigram_loss - 1.0
    model = AutoModelForCausalLM.from_pretrained(weights).eval()
    tokenizer = AutoTokenizer.from_pretrained(weights)
    phrases = ("Everything runs against", "The twin is", "Try a change on the")
    worded = []
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} is no longer in the corpus: pick another"
        prompt = tokenizer(phrase, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **prompt, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
        completion = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
        assert len(set("".join(completion.split()))) > 1, f"{phrase!r} -> {completion!r}"
        known = {word for word in _words(completion) if word in vocabulary}
        worded.append((phrase, completion, sorted(known)))
    # Most phrases (greedy decoding of a 2-layer model can loop on one) go on in corpus words.
    assert sum(len(known) >= 2 for _, _, known in worded) >= 2, worded


@needs_ml
def test_seq_len_beyond_the_models_positions_is_refused(tmp_path: Path) -> None:
    from dataclasses import replace

    from homelab_dagster.ml.data import prepare_dataset

    spec = tiny_spec()
    spec = replace(spec, hyperparameters=replace(spec.hyperparameters, seq_len=1024))
    with pytest.raises(TrainingError, match="n_positions"):
        prepare_dataset(write_corpus(tmp_path / "c"), tmp_path / "d", spec)


@needs_ml
def test_training_code_imports_neither_flytekit_nor_dagster() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, homelab_dagster.ml.train, homelab_dagster.ml.data;"
        "print(','.join(m for m in ('flytekit', 'dagster') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

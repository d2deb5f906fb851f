"""The weights' promotion and rollback rules (homelab_dagster.weights), without Dagster."""

from __future__ import annotations

import re

import pytest

from homelab_dagster.errors import WeightsError
from homelab_dagster.weights import (
    ROLLBACK_VERDICT,
    WeightsVersion,
    decide_promotion,
    history_table,
    registration_from_run,
    regression_verdict,
    rollback_metadata,
    version_metadata,
)


def version(
    tag: str, eval_loss: float | None = None, created: str = "2026-01-01"
) -> WeightsVersion:
    """A version whose digest is ``tag`` repeated to 64 characters."""
    return WeightsVersion(
        model="m",
        digest=(tag * 64)[:64],
        uri=f"/store/m/versions/{tag}",
        size_bytes=10,
        files={"model.safetensors": "0" * 64},
        source_run="run",
        metrics={} if eval_loss is None else {"eval_loss": eval_loss},
        created_at=created,
    )


# ---------------------------------------------------------------------------- the gate


@pytest.mark.parametrize(
    ("candidate", "current", "passed", "description"),
    [
        (version("a", 2.0), None, True, "no current version yet"),
        (version("a", 2.0), version("a", 2.0), True, "this version is the current one"),
        (version("a"), version("b", 2.0), True, "no held-out loss to compare"),
        (version("a", 2.0), version("b"), True, "no held-out loss to compare"),
        (version("a", 2.1), version("b", 2.0), True, "held-out loss 2.1000 <= 2.1000"),
        (version("a", 1.5), version("b", 2.0), True, "held-out loss 1.5000 <= 2.1000"),
        (version("a", 2.2), version("b", 2.0), False, "worse than the current version's 2.0000"),
    ],
)
def test_the_gate_allows_at_most_the_margin_worse(
    candidate: WeightsVersion, current: WeightsVersion | None, passed: bool, description: str
) -> None:
    verdict = regression_verdict(candidate, current, margin=0.05)
    assert verdict.passed is passed
    assert description in verdict.description


def test_the_gate_records_what_it_compared() -> None:
    verdict = regression_verdict(version("a", 2.2), version("b", 2.0), margin=0.05)
    assert dict(verdict.metadata) == {
        "margin": 0.05,
        "candidate": "a" * 64,
        "current": "b" * 64,
        "observed_eval_loss": 2.2,
        "current_eval_loss": 2.0,
        "max_allowed_eval_loss": pytest.approx(2.1),
    }
    assert "by more than 5% (allowed 2.1000)" in verdict.description
    first = regression_verdict(version("a"), None, margin=0.05)
    assert dict(first.metadata) == {"margin": 0.05, "candidate": "a" * 64}


# ---------------------------------------------------------------------------- promotion


def test_the_first_version_becomes_current() -> None:
    first = version("a", 3.0)
    promotion = decide_promotion(first, new=True, current=None, margin=0.05)
    assert promotion.promote and promotion.current == first and promotion.verdict.passed
    assert promotion.summary("m") == (
        "registered new version aaaaaaaaaaaa of m; now current (no current version yet)"
    )


def test_a_new_version_that_passes_the_gate_replaces_the_current_one() -> None:
    better = version("b", 1.9)
    promotion = decide_promotion(better, new=True, current=version("a", 2.0), margin=0.05)
    assert promotion.promote and promotion.current == better


def test_a_new_version_that_regresses_is_held_and_the_current_one_stays() -> None:
    current = version("a", 2.0)
    promotion = decide_promotion(version("b", 3.0), new=True, current=current, margin=0.05)
    assert not promotion.promote and not promotion.verdict.passed
    assert promotion.current == current
    assert promotion.summary("m").startswith(
        "registered new version bbbbbbbbbbbb of m; current stays aaaaaaaaaaaa (held-out loss"
    )


def test_a_version_registered_before_is_not_made_current_again_by_registering_it() -> None:
    """Rejected or rolled back from earlier: only a rollback makes it current again."""
    old = version("b", 1.0)
    promotion = decide_promotion(old, new=False, current=version("a", 2.0), margin=0.05)
    assert promotion.verdict.passed and not promotion.promote
    assert promotion.current is not None and promotion.current.digest == "a" * 64
    assert promotion.verdict.description.endswith(
        "; registered before and not current: materialise with config "
        "rollback_to: bbbbbbbbbbbb to make it current"
    )
    assert promotion.summary("m").startswith("found registered version bbbbbbbbbbbb of m;")


def test_registering_the_current_version_again_changes_nothing() -> None:
    current = version("a", 2.0)
    promotion = decide_promotion(current, new=False, current=current, margin=0.05)
    assert not promotion.promote and promotion.verdict.passed
    assert promotion.current == current
    assert promotion.verdict.description == "this version is the current one"


# ---------------------------------------------------------------------------- registration


RECORDED: dict[str, object] = {
    "weights_uri": "/flyte/local-run/weights",
    "weights_digest": "d" * 64,
    "execution_id": "local-run-1",
    "execution_url": "file:///flyte/local-run-1",
    "fingerprint": "f" * 64,
    "corpus_digest": "c" * 64,
    "parameter_count": 141_056,
    "train_loss_final": 4,
    "eval_loss": 4.5,
    "perplexity": 90.0,
    "loss_curve": [6.0, 5.0, 4.0],
    "reused": False,
}


def test_a_training_runs_metadata_becomes_a_registration() -> None:
    registration = registration_from_run("sre-runbook", RECORDED)
    assert (registration.run, registration.uri, registration.digest) == (
        "sre-runbook",
        "/flyte/local-run/weights",
        "d" * 64,
    )
    assert registration.metrics == {"train_loss_final": 4.0, "eval_loss": 4.5, "perplexity": 90.0}
    assert registration.parameter_count == 141_056
    # The fields are WeightsVersion's own: the store passes them through.
    stored = WeightsVersion(
        model="m",
        digest=registration.digest,
        uri="/store",
        size_bytes=1,
        files={},
        created_at="now",
        **registration.version_fields(),
    )
    assert stored.source_run == "sre-runbook" and stored.execution_id == "local-run-1"
    assert stored.fingerprint == "f" * 64 and stored.eval_loss == 4.5


def test_a_reused_runs_metadata_without_a_url_or_count_registers_too() -> None:
    recorded = {k: v for k, v in RECORDED.items() if k not in {"execution_url", "perplexity"}}
    registration = registration_from_run("r", {**recorded, "parameter_count": None})
    assert registration.execution_url is None and registration.parameter_count is None
    assert set(registration.metrics) == {"train_loss_final", "eval_loss"}
    assert registration_from_run("r", {**RECORDED, "execution_id": ""}).execution_id is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weights_uri": None}, "records no weights_uri"),
        ({"weights_digest": ""}, "records no weights_digest"),
        ({"eval_loss": "low"}, "eval_loss = 'low', not a number"),
        ({"parameter_count": True}, "parameter_count = True, not a number"),
    ],
)
def test_a_materialisation_without_usable_weights_is_a_weights_error(
    change: dict[str, object], message: str
) -> None:
    with pytest.raises(WeightsError, match=re.escape(message)):
        registration_from_run("r", {**RECORDED, **change})


# ---------------------------------------------------------------------------- metadata


def _documented_weights_keys(project_root) -> set[str]:
    text = (project_root / "docs" / "training.md").read_text()
    section = text[text.index("`model_weights/<model>` (data version") :]
    section = section[: section.index("The check `eval_loss_regression`")]
    return set(re.findall(r"`([a-z_]+)`", section))


def test_the_metadata_of_a_version_uses_the_documented_keys(project_root) -> None:
    old, new = version("a", 2.0, "2026-01-01"), version("b", 1.9, "2026-02-01")
    metadata = version_metadata(
        new,
        source_run="sre-runbook",
        metrics={"train_loss_final": 1.5, "eval_loss": 1.9, "perplexity": 6.7},
        new=True,
        promoted=True,
        current=new,
        versions=[old, new],
    )
    assert set(metadata) <= _documented_weights_keys(project_root)
    assert metadata["digest"] == "b" * 64 and metadata["current_digest"] == "b" * 64
    assert metadata["version_count"] == 2 and metadata["parameter_count"] == 0
    assert metadata["eval_loss"] == 1.9 and metadata["execution_id"] == ""


def test_the_history_lists_the_newest_first_and_marks_the_current_one() -> None:
    old, new = version("a", 2.0, "2026-01-01"), version("b", None, "2026-02-01")
    rows = history_table([old, new], current=old).splitlines()
    assert rows[0] == "| digest | created | run | eval loss | current |"
    assert rows[2:] == [
        "| `bbbbbbbbbbbb` | 2026-02-01 | run |  |  |",
        "| `aaaaaaaaaaaa` | 2026-01-01 | run | 2.0000 | yes |",
    ]


def test_a_rollback_records_the_version_it_made_current_and_the_one_before(
    project_root,
) -> None:
    old, new = version("a", 2.0), version("b", 3.0)
    metadata = rollback_metadata(old, before=new, versions=[old, new])
    assert set(metadata) <= _documented_weights_keys(project_root)
    assert metadata["rolled_back_from"] == "b" * 64
    assert metadata["current_digest"] == "a" * 64 and metadata["promoted"] is True
    assert metadata["new_version"] is False and metadata["eval_loss"] == 2.0
    assert rollback_metadata(old, before=None, versions=[old])["rolled_back_from"] == ""
    assert ROLLBACK_VERDICT.passed and "no gate applies" in ROLLBACK_VERDICT.description

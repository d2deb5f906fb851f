"""Versions of a model's weights and the rules that decide which one is current.

``model_weights/<model>`` applies these rules and the weights store
(:mod:`resources.weights`) keeps the versions; nothing here reads or writes anything or
imports Dagster, so the rules are tested on their own. A materialisation does one of two
things:

- **register, then gate** (the default): :func:`registration_from_run` reads what the
  newest training run's materialisation recorded; the store registers those weights;
  :func:`decide_promotion` applies the regression gate (:func:`regression_verdict`) and
  says whether the version becomes current; :func:`version_metadata` is what the
  materialisation records.
- **roll back** (the config ``rollback_to``): the store makes an older version current;
  :func:`rollback_metadata` and :data:`ROLLBACK_VERDICT` are what that records.

The metadata keys are documented in docs/training.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel, Field

from homelab_dagster.checks import Verdict
from homelab_dagster.errors import WeightsError

__all__ = [
    "ROLLBACK_VERDICT",
    "RUN_METRICS",
    "Promotion",
    "Registration",
    "WeightsVersion",
    "decide_promotion",
    "history_table",
    "registration_from_run",
    "regression_verdict",
    "rollback_metadata",
    "version_metadata",
]

RUN_METRICS = ("train_loss_final", "eval_loss", "eval_unigram_loss", "perplexity")
"""The metrics of a training run's materialisation that a version keeps."""


class WeightsVersion(BaseModel):
    """One registered version of a model's weights and what is known about it."""

    model: str
    digest: str
    uri: str = Field(description="Where the version's files are.")
    size_bytes: int
    files: dict[str, str] = Field(description="Relative path -> sha256 of every file.")
    checksums: dict[str, str] = Field(
        default_factory=dict,
        description="Relative path -> the SHA-256 checksum the object store keeps for it "
        "(base64; S3's composite form for a file stored in parts).",
    )
    parameter_count: int | None = None
    source_run: str | None = None
    execution_id: str | None = None
    execution_url: str | None = None
    fingerprint: str | None = Field(default=None, description="The training inputs' digest.")
    corpus_digest: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: str

    @property
    def eval_loss(self) -> float | None:
        """The held-out loss, where the version was evaluated."""
        return self.metrics.get("eval_loss")


ROLLBACK_VERDICT = Verdict(True, "a rollback picks a registered version by hand: no gate applies")
"""The gate's outcome on a rollback: a person chose the version, so it does not apply."""


@dataclass(frozen=True)
class Registration:
    """What ``model_weights`` registers from one materialisation of training run ``run``."""

    run: str
    uri: str
    digest: str
    metrics: dict[str, float]
    execution_id: str | None = None
    execution_url: str | None = None
    fingerprint: str | None = None
    corpus_digest: str | None = None
    parameter_count: int | None = None

    def version_fields(self) -> dict[str, Any]:
        """The optional fields of :class:`WeightsVersion`, as ``WeightsStore.register`` takes
        them."""
        return {
            "source_run": self.run,
            "execution_id": self.execution_id,
            "execution_url": self.execution_url,
            "fingerprint": self.fingerprint,
            "corpus_digest": self.corpus_digest,
            "parameter_count": self.parameter_count,
            "metrics": dict(self.metrics),
        }


def _number(run: str, name: str, value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise WeightsError(f"training run {run} recorded {name} = {value!r}, not a number")


def registration_from_run(run: str, recorded: Mapping[str, object]) -> Registration:
    """What to register from the metadata values ``recorded`` by a materialisation of ``run``.

    Raises:
        WeightsError: the materialisation names no weights (``weights_uri``,
            ``weights_digest``), or records a metric that is not a number.
    """
    missing = [k for k in ("weights_uri", "weights_digest") if not recorded.get(k)]
    if missing:
        raise WeightsError(
            f"the materialisation of training run {run} records no {' and no '.join(missing)}"
        )

    def text(name: str) -> str | None:
        value = recorded.get(name)
        return str(value) if value else None

    count = recorded.get("parameter_count")
    return Registration(
        run=run,
        uri=str(recorded["weights_uri"]),
        digest=str(recorded["weights_digest"]),
        metrics={
            name: _number(run, name, value)
            for name in RUN_METRICS
            if (value := recorded.get(name)) is not None
        },
        execution_id=text("execution_id"),
        execution_url=text("execution_url"),
        fingerprint=text("fingerprint"),
        corpus_digest=text("corpus_digest"),
        parameter_count=None if count is None else int(_number(run, "parameter_count", count)),
    )


def regression_verdict(
    candidate: WeightsVersion, current: WeightsVersion | None, margin: float
) -> Verdict:
    """Whether ``candidate`` may replace ``current``: its held-out loss is at most
    ``current``'s times ``1 + margin`` (relative). It passes too when there is no current
    version, when ``candidate`` is the current one, or when either has no held-out loss."""
    observed = candidate.eval_loss
    metadata: dict[str, Any] = {"margin": margin, "candidate": candidate.digest}
    if observed is not None:
        metadata["observed_eval_loss"] = observed
    if current is None:
        return Verdict(True, "no current version yet", metadata)
    if current.digest == candidate.digest:
        return Verdict(True, "this version is the current one", metadata)
    metadata["current"] = current.digest
    if observed is None or current.eval_loss is None:
        return Verdict(True, "one of the versions has no held-out loss to compare", metadata)
    allowed = current.eval_loss * (1 + margin)
    metadata |= {"current_eval_loss": current.eval_loss, "max_allowed_eval_loss": allowed}
    if observed <= allowed:
        return Verdict(True, f"held-out loss {observed:.4f} <= {allowed:.4f}", metadata)
    return Verdict(
        False,
        f"held-out loss {observed:.4f} is worse than the current version's "
        f"{current.eval_loss:.4f} by more than {margin:.0%} (allowed {allowed:.4f})",
        metadata,
    )


@dataclass(frozen=True)
class Promotion:
    """What registering ``version`` does to its model's current version.

    ``promote``: make ``version`` current. ``current``: the current version once this is
    applied. ``verdict``: the gate's outcome, recorded by the check.
    """

    version: WeightsVersion
    new: bool
    promote: bool
    current: WeightsVersion | None
    verdict: Verdict

    def summary(self, model: str) -> str:
        """One log line: what was registered and which version is current."""
        verb = "registered new" if self.new else "found registered"
        if self.promote:
            outcome = "now current"
        else:
            outcome = f"current stays {self.current.digest[:12] if self.current else 'none'}"
        return (
            f"{verb} version {self.version.digest[:12]} of {model}; {outcome} "
            f"({self.verdict.description})"
        )


def decide_promotion(
    version: WeightsVersion, *, new: bool, current: WeightsVersion | None, margin: float
) -> Promotion:
    """Whether the just registered ``version`` (``new``: registered by this call) becomes
    current, ``current`` being the current version before.

    A version passing the gate becomes current when there is no current version or when it
    is new. A version registered before and not current (rejected, or rolled back from) is
    never made current again this way: only a rollback does that, and the verdict says so.
    """
    verdict = regression_verdict(version, current, margin)
    differs = current is not None and current.digest != version.digest
    promote = verdict.passed and (current is None or (new and differs))
    if verdict.passed and not promote and differs:
        verdict = replace(
            verdict,
            description=f"{verdict.description}; registered before and not current: "
            f"materialise with config rollback_to: {version.digest[:12]} to make it current",
        )
    return Promotion(version, new, promote, version if promote else current, verdict)


def history_table(versions: list[WeightsVersion], current: WeightsVersion | None) -> str:
    """A markdown table of ``versions``, newest first, marking the current one."""
    rows = ["| digest | created | run | eval loss | current |", "|---|---|---|---|---|"]
    for v in reversed(versions):
        loss = f"{v.eval_loss:.4f}" if v.eval_loss is not None else ""
        mark = "yes" if current and v.digest == current.digest else ""
        rows.append(
            f"| `{v.digest[:12]}` | {v.created_at} | {v.source_run or ''} | {loss} | {mark} |"
        )
    return "\n".join(rows)


def version_metadata(
    version: WeightsVersion,
    *,
    source_run: str,
    metrics: Mapping[str, float],
    new: bool,
    promoted: bool,
    current: WeightsVersion | None,
    versions: list[WeightsVersion],
) -> dict[str, Any]:
    """The metadata a ``model_weights`` materialisation records, as plain values;
    ``versions`` is markdown (:func:`history_table`)."""
    return {
        "digest": version.digest,
        "weights_uri": version.uri,
        "size_bytes": version.size_bytes,
        "parameter_count": version.parameter_count or 0,
        "source_run": source_run,
        "execution_id": version.execution_id or "",
        **metrics,
        "new_version": new,
        "promoted": promoted,
        "current_digest": current.digest if current else "",
        "version_count": len(versions),
        "versions": history_table(versions, current),
    }


def rollback_metadata(
    version: WeightsVersion, *, before: WeightsVersion | None, versions: list[WeightsVersion]
) -> dict[str, Any]:
    """The metadata of a rollback that made ``version`` current instead of ``before``."""
    return {
        **version_metadata(
            version,
            source_run=version.source_run or "",
            metrics=version.metrics,
            new=False,
            promoted=True,
            current=version,
            versions=versions,
        ),
        "rolled_back_from": before.digest if before else "",
    }

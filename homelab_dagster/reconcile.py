"""The reconcile's rules: what drift is, when a failing asset is tried again, when it is
stalled, and how ready a cluster is.

Plain functions of what was observed, tested on their own; the reconcile's checks, sensors
and ``homelab status`` apply them (``assets/``, ``sensors/reconcile.py``,
``sensors/failures.py``, ``cli/status.py``).

- **Drift** (:func:`drift_verdict`): the steps of a ``pulumi refresh --preview-only`` that
  would change the state (a resource gone, a property changed behind Pulumi's back), each
  named with the properties that differ. None: no drift.
- **Repair** (:class:`RepairRecord`, :func:`repair_decision`): an asset whose
  materialisations fail is tried again after a back-off that doubles with each consecutive
  failure (:func:`backoff_s`); after :data:`STALL_AFTER` in a row it is *stalled*: the
  reconcile stops repairing it (and says why) until a materialisation succeeds. Every other
  asset keeps reconciling.
- **Readiness** (:func:`readiness`): the share of a cluster's checks that pass now.
- **The drift watch's fingerprints** (:class:`LiveRef`, :func:`live_refs`,
  :func:`fingerprint`, :func:`changed_objects`): the Kubernetes objects a stack's state holds,
  and a digest of each as the API server returns it, less what the cluster itself keeps
  changing (``status``, ``resourceVersion``, ``managedFields``). A stack whose objects all
  still have the digests recorded when Pulumi last agreed with the world cannot have drifted;
  one whose objects changed is refreshed (``sensors/reconcile.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from homelab_dagster.checks import Verdict

__all__ = [
    "ABSENT",
    "BACKOFF_BASE_S",
    "BACKOFF_MAX_S",
    "STALL_AFTER",
    "LiveRef",
    "RepairRecord",
    "Step",
    "backoff_s",
    "changed_objects",
    "drift_verdict",
    "fingerprint",
    "live_refs",
    "readiness",
    "repair_decision",
]

STALL_AFTER = 3
"""Consecutive failed materialisations after which an asset is stalled."""
BACKOFF_BASE_S = 30.0
"""The wait after a first failure; doubled after each further one."""
BACKOFF_MAX_S = 1800.0
"""The longest wait between two repairs of one asset."""

# The metadata keys of a repair record (docs/metadata.md), on an observation of the asset.
_FAILURES = "homelab_failures"
_REASON = "homelab_last_failure"
_RUN = "homelab_last_failure_run"
_STALLED = "homelab_stalled"
_NEXT = "homelab_next_repair_at"


class Step(Protocol):
    """One resource's step in a Pulumi operation (``resources._stack_result.ResourceStep``)."""

    @property
    def op(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def diffs(self) -> tuple[str, ...]: ...
    @property
    def changes(self) -> bool: ...


def drift_verdict(stack: str, steps: Iterable[Step]) -> Verdict:
    """Whether a refresh preview of ``stack`` found nothing to change; the drifted resources
    (type, name, what the refresh would do, the properties that differ) otherwise."""
    steps = list(steps)
    resources = [s for s in steps if not s.type.startswith("pulumi:")]
    drifted = [s for s in resources if s.changes]
    named = [
        f"{s.type} {s.name} ({s.op}" + (f": {', '.join(s.diffs)})" if s.diffs else ")")
        for s in drifted
    ]
    return Verdict(
        passed=not drifted,
        description=f"{stack}: {len(drifted)} resource(s) drifted: {'; '.join(named)}"
        if drifted
        else f"{stack}: no drift ({len(resources)} resources match the state)",
        metadata={
            "pulumi_stack": stack,
            "drifted_count": len(drifted),
            "drifted": [
                {"type": s.type, "name": s.name, "op": s.op, "properties": list(s.diffs)}
                for s in drifted
            ],
        },
    )


def backoff_s(failures: int) -> float:
    """How long to wait before repairing again after ``failures`` consecutive failures."""
    if failures <= 0:
        return 0.0
    return min(BACKOFF_BASE_S * 2 ** (failures - 1), BACKOFF_MAX_S)


@dataclass(frozen=True)
class RepairRecord:
    """An asset's consecutive failed materialisations: how many, the last one's reason,
    run and time (seconds since the epoch)."""

    failures: int
    reason: str
    run_id: str
    at: float

    @property
    def stalled(self) -> bool:
        """Whether the reconcile has stopped repairing the asset."""
        return self.failures >= STALL_AFTER

    @property
    def next_repair_at(self) -> float:
        """When the reconcile may repair the asset again (if it is not stalled)."""
        return self.at + backoff_s(self.failures)

    def then_failed(self, reason: str, run_id: str, at: float) -> RepairRecord:
        """The record after one more failure."""
        return RepairRecord(self.failures + 1, reason, run_id, at)

    @classmethod
    def first(cls, reason: str, run_id: str, at: float) -> RepairRecord:
        """The record of a first failure (after a success, or ever)."""
        return cls(1, reason, run_id, at)

    def metadata(self) -> dict[str, Any]:
        """The record as metadata (plain values; docs/metadata.md)."""
        return {
            _FAILURES: self.failures,
            _REASON: self.reason,
            _RUN: self.run_id,
            _STALLED: self.stalled,
            _NEXT: self.next_repair_at,
        }

    @classmethod
    def from_metadata(cls, values: Mapping[str, Any], at: float) -> RepairRecord | None:
        """The record ``values`` hold (plain metadata values), None if they hold none."""
        if _FAILURES not in values:
            return None
        return cls(
            failures=int(values[_FAILURES]),
            reason=str(values.get(_REASON, "")),
            run_id=str(values.get(_RUN, "")),
            at=at,
        )


def repair_decision(
    key: str, record: RepairRecord | None, *, enabled: bool, now: float
) -> tuple[bool, str]:
    """Whether the reconcile repairs the drifted asset ``key`` now, and why (not)."""
    if not enabled:
        return False, f"{key} drifted: auto-repair is off for its family (left for a person)"
    if record is None:
        return True, f"{key} drifted: repairing"
    if record.stalled:
        return False, (
            f"{key} is stalled after {record.failures} failed materialisations in a row "
            f"(last: {record.reason}); not repaired until one succeeds"
        )
    if now < record.next_repair_at:
        wait = record.next_repair_at - now
        return False, f"{key} drifted: failed {record.failures} time(s), next try in {wait:.0f} s"
    return True, f"{key} drifted: repairing (attempt {record.failures + 1} of {STALL_AFTER})"


def readiness(results: Mapping[str, bool | None]) -> float:
    """The share of checks that pass (None: never evaluated, counted as not passing); 0.0
    for no checks."""
    if not results:
        return 0.0
    return sum(1 for passed in results.values() if passed) / len(results)


# ---------------------------------------------------------------------- the drift watch

ABSENT = "absent"
"""The fingerprint of an object the API server does not have."""
# What the cluster changes on its own, never drift: the status (kubelets, controllers), the
# object's version and the record of which manager set which field.
_VOLATILE_METADATA = ("resourceVersion", "managedFields")


@dataclass(frozen=True, order=True)
class LiveRef:
    """A Kubernetes object a stack's state holds: the kubeconfig context of its provider, its
    ``apiVersion``, ``kind``, namespace (empty: cluster-scoped) and name."""

    context: str
    api_version: str
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.context}:{self.api_version}/{self.kind}/{where}"

    def record(self, fingerprint: str) -> dict[str, str]:
        """The object and its ``fingerprint`` as plain metadata (docs/metadata.md)."""
        return {**dataclasses.asdict(self), "fingerprint": fingerprint}

    @classmethod
    def from_record(cls, record: Mapping[str, str]) -> tuple[LiveRef, str]:
        """The object and fingerprint :meth:`record` wrote."""
        fields = (f.name for f in dataclasses.fields(cls))
        return cls(*(str(record[f]) for f in fields)), str(record["fingerprint"])


def live_refs(deployment: Mapping[str, Any]) -> list[LiveRef] | None:
    """The Kubernetes objects of an exported stack state (``pulumi stack export``'s
    ``deployment``), each with its provider's context; None when the state holds a
    Kubernetes resource that is not one object (a Helm release: its objects are Helm's)."""
    resources = deployment.get("resources") or []
    contexts = {
        r["urn"]: str((r.get("inputs") or {}).get("context", ""))
        for r in resources
        if str(r.get("type", "")).startswith("pulumi:providers:kubernetes")
    }
    refs = []
    for r in resources:
        if not str(r.get("type", "")).startswith("kubernetes:"):
            continue
        outputs = r.get("outputs") or {}
        metadata = outputs.get("metadata") or {}
        if not (outputs.get("apiVersion") and outputs.get("kind") and metadata.get("name")):
            return None
        provider = str(r.get("provider", "")).rpartition("::")[0]
        refs.append(
            LiveRef(
                contexts.get(provider, ""),
                str(outputs["apiVersion"]),
                str(outputs["kind"]),
                str(metadata.get("namespace") or ""),
                str(metadata["name"]),
            )
        )
    return sorted(refs)


def fingerprint(obj: Mapping[str, Any] | None) -> str:
    """A digest of an object as the API server returned it (None: it has none), less what
    the cluster changes on its own: any change made to it by a person or another tool changes
    the digest."""
    if obj is None:
        return ABSENT
    kept = {k: v for k, v in obj.items() if k != "status"}
    metadata = kept.get("metadata") or {}
    kept["metadata"] = {k: v for k, v in metadata.items() if k not in _VOLATILE_METADATA}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_objects(recorded: Mapping[str, str], live: Mapping[str, str]) -> list[str]:
    """The objects whose fingerprints differ between ``recorded`` and ``live`` (reference to
    fingerprint), each said: ``<ref> changed``, ``<ref> deleted``, ``<ref> not recorded``."""
    said = []
    for ref in sorted(set(recorded) | set(live)):
        before, now = recorded.get(ref), live.get(ref)
        if before == now:
            continue
        if before is None:
            said.append(f"{ref} not recorded")
        elif now == ABSENT:
            said.append(f"{ref} deleted")
        else:
            said.append(f"{ref} changed")
    return said

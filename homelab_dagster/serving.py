"""The rules an endpoint is held to: its rollout, the name it serves, its latency, its history.

``vllm_endpoint/<endpoint>`` (:mod:`assets.endpoints`) observes the world through its
resources and applies these functions; nothing here reads or writes anything or imports
Dagster, so the rules are tested on their own.

- :func:`observed_pod` and :func:`rollout_state`: whether the server's pods serve, wait, or
  failed (the scheduler's refusal, a crashed container), in words an SRE reads;
- :func:`serves_weights`, :func:`within_budget`, :func:`chat_answers`: the serving checks'
  verdicts, observed and expected values in their metadata;
- :func:`serves_current_version`: whether the endpoint is behind its model's current weights,
  and for how long;
- :func:`latency_stats`: p50 and p95 latency and tokens per second over a few requests;
- :func:`previous_version`: which weights version ``homelab rollback`` goes back to.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from homelab_dagster.checks import Verdict, duration

__all__ = [
    "ObservedPod",
    "Rollout",
    "chat_answers",
    "crash_cause",
    "killed_by_signal",
    "latency_stats",
    "observed_pod",
    "previous_version",
    "rollout_state",
    "serves_current_version",
    "serves_weights",
    "within_budget",
]


@dataclass(frozen=True)
class ObservedPod:
    """What a rollout needs of one pod: where it runs, whether it serves, and why not."""

    name: str
    digest: str  # the weights-digest annotation of its template
    node: str | None
    phase: str
    ready: bool
    unschedulable: str | None = None  # the scheduler's message, while it cannot place the pod
    waiting: str | None = None  # a container's waiting reason and message (CrashLoopBackOff)
    terminated: str | None = None  # a container's last termination (exit code, reason)
    # An init container (the weights copy step) that failed: its name and what it said.
    init_failed: str | None = None
    restarts: int = 0
    deleting: bool = False
    age_s: float = 0.0  # seconds since the pod was created


def observed_pod(pod: Any) -> ObservedPod:
    """An :class:`ObservedPod` of a Kubernetes client ``V1Pod``."""
    conditions = {c.type: c for c in (pod.status.conditions or [])}
    scheduled = conditions.get("PodScheduled")
    unschedulable = (
        scheduled.message or scheduled.reason
        if scheduled is not None and scheduled.status == "False"
        else None
    )
    waiting = terminated = init_failed = None
    restarts = 0
    for status in pod.status.init_container_statuses or []:
        held = status.state and status.state.waiting
        if held and held.reason and "ImagePull" in held.reason:
            waiting = f"{held.reason}: {held.message or ''}".strip(": ")
        ended = (status.state and status.state.terminated) or (
            status.last_state and status.last_state.terminated
        )
        if ended and ended.exit_code:
            said = (ended.message or "").strip() or f"exit code {ended.exit_code}"
            init_failed = f"{status.name}: {said}"
    for status in pod.status.container_statuses or []:
        restarts += status.restart_count or 0
        state, last = status.state, status.last_state
        if state and state.waiting and state.waiting.reason not in (None, "ContainerCreating"):
            waiting = f"{state.waiting.reason}: {state.waiting.message or ''}".strip(": ")
        ended = (state and state.terminated) or (last and last.terminated)
        if ended:
            terminated = f"exit code {ended.exit_code} ({ended.reason or 'no reason'})"
    ready = conditions.get("Ready")
    return ObservedPod(
        name=pod.metadata.name,
        digest=(pod.metadata.annotations or {}).get("homelab.dev/weights-digest", ""),
        node=pod.spec.node_name,
        phase=pod.status.phase or "Unknown",
        ready=ready is not None and ready.status == "True",
        unschedulable=unschedulable,
        waiting=waiting,
        terminated=terminated,
        init_failed=init_failed,
        restarts=restarts,
        deleting=pod.metadata.deletion_timestamp is not None,
        age_s=_age_s(pod.metadata.creation_timestamp),
    )


def _age_s(created: datetime | None) -> float:
    return (datetime.now(UTC) - created).total_seconds() if created is not None else 0.0


@dataclass(frozen=True)
class Rollout:
    """Where a rollout stands: ``state`` is ``serving``, ``waiting`` or ``failed``."""

    state: str
    reason: str
    pod: ObservedPod | None = None

    @property
    def done(self) -> bool:
        return self.state != "waiting"


def rollout_state(
    pods: Sequence[ObservedPod],
    digest: str,
    *,
    scheduled_is_enough: bool = False,
    restarts_forgiven: Mapping[str, int] | None = None,
) -> Rollout:
    """The rollout of ``digest`` from its pods (others, leaving, are ignored).

    Failed at once when the scheduler refuses a pod (its message names what is missing, e.g.
    ``Insufficient nvidia.com/gpu``) or a container crashed (a model vLLM cannot load exits;
    its log says why). ``scheduled_is_enough``: a pod placed on a node is the goal (an
    endpoint whose weights are not here proves only its scheduling). ``restarts_forgiven``:
    by pod name, the restarts that count as the kubelet's own retry, not as a crash.
    """
    forgiven = restarts_forgiven or {}
    current = [p for p in pods if p.digest == digest and not p.deleting]
    if not current:
        return Rollout("waiting", "no pod of this version yet")
    for pod in current:
        if pod.unschedulable:
            return Rollout(
                "failed", f"the scheduler cannot place pod {pod.name}: {pod.unschedulable}", pod
            )
        if pod.init_failed:
            return Rollout(
                "failed", f"pod {pod.name} never started its server: {pod.init_failed}", pod
            )
        if pod.waiting and ("ImagePull" in pod.waiting or "InvalidImageName" in pod.waiting):
            return Rollout("failed", f"pod {pod.name} cannot pull its image: {pod.waiting}", pod)
        retried = pod.restarts <= forgiven.get(pod.name, -1)  # the kubelet's restart, awaited
        backing_off = bool(pod.waiting and "BackOff" in pod.waiting) and not retried
        if (pod.restarts and not retried) or backing_off or pod.phase == "Failed":
            why = pod.waiting or pod.terminated or pod.phase
            return Rollout("failed", f"the server in pod {pod.name} crashed: {why}", pod)
    if scheduled_is_enough:
        placed = [p for p in current if p.node]
        if placed:
            return Rollout("serving", f"pod {placed[0].name} placed on {placed[0].node}", placed[0])
    ready = [p for p in current if p.ready]
    if ready:
        return Rollout("serving", f"pod {ready[0].name} serves on {ready[0].node}", ready[0])
    pod = current[0]
    what = pod.unschedulable or pod.waiting or f"{pod.phase}, not ready yet"
    return Rollout("waiting", f"pod {pod.name}: {what}", pod)


_ERROR_LINE = re.compile(r"\b(\w+(?:Error|Exception)): (.+)$")
# A process killed by a signal (the kernel's OOM killer, SIGBUS on a full /dev/shm) leaves no
# traceback: vLLM's API server only notices that its engine process is gone.
_DEATH_LINE = re.compile(r"engine core exited unexpectedly|died unexpectedly|\bKilled\b")
_DEATH_HINT = (
    "its engine process exited without an error of its own (killed by a signal: the node "
    "out of memory?)"
)


def killed_by_signal(cause: str) -> bool:
    """The :func:`crash_cause` of a server whose engine died of a signal, with no error of
    its own (a fault of the node, not of the version it serves): the only error its log
    names besides is vLLM's ``EngineDeadError``, the API server's word for it."""
    first, *others = cause.split("; ")
    return first == _DEATH_HINT and all(o.startswith("EngineDeadError") for o in others)


def crash_cause(log: str, most: int = 3) -> str:
    """The distinct ``SomeError: message`` lines of a crashed server's log, in order (the
    root cause comes first: the process that reports the failure last only says it failed),
    else its last line. An engine process that died without a traceback is said first."""
    found: list[str] = []
    for line in log.splitlines():
        if _DEATH_LINE.search(line) and _DEATH_HINT not in found:
            found.insert(0, _DEATH_HINT)
            continue
        if " WARNING " in line:
            continue  # vLLM warns of errors that may come (`OSError: [Errno 24]` at start)
        match = _ERROR_LINE.search(line)
        if match:
            text = f"{match.group(1)}: {match.group(2).strip()}"
            if text not in found:
                found.append(text)
    if found:
        return "; ".join(found[:most])
    lines = [line for line in log.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no log)"


def serves_weights(listed: Sequence[str], expected: str) -> Verdict:
    """``/v1/models`` lists ``expected`` (``<served name>@<digest>``)."""
    metadata = {"observed": list(listed), "expected": expected}
    if expected in listed:
        return Verdict(True, f"the server lists {expected}", metadata)
    return Verdict(
        False,
        f"the server lists {', '.join(listed) or 'no model'}, not {expected}: it does not serve "
        "this weights version",
        metadata,
    )


def within_budget(text: str, tokens: int, latency_s: float, budget_ms: int) -> Verdict:
    """A completion returned text (at least one token) within ``budget_ms``."""
    ms = round(latency_s * 1000, 1)
    metadata = {
        "latency_ms": ms,
        "latency_budget_ms": budget_ms,
        "completion_tokens": tokens,
        "sample": text[:200],
    }
    if tokens < 1:
        return Verdict(False, "the completion returned no tokens", metadata)
    if ms > budget_ms:
        return Verdict(
            False, f"the completion took {ms} ms, above the {budget_ms} ms budget", metadata
        )
    return Verdict(True, f"{tokens} tokens in {ms} ms (budget {budget_ms} ms)", metadata)


def chat_answers(text: str, tokens: int, latency_s: float) -> Verdict:
    """A chat completion (the server applied the chat template) returned tokens."""
    metadata = {"latency_ms": round(latency_s * 1000, 1), "completion_tokens": tokens}
    if tokens < 1:
        return Verdict(False, "the chat completion returned no tokens", metadata)
    return Verdict(
        True, f"the chat completion answered ({tokens} tokens)", {**metadata, "sample": text[:200]}
    )


def latency_stats(latencies_s: Sequence[float], tokens: Sequence[int]) -> dict[str, float]:
    """p50 and p95 latency (ms) and tokens per second (all tokens over all time)."""
    if not latencies_s:
        return {}
    ordered = sorted(latencies_s)
    p95_index = min(len(ordered) - 1, max(0, round(0.95 * len(ordered) + 0.5) - 1))
    total = sum(latencies_s)
    return {
        "latency_p50_ms": round(statistics.median(ordered) * 1000, 1),
        "latency_p95_ms": round(ordered[p95_index] * 1000, 1),
        "tokens_per_s": round(sum(tokens) / total, 2) if total > 0 else 0.0,
        "requests": float(len(latencies_s)),
    }


def previous_version(history: Sequence[str], current: str | None) -> str | None:
    """The version served before ``current`` (``history``: digests, oldest first)."""
    earlier = [d for d in history if d and d != current]
    return earlier[-1] if earlier else None


def serves_current_version(
    served: str | None,
    current: str | None,
    current_since: datetime | None,
    now: datetime,
    roll_forward: str,
) -> Verdict:
    """The endpoint's deployed version (``served``) is its model's current one (``current``,
    current since ``current_since``); where it is behind, by how long, and what rolls it
    forward (``roll_forward``: the command)."""
    lag_s = round((now - current_since).total_seconds()) if current_since else 0
    metadata: dict[str, Any] = {
        "served_digest": served or "",
        "current_digest": current or "",
        "behind_s": lag_s if current and served != current else 0,
    }
    if current is None:
        return Verdict(True, "the model has no current version in the store", metadata)
    if served == current:
        return Verdict(True, f"serves the current version {current[:12]}", metadata)
    what = f"serves {served[:12]}" if served else "serves nothing yet"
    return Verdict(
        False,
        f"{what}, but {current[:12]} has been the current version for {duration(lag_s)}: "
        f"{roll_forward} rolls it forward",
        metadata,
    )

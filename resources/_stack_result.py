"""What a Pulumi operation did, and how its engine events reach the Dagster log.

:class:`EventRecorder` receives the engine's structured events as they happen (the Automation
API calls it from a gRPC thread), logs one line per resource step (creating, updating,
deleting, and for a preview "would create", ...), and keeps the steps and the engine's error
diagnostics, and the root stack's outputs. :class:`StackResult` is the typed result an
operation returns; its :meth:`~StackResult.metadata` are the stable metadata keys documented in
docs/metadata.md. :func:`change_counts`, :func:`up_outputs` and :func:`read_outputs` take the
rest from the Automation API's public results.

Secrets never pass through here in clear: Pulumi masks secret values in its events and
diagnostics (``[secret]``, at any depth), and outputs marked secret are replaced by
:data:`SECRET_MASK`. ``UpResult.outputs`` holds secrets in clear (the SDK reads them with
``--show-secrets``), and flags only top-level ones: only its flags are used.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import dagster as dg

__all__ = [
    "SECRET_MASK",
    "EventRecorder",
    "Log",
    "ResourceStep",
    "StackResult",
    "change_counts",
    "changed_paths",
    "mask_outputs",
    "mask_value",
    "read_outputs",
    "up_outputs",
]

SECRET_MASK = "[secret]"
# How the engine marks a secret value in state and events (a key of the value's object).
_SECRET_SIG = "4dabf18193072939515e22adb298388d"
# The engine's note that a provider plugin came from PATH: how the twin's toolchain works.
_AMBIENT_PLUGIN = re.compile(r"^using pulumi-resource-\S+ from \$PATH")
# Steps that change nothing in the world; the rest are changes.
_NO_CHANGE = {"same", "read", "refresh", "discard", "discard-replaced"}
_GERUND = {
    "create": "creating",
    "update": "updating",
    "delete": "deleting",
    "replace": "replacing",
    "create-replacement": "creating replacement of",
    "delete-replaced": "deleting replaced",
    "read": "reading",
    "refresh": "refreshing",
    "import": "importing",
}
# What Kubernetes changes on any write: never the drift itself, so left out of its paths.
_VOLATILE = {"resourceVersion", "managedFields", "generation"}
_DIFF_DEPTH = 4
_PAST = {
    "create": "created",
    "update": "updated",
    "delete": "deleted",
    "replace": "replaced",
    "create-replacement": "created replacement of",
    "delete-replaced": "deleted replaced",
    "import": "imported",
}


class Log(Protocol):
    """Where operations log: ``context.log`` in Dagster, a ``logging.Logger`` elsewhere."""

    def debug(self, msg: str) -> Any: ...
    def info(self, msg: str) -> Any: ...
    def warning(self, msg: str) -> Any: ...
    def error(self, msg: str) -> Any: ...


@dataclass(frozen=True)
class ResourceStep:
    """One resource's step in an operation: what the engine did (or plans to do) to it."""

    op: str
    type: str
    name: str
    status: str
    diffs: tuple[str, ...] = ()

    @property
    def changes(self) -> bool:
        """Whether the step changes the world (or would, in a preview)."""
        return self.op not in _NO_CHANGE


def mask_value(value: Any) -> Any:
    """``value`` with every secret inside it, at any depth, replaced by :data:`SECRET_MASK`."""
    if isinstance(value, dict):
        if _SECRET_SIG in value:
            return SECRET_MASK
        return {k: mask_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_value(v) for v in value]
    return value


def mask_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """Plain values of a stack's outputs (``auto.OutputValue`` or plain), each secret one
    replaced by :data:`SECRET_MASK`."""
    return {
        name: SECRET_MASK
        if getattr(out, "secret", False)
        else mask_value(getattr(out, "value", out))
        for name, out in sorted(outputs.items())
    }


def changed_paths(old: Any, new: Any, prefix: str = "", depth: int = _DIFF_DEPTH) -> list[str]:
    """The dotted paths (``metadata.labels.role``) where two property trees differ, at most
    ``depth`` levels down; paths only, never values (they may be secret)."""
    if (
        isinstance(old, dict)
        and isinstance(new, dict)
        and depth > 0
        and _SECRET_SIG not in old
        and _SECRET_SIG not in new
    ):
        paths = []
        for key in sorted(set(old) | set(new), key=str):
            if key not in _VOLATILE and old.get(key) != new.get(key):
                paths += changed_paths(old.get(key), new.get(key), f"{prefix}{key}.", depth - 1)
        return paths
    return [prefix.rstrip(".")] if old != new and prefix else []


def change_counts(result: Any, recorder: EventRecorder) -> dict[str, int]:
    """Resources per operation (``{"same": 20, "create": 2}``) from an Automation API result:
    ``PreviewResult.change_summary``, else ``.summary.resource_changes`` (up, refresh,
    destroy); the engine's summary event where the history has none."""
    found = getattr(result, "change_summary", None)
    if found is None:
        found = getattr(getattr(result, "summary", None), "resource_changes", None)
    found = found or recorder.summary or {}
    return {str(getattr(op, "value", op)): n for op, n in found.items()}


def up_outputs(stack: Any, result: Any, recorder: EventRecorder) -> dict[str, Any]:
    """The outputs of an ``UpResult``, masked: values as the engine's events report them
    (secrets masked at any depth), and every output ``UpResult.outputs`` flags secret masked
    too. Without the root stack's event (never seen), :func:`read_outputs`."""
    if recorder.stack_outputs is None:
        return read_outputs(stack)
    flagged = {k for k, out in result.outputs.items() if out.secret}
    return {
        k: SECRET_MASK if k in flagged else mask_value(v)
        for k, v in sorted(recorder.stack_outputs.items())
    }


def read_outputs(stack: Any) -> dict[str, Any]:
    """A stack's outputs as ``pulumi stack output --json`` shows them: secrets masked by the
    CLI, never decrypted (``Stack.outputs()`` would ask for them with ``--show-secrets``).
    One CLI run through the workspace's public ``PulumiCommand``."""
    ws = stack.workspace
    env = {"PULUMI_HOME": ws.pulumi_home, **ws.env_vars} if ws.pulumi_home else ws.env_vars
    result = ws.pulumi_command.run(
        ["stack", "output", "--json", "--stack", stack.name], ws.work_dir, env
    )
    return mask_outputs(json.loads(result.stdout or "{}"))


@dataclass(frozen=True)
class StackResult:
    """The typed result of one stack operation (preview, up, refresh or destroy)."""

    operation: str
    stack: str
    changes: dict[str, int]
    duration_s: float
    outputs: dict[str, Any] = field(default_factory=dict)
    steps: tuple[ResourceStep, ...] = ()

    @property
    def changed(self) -> int:
        """How many resources the operation changed (or would change, in a preview)."""
        return sum(n for op, n in self.changes.items() if op not in _NO_CHANGE)

    @property
    def resource_count(self) -> int:
        """Resources the stack manages after the operation (Pulumi's own bookkeeping excluded)."""
        return sum(1 for s in self.steps if not s.type.startswith("pulumi:") and s.op != "delete")

    def plan_markdown(self) -> str:
        """The steps that change something, one row each (everything, when nothing changes)."""
        rows = [s for s in self.steps if s.changes and not s.type.startswith("pulumi:")]
        if not rows:
            return f"No changes: {self.resource_count} resources up to date."
        lines = ["| step | type | name | changed fields |", "|---|---|---|---|"]
        lines += [f"| {s.op} | `{s.type}` | {s.name} | {', '.join(s.diffs) or '-'} |" for s in rows]
        return "\n".join(lines)

    def metadata(self) -> dict[str, dg.RawMetadataValue]:
        """Materialisation metadata with stable keys (docs/metadata.md)."""
        return {
            "pulumi_stack": self.stack,
            "pulumi_operation": self.operation,
            "pulumi_changes": dg.MetadataValue.json(dict(sorted(self.changes.items()))),
            "pulumi_changed": self.changed,
            "pulumi_duration_s": round(self.duration_s, 3),
            "pulumi_resource_count": self.resource_count,
            "pulumi_outputs": dg.MetadataValue.json(self.outputs),
            "pulumi_plan": dg.MetadataValue.md(self.plan_markdown()),
        }


class EventRecorder:
    """Receives engine events for one operation: logs each resource step, keeps them all."""

    def __init__(self, stack: str, operation: str, log: Log) -> None:
        self._stack = stack
        self._preview = operation == "preview"
        self._log = log
        self._lock = threading.Lock()
        self._steps: dict[str, ResourceStep] = {}
        self.errors: list[str] = []
        self.summary: dict[str, int] | None = None
        # The root stack resource's outputs, as the engine reports them (secrets masked at any
        # depth, where UpResult.outputs flags only top-level ones and holds values in clear).
        self.stack_outputs: dict[str, Any] | None = None

    def __call__(self, event: Any) -> None:
        """The ``on_event`` callback (runs on the Automation API's event thread)."""
        with self._lock:
            if event.resource_pre_event is not None:
                self._step(
                    event.resource_pre_event.metadata, "planned" if self._preview else "started"
                )
            elif event.res_outputs_event is not None:
                meta = event.res_outputs_event.metadata
                self._step(meta, "planned" if self._preview else "done")
                if meta.type == "pulumi:pulumi:Stack" and meta.new is not None:
                    self.stack_outputs = dict(meta.new.outputs or {})
            elif event.res_op_failed_event is not None:
                self._step(event.res_op_failed_event.metadata, "failed")
            elif event.diagnostic_event is not None:
                self._diagnostic(event.diagnostic_event)
            elif event.summary_event is not None:
                self.summary = {
                    str(getattr(op, "value", op)): n
                    for op, n in event.summary_event.resource_changes.items()
                }

    @property
    def steps(self) -> tuple[ResourceStep, ...]:
        with self._lock:
            return tuple(self._steps.values())

    def _step(self, meta: Any, status: str) -> None:
        op = str(getattr(meta.op, "value", meta.op))
        name = meta.urn.rsplit("::", 1)[-1]
        diffs = tuple(meta.diffs or ())
        if not diffs and op not in _NO_CHANGE and meta.old is not None and meta.new is not None:
            # A refresh names no diffs: the properties whose state and live values differ.
            diffs = tuple(changed_paths(meta.old.outputs or {}, meta.new.outputs or {}))
        previous = self._steps.get(meta.urn)
        self._steps[meta.urn] = ResourceStep(
            op, meta.type, name, status, diffs or (previous.diffs if previous else ())
        )
        if meta.type.startswith("pulumi:") or (op in _NO_CHANGE and status != "failed"):
            return  # bookkeeping and unchanged resources: in the result, not in the log
        what = f"{meta.type} {name}" + (f" ({', '.join(diffs)})" if diffs else "")
        if status == "failed":
            self._log.error(f"{self._stack}: {op} failed: {what}")
        elif self._preview:
            if previous is None:
                self._log.info(f"{self._stack}: would {op} {what}")
        elif status == "started":
            self._log.info(f"{self._stack}: {_GERUND.get(op, op)} {what}")
        else:
            self._log.info(f"{self._stack}: {_PAST.get(op, op)} {meta.type} {name}")

    def _diagnostic(self, diag: Any) -> None:
        message = (diag.message or "").strip()
        if not message:
            return
        if diag.severity == "error":
            if message not in self.errors:
                self.errors.append(message)
            self._log.error(f"{self._stack}: {message}")
        elif diag.severity == "warning" and not _AMBIENT_PLUGIN.search(message):
            self._log.warning(f"{self._stack}: {message}")
        elif diag.severity != "debug":  # progress notes ("[1/3] Finding Pods..."), the
            self._log.debug(f"{self._stack}: {message}")  # twin's plugin found on PATH
        # "debug": the SDK's own tracing (a few per resource), never worth an event

    def reason(self, stderr: str) -> str:
        """Pulumi's reason for a failure: its error diagnostics, else the tail of its stderr."""
        if self.errors:
            return "\n".join(self.errors)
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        return "\n".join(lines[-8:]) or "no reason given"

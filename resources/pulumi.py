"""Pulumi stacks through the Automation API: one stack per infrastructure asset.

:class:`PulumiStacks` runs inline programs (zero-argument functions from ``infra/``) on stacks
of the project ``homelab`` named ``<target>.<asset key path>`` (``twin.cluster.forge``):
``preview``, ``up``, ``refresh``, ``destroy`` and ``outputs``. Each operation streams the
engine's events into the given log, resource by resource, and returns a
:class:`~resources._stack_result.StackResult` (change summary, duration, steps, outputs with
secrets masked).

Where things live (all under the state directory unless configured)::

    <state>/pulumi/backend/     the file backend (PULUMI_BACKEND_URL=file://...)
    <state>/pulumi/home/        PULUMI_HOME (plugins, workspace settings)
    <state>/pulumi/work/<stack> the project directory of each stack (Pulumi.yaml, its salt)
    <state>/pulumi/passphrase   the twin's secrets passphrase, generated once, mode 0600

**One inline program per process.** Pulumi's Python runtime keeps global state (the running
program's settings and its connection to the engine), so a process must never run two
inline programs at once. Dagster's multiprocess executor gives each step its own process, so
stacks update in parallel across steps; inside one process every operation holds
:data:`PROGRAM_LOCK` (a second caller, such as a sensor thread or the CLI, waits its turn).

**Locks.** A stack locked by another update is retried every ``lock_poll_s`` for up to
``lock_wait_s``, then fails with :class:`~homelab_dagster.errors.StackLockedError` naming the
lock's owner. A lock whose process is gone fails at once, with the command that clears it;
it is never cleared here.
"""

from __future__ import annotations

import functools
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from homelab_dagster.errors import StackError, StackLockedError, ToolchainError
from resources import _stack_locks
from resources._stack_result import EventRecorder, Log, StackResult, mask_outputs

if TYPE_CHECKING:
    from resources._event_stack import EventStack

__all__ = ["PROGRAM_LOCK", "PROJECT", "Program", "PulumiStacks"]

PROJECT = "homelab"
# Held while an inline program runs in this process (see the module's docstring).
PROGRAM_LOCK = threading.Lock()
Program = Callable[[], None]
_PASSPHRASE_VARS = ("PULUMI_CONFIG_PASSPHRASE", "PULUMI_CONFIG_PASSPHRASE_FILE")


class PulumiStacks(dg.ConfigurableResource):
    """Pulumi stacks of the project ``homelab``, run with the Automation API."""

    target: str = Field(description="twin or homelab: the first part of every stack name.")
    state_dir: str = Field(description="Where the file backend, PULUMI_HOME and work dirs live.")
    backend_url: str | None = Field(
        default=None,
        description="Pulumi backend (default: $PULUMI_BACKEND_URL, else "
        "file://<state_dir>/pulumi/backend).",
    )
    passphrase_file: str | None = Field(
        default=None,
        description="File holding the secrets passphrase (mode 0600, outside the repo). None: "
        "take PULUMI_CONFIG_PASSPHRASE or PULUMI_CONFIG_PASSPHRASE_FILE from the environment.",
    )
    generate_passphrase: bool = Field(
        default=False, description="Create passphrase_file with a random passphrase if missing."
    )
    use_toolchain: bool = Field(
        default=True, description="Run the twin toolchain's pulumi and provider plugin."
    )
    lock_wait_s: float = Field(default=120.0, ge=0, description="How long to wait for a lock.")
    lock_poll_s: float = Field(default=2.0, gt=0, description="How often to look again.")

    # ------------------------------------------------------------------ naming

    def stack_name(self, key_path: Sequence[str]) -> str:
        """``<target>.<asset key path joined by '.'>``, e.g. ``twin.cluster.forge``."""
        return ".".join([self.target, *key_path])

    @property
    def root(self) -> Path:
        """``<state_dir>/pulumi``."""
        return Path(self.state_dir) / "pulumi"

    @property
    def backend(self) -> str:
        """The backend URL in use: ``backend_url``, else ``$PULUMI_BACKEND_URL``, else the file
        backend under the state directory."""
        default = f"file://{self.root / 'backend'}"
        return self.backend_url or os.environ.get("PULUMI_BACKEND_URL") or default

    def work_dir(self, stack: str) -> Path:
        """The project directory of ``stack`` (Pulumi.yaml and the stack's settings)."""
        return self.root / "work" / stack

    # ------------------------------------------------------------------ operations

    def up(self, stack: str, program: Program, log: Log, *, refresh: bool = True) -> StackResult:
        """Bring ``stack`` to what ``program`` declares (refreshing first: repairs drift)."""
        return self._run(
            "up",
            stack,
            program,
            log,
            lambda s, rec: s.up(on_event=rec, color="never", refresh=refresh),
        )

    def preview(self, stack: str, program: Program, log: Log) -> StackResult:
        """What ``up`` would change, resource by resource; changes nothing."""
        return self._run(
            "preview", stack, program, log, lambda s, rec: s.preview(on_event=rec, color="never")
        )

    def refresh(
        self, stack: str, program: Program, log: Log, *, preview_only: bool = False
    ) -> StackResult:
        """Compare the state with the world; the changes are the drift (``preview_only``: report
        it without recording it in the state)."""

        def call(s: EventStack, rec: EventRecorder) -> Any:
            if preview_only:
                return s.preview_refresh(on_event=rec, color="never")
            return s.refresh(on_event=rec, color="never")

        return self._run("refresh", stack, program, log, call)

    def destroy(self, stack: str, log: Log, *, remove: bool = False) -> StackResult:
        """Delete every resource of ``stack`` (``remove``: then the stack and its history)."""

        from pulumi import automation as auto

        def call(s: EventStack, rec: EventRecorder) -> Any:
            result = s.destroy(on_event=rec, color="never")
            if remove:
                s.workspace.remove_stack(s.name)
            return result

        try:
            return self._run("destroy", stack, _empty_program, log, call, create=False)
        except auto.StackNotFoundError:
            log.info(f"{stack}: no such stack, nothing to destroy")
            return StackResult("destroy", stack, {}, 0.0)

    def outputs(self, stack: str) -> dict[str, Any]:
        """The stack's outputs, secret ones masked (empty for a stack never brought up)."""
        from pulumi import automation as auto

        with PROGRAM_LOCK:
            try:
                return mask_outputs(
                    self._stack(stack, _empty_program, create=False).masked_outputs()
                )
            except auto.StackNotFoundError:
                return {}
            except auto.CommandError as exc:
                raise StackError(f"cannot read the outputs of {stack}: {_tail(exc)}") from exc

    def locks(self, stack: str) -> list[_stack_locks.StackLock]:
        """The locks held on ``stack`` (file backend only; empty otherwise)."""
        return _stack_locks.read_locks(self.backend, stack)

    def env(self) -> dict[str, str]:
        """Variables every Pulumi command of this resource runs with (no secret values)."""
        root = self.root
        env = {
            "PULUMI_BACKEND_URL": self.backend,
            "PULUMI_HOME": str(root / "home"),
            "PULUMI_SKIP_UPDATE_CHECK": "true",
            "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
        }
        if self.use_toolchain:
            env |= _toolchain(env["PULUMI_HOME"])[0]
        if self.passphrase_file:
            env["PULUMI_CONFIG_PASSPHRASE_FILE"] = str(self._passphrase_path())
        return env

    # ------------------------------------------------------------------ machinery

    def _run(
        self,
        operation: str,
        stack_name: str,
        program: Program,
        log: Log,
        call: Callable[[EventStack, EventRecorder], Any],
        *,
        create: bool = True,
    ) -> StackResult:
        from pulumi import automation as auto

        if not PROGRAM_LOCK.acquire(blocking=False):
            log.info(f"{stack_name}: waiting for another Pulumi program in this process")
            PROGRAM_LOCK.acquire()
        try:
            stack = self._stack(stack_name, program, create=create)
            deadline = time.monotonic() + self.lock_wait_s
            while True:
                self._wait_for_locks(stack_name, deadline, log)
                recorder = EventRecorder(stack_name, operation, log)
                stack.recorder = recorder
                start = time.monotonic()
                try:
                    raw = call(stack, recorder)
                except auto.ConcurrentUpdateError as exc:
                    if time.monotonic() >= deadline:
                        raise self._locked(stack_name, exc) from exc
                    time.sleep(self.lock_poll_s)  # taken between our look and the CLI's
                    continue
                except auto.CommandError as exc:
                    raise StackError(
                        f"pulumi {operation} of stack {stack_name} failed: "
                        f"{recorder.reason(_stderr(exc))}"
                    ) from exc
                return self._result(operation, stack_name, raw, recorder, time.monotonic() - start)
        finally:
            PROGRAM_LOCK.release()

    def _wait_for_locks(self, stack: str, deadline: float, log: Log) -> None:
        announced = False
        while locks := self.locks(stack):
            if any(lock.dead for lock in locks):
                raise StackLockedError(self._describe(stack, locks))
            if time.monotonic() >= deadline:
                raise StackLockedError(
                    f"{self._describe(stack, locks)}; gave up after {self.lock_wait_s:.0f} s"
                )
            if not announced:
                log.info(f"{self._describe(stack, locks)}; waiting")
                announced = True
            time.sleep(self.lock_poll_s)

    def _describe(self, stack: str, locks: list[_stack_locks.StackLock]) -> str:
        return _stack_locks.describe(stack, locks, self.work_dir(stack), self.backend)

    def _locked(self, stack: str, exc: Exception) -> StackLockedError:
        locks = self.locks(stack)
        if locks:
            return StackLockedError(
                f"{self._describe(stack, locks)}; gave up after {self.lock_wait_s:.0f} s"
            )
        return StackLockedError(
            f"stack {stack} stayed locked for {self.lock_wait_s:.0f} s: {_tail(exc)}"
        )

    def _result(
        self, operation: str, stack: str, raw: Any, recorder: EventRecorder, seconds: float
    ) -> StackResult:
        if operation == "preview":
            changes = {str(getattr(k, "value", k)): v for k, v in raw.change_summary.items()}
        else:
            summary = getattr(raw, "summary", None)
            found = getattr(summary, "resource_changes", None) or recorder.summary or {}
            changes = {str(getattr(k, "value", k)): v for k, v in found.items()}
        outputs = mask_outputs(getattr(raw, "outputs", None) or {})
        return StackResult(operation, stack, changes, seconds, outputs, recorder.steps)

    def _stack(self, name: str, program: Program, *, create: bool = True) -> EventStack:
        """Stack ``name`` (created if missing, unless ``create`` is False: then
        ``auto.StackNotFoundError`` passes through)."""
        from pulumi import automation as auto

        from resources._event_stack import open_stack

        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        work_dir = self.work_dir(name)
        work_dir.mkdir(parents=True, exist_ok=True)
        backend_root = _stack_locks.file_backend_root(self.backend)
        if backend_root is not None:
            backend_root.mkdir(parents=True, exist_ok=True)
        env = self.env()
        self._check_passphrase()
        # A stack whose state and settings (its passphrase salt) are both here needs no
        # selecting: that would run the CLI once more only to find it.
        known = (
            _stack_locks.stack_recorded(self.backend, PROJECT, name)
            and (work_dir / f"Pulumi.{name}.yaml").is_file()
        )
        try:
            return open_stack(
                name,
                PROJECT,
                program,
                work_dir=str(work_dir),
                env=env,
                backend=self.backend,
                command=(
                    _command(*_toolchain(env["PULUMI_HOME"])[1:])
                    if self.use_toolchain
                    else _command(None, None)
                ),
                create=create,
                known=known,
            )
        except auto.StackNotFoundError:
            raise  # only when not creating: the caller knows what a missing stack means
        except auto.CommandError as exc:
            raise StackError(f"cannot create or select stack {name}: {_tail(exc)}") from exc

    def _passphrase_path(self) -> Path:
        assert self.passphrase_file is not None
        return Path(self.passphrase_file).expanduser()

    def _check_passphrase(self) -> None:
        """Make sure the CLI will find the passphrase, and only one (never reading it here)."""
        if self.passphrase_file is None:
            if not any(os.environ.get(v) for v in _PASSPHRASE_VARS):
                raise StackError(
                    "no secrets passphrase: set PULUMI_CONFIG_PASSPHRASE_FILE (a file outside the "
                    "repository, mode 0600) or PULUMI_CONFIG_PASSPHRASE"
                )
            return
        if "PULUMI_CONFIG_PASSPHRASE" in os.environ:
            raise StackError(
                "PULUMI_CONFIG_PASSPHRASE is set, but this target's stacks are encrypted with the "
                f"passphrase in {self._passphrase_path()} (Pulumi would prefer the variable): "
                "unset it"
            )
        path = self._passphrase_path()
        if not path.exists():
            if not self.generate_passphrase:
                raise StackError(f"the secrets passphrase file {path} does not exist")
            _write_new_passphrase(path)
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise StackError(
                f"the secrets passphrase file {path} is readable by others (mode {mode:o}): "
                f"chmod 600 {path}"
            )


def _empty_program() -> None:
    """The program of operations that do not run one (destroy, outputs)."""


def _write_new_passphrase(path: Path) -> None:
    """Create ``path`` (mode 0600) with a random passphrase; keep one a parallel step wrote."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")


@functools.cache
def _toolchain(pulumi_home: str) -> tuple[dict[str, str], str, str]:
    """PATH and Pulumi's variables from the twin's toolchain (its Kubernetes provider linked
    into ``pulumi_home``'s plugin cache, where the engine finds it by version), its pulumi
    binary and that binary's (verified) version."""
    from infra import toolchain

    try:
        tools = toolchain.ensure_toolchain(build=False)
    except ToolchainError as exc:
        raise ToolchainError(
            exc.tool, f"{exc.reason} (the twin's Pulumi comes from its toolchain)"
        ) from exc
    Path(pulumi_home).mkdir(mode=0o700, parents=True, exist_ok=True)
    variables = tools.env(pulumi_home=pulumi_home).items()
    env = {k: v for k, v in variables if k == "PATH" or k.startswith("PULUMI_")}
    return env, str(tools.pulumi), str(tools.versions["tools"]["pulumi"]["version"])


@functools.cache
def _command(pulumi: str | None, version: str | None) -> Any:
    """The Pulumi CLI: the toolchain's (version known), or ``pulumi`` on PATH (asked once)."""
    from pulumi.automation import PulumiCommand

    from resources._event_stack import KnownPulumi

    if pulumi is not None and version is not None:
        return KnownPulumi(pulumi, version)
    return PulumiCommand(skip_version_check=True)


def _stderr(exc: Exception) -> str:
    """The stderr part of a CommandError's text (``code: ... stdout: ... stderr: ...``)."""
    text = str(exc)
    return text.split("\n stderr: ", 1)[-1]


def _tail(exc: Exception) -> str:
    text = _stderr(exc)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-6:])

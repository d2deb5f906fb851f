"""Pulumi stacks through the Automation API: one stack per infrastructure asset.

:class:`PulumiStacks` runs inline programs (zero-argument functions from ``infra/``) on stacks
of the project ``homelab`` named ``<target>.<asset key path>`` (``twin.cluster.forge``):
``preview``, ``up``, ``refresh``, ``destroy`` and ``outputs``. Stacks are opened with the
Automation API's public functions (``auto.create_or_select_stack``, ``auto.select_stack``) and
operations are the public ``Stack`` methods. Each operation streams the engine's events into the
given log, resource by resource, and returns a :class:`~resources._stack_result.StackResult`
built from the SDK's typed result (its change summary) and those events (steps, and the stack's
outputs with every secret masked, as the engine reports them).

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

**Errors** from the SDK are mapped where they enter: ``auto.CommandError`` becomes
:class:`~homelab_dagster.errors.StackError` (with the engine's reason),
``auto.ConcurrentUpdateError`` is retried, then becomes ``StackLockedError``; a Pulumi CLI that
cannot be run or is too old becomes :class:`~homelab_dagster.errors.ToolchainError`.

**Damaged state.** A state file the CLI cannot load, or one deleted while the stack's history
remains, fails with :class:`~homelab_dagster.errors.StackStateError` naming the file and the
restore command (``homelab repair state <stack>``: :meth:`PulumiStacks.restore_state` imports
the newest readable copy Pulumi keeps). A deleted state is never silently re-created empty:
the next ``up`` would try to create, again, everything the stack already owns.

**Interrupts.** A step stopped while an operation runs (Dagster's terminate, SIGTERM)
cancels the Pulumi CLI gracefully (SIGINT: the operations in flight finish, the state is
saved, the lock released) before the interrupt goes on (:mod:`resources._stack_cancel`).

**Pending operations.** An update whose CLI was killed leaves the operations it had started in
the state (their outcome unknown). A failure names them; the next ``up`` (refreshing, the
default) first runs ``refresh --clear-pending-creates`` (the public
``Stack.refresh(clear_pending_creates=True)``): the refresh reads what really exists, and the
creates dropped from the state are applied again by the ``up`` (server-side apply adopts an
object that was in fact created).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from homelab_dagster.errors import StackError, StackLockedError, StackStateError, ToolchainError
from homelab_dagster.reconcile import LiveRef, live_refs
from resources import _stack_locks
from resources._stack_cancel import cancel_on_interrupt
from resources._stack_result import (
    EventRecorder,
    Log,
    StackResult,
    change_counts,
    read_outputs,
    up_outputs,
)

if TYPE_CHECKING:
    from pulumi import automation as auto

    # What the public Stack methods return.
    Outcome = auto.PreviewResult | auto.UpResult | auto.RefreshResult | auto.DestroyResult

__all__ = ["PROGRAM_LOCK", "PROJECT", "Program", "PulumiStacks", "StackResult"]

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
    install_charts: bool = Field(
        default=True,
        description="Declare the components' Helm releases (False where chart repositories "
        "cannot be reached: each is skipped with charts_note).",
    )
    charts_note: str = Field(default="", description="Why components are skipped, if they are.")
    linkerd_link: bool = Field(
        default=True, description="Declare Linkerd's Link resource in mesh link stacks."
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
        backend under the state directory; a file backend's with ``metadata=skip``, so that
        reading a state while another process writes it cannot fail
        (:func:`resources._stack_locks.file_backend_url`)."""
        default = f"file://{self.root / 'backend'}"
        url = self.backend_url or os.environ.get("PULUMI_BACKEND_URL") or default
        return _stack_locks.file_backend_url(url)

    def work_dir(self, stack: str) -> Path:
        """The project directory of ``stack`` (Pulumi.yaml and the stack's settings)."""
        return self.root / "work" / stack

    # ------------------------------------------------------------------ operations

    def up(self, stack: str, program: Program, log: Log, *, refresh: bool = True) -> StackResult:
        """Bring ``stack`` to what ``program`` declares (refreshing first: repairs drift, and
        clears the pending operations an interrupted update left)."""

        def call(s: auto.Stack, rec: EventRecorder) -> Outcome:
            files = _stack_locks.state_files(self.backend, PROJECT, stack)
            pending = files.pending_operations() if files and refresh else []
            if pending:
                log.warning(
                    f"{stack}: an interrupted update left {len(pending)} pending operation(s) "
                    f"({'; '.join(pending)}): refreshing with --clear-pending-creates, then "
                    "applying them again"
                )
                clearing = EventRecorder(stack, "refresh", log)
                s.refresh(
                    on_event=clearing, color="never", clear_pending_creates=True, show_secrets=False
                )
            return s.up(on_event=rec, color="never", refresh=refresh, show_secrets=False)

        return self._run("up", stack, program, log, call)

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

        def call(s: auto.Stack, rec: EventRecorder) -> Outcome:
            if preview_only:
                return s.preview_refresh(on_event=rec, color="never")
            return s.refresh(on_event=rec, color="never", show_secrets=False)

        return self._run("refresh", stack, program, log, call)

    def destroy(self, stack: str, log: Log, *, remove: bool = False) -> StackResult:
        """Delete every resource of ``stack`` (``remove``: then the stack and its history)."""
        from pulumi import automation as auto

        def call(s: auto.Stack, rec: EventRecorder) -> Outcome:
            return s.destroy(on_event=rec, color="never", remove=remove, show_secrets=False)

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
                return read_outputs(self._open(stack, _empty_program, create=False))
            except auto.StackNotFoundError:
                return {}
            except auto.CommandError as exc:
                raise self._state_error(stack, exc) or StackError(
                    f"cannot read the outputs of {stack}: {_tail(exc)}"
                ) from exc

    def kubernetes_objects(self, stack: str) -> list[LiveRef] | None:
        """The Kubernetes objects ``stack``'s state holds, each with its provider's context
        (``pulumi stack export``); None when the state also holds resources that are not one
        object (Helm releases), or the stack was never brought up."""
        from pulumi import automation as auto

        with PROGRAM_LOCK:
            try:
                state = self._open(stack, _empty_program, create=False).export_stack()
            except auto.StackNotFoundError:
                return None
            except auto.CommandError as exc:
                raise self._state_error(stack, exc) or StackError(
                    f"cannot export the state of {stack}: {_tail(exc)}"
                ) from exc
        return live_refs(state.deployment or {})

    def restore_state(self, stack: str, log: Log) -> Path:
        """Restore ``stack``'s damaged or deleted state from the newest readable copy Pulumi
        kept (file backend only), through ``pulumi stack import``; the damaged file is kept
        beside it as ``<stack>.json.damaged.<ns>``. Returns the copy restored.

        Raises:
            StackStateError: the state is readable (nothing to restore), the backend is not a
                file backend, or no readable copy exists.
        """
        from pulumi import automation as auto

        files = _stack_locks.state_files(self.backend, PROJECT, stack)
        if files is None:
            raise StackStateError(f"{self.backend} is not a file backend: restore {stack} there")
        with _program_lock(stack, log):
            self._wait_for_locks(stack, time.monotonic() + self.lock_wait_s, log)
            if not (files.damaged() or files.missing()):
                raise StackStateError(f"the state of {stack} ({files.file}) is readable: kept")
            if files.readable() and files.sidecar_damaged():
                # Only the sidecar was cut short; the state itself reads whole and stays.
                kept = files.sidecar.with_name(f"{files.sidecar.name}.damaged.{time.time_ns()}")
                files.sidecar.rename(kept)
                log.info(
                    f"{stack}: the state reads whole; its cut-short {files.sidecar.name} "
                    f"is kept as {kept}"
                )
                return files.file
            copy = files.newest_copy()
            if copy is None:
                raise StackStateError(
                    f"no readable copy of {stack}'s state in {files.backups} or {files.history}"
                )
            source, deployment = copy
            if files.file.exists():
                kept = files.file.with_name(f"{files.file.name}.damaged.{time.time_ns()}")
                kept.write_bytes(files.file.read_bytes())
                log.info(f"{stack}: the damaged state is kept as {kept}")
            stack_obj = self._open(stack, _empty_program, restoring=True)
            try:
                stack_obj.import_stack(auto.Deployment(version=3, deployment=deployment))
            except auto.CommandError as exc:
                raise StackStateError(f"cannot import {source} into {stack}: {_tail(exc)}") from exc
        log.info(f"{stack}: state restored from {source}")
        return source

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
        call: Callable[[auto.Stack, EventRecorder], Outcome],
        *,
        create: bool = True,
    ) -> StackResult:
        """Open the stack, wait for its locks, run ``call`` with a fresh recorder (again while
        another update takes the lock first), and map the SDK's errors."""
        from pulumi import automation as auto

        with _program_lock(stack_name, log):
            stack = self._open(stack_name, program, create=create)
            deadline = time.monotonic() + self.lock_wait_s
            while True:
                self._wait_for_locks(stack_name, deadline, log)
                recorder = EventRecorder(stack_name, operation, log)
                start = time.monotonic()
                try:
                    with cancel_on_interrupt(stack_name, self.backend, log):
                        raw = call(stack, recorder)
                except auto.ConcurrentUpdateError as exc:
                    if time.monotonic() >= deadline:
                        raise self._locked(stack_name, exc) from exc
                    time.sleep(self.lock_poll_s)  # taken between our look and the CLI's
                    continue
                except auto.CommandError as exc:
                    raise self._state_error(stack_name, exc) or StackError(
                        f"pulumi {operation} of stack {stack_name} failed: "
                        f"{_reason(recorder, exc)}{self._pending_note(stack_name)}"
                    ) from exc
                seconds = time.monotonic() - start
                outputs = up_outputs(stack, raw, recorder) if operation == "up" else {}
                changes = change_counts(raw, recorder)
                return StackResult(operation, stack_name, changes, seconds, outputs, recorder.steps)

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

    def _pending_note(self, stack: str) -> str:
        """What a failed update left pending in the state, by name (empty if nothing)."""
        files = _stack_locks.state_files(self.backend, PROJECT, stack)
        pending = files.pending_operations() if files else []
        if not pending:
            return ""
        return (
            f". Pulumi left {len(pending)} pending operation(s) in the state, their outcome "
            f"unknown: {'; '.join(pending)}. The next up (with refresh, the default) clears "
            "them with refresh --clear-pending-creates and applies them again"
        )

    def _state_error(self, stack: str, exc: Exception) -> StackStateError | None:
        """The error for a state the CLI could not load (None for any other failure). In a
        file backend the file itself decides: one that reads whole now was only caught
        mid-write by another process (not damaged: the caller's own error says what failed)."""
        files = _stack_locks.state_files(self.backend, PROJECT, stack)
        if not (files.damaged() if files else "failed to load checkpoint" in str(exc)):
            return None
        where = files.file if files else f"the state of {stack} in {self.backend}"
        return StackStateError(
            f"the state of stack {stack} is damaged: {where} cannot be read "
            f"({_tail(exc)}). Nothing was changed. Restore it from Pulumi's newest backup with "
            f"`homelab repair state {stack}`"
        )

    def _open(
        self, name: str, program: Program, *, create: bool = True, restoring: bool = False
    ) -> auto.Stack:
        """Stack ``name`` through ``auto.create_or_select_stack`` (``create`` False:
        ``auto.select_stack``, whose ``auto.StackNotFoundError`` passes through). A state
        deleted while its history remains fails (unless ``restoring`` it)."""
        from pulumi import automation as auto

        files = _stack_locks.state_files(self.backend, PROJECT, name)
        if files is not None and files.missing() and not restoring:
            raise StackStateError(
                f"the state of stack {name} is missing: {files.file} was deleted, but its "
                f"history ({files.history}) records {files.updates()} update(s). Nothing was "
                f"changed. Restore it from Pulumi's newest backup with "
                f"`homelab repair state {name}`"
            )

        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        work_dir = self.work_dir(name)
        work_dir.mkdir(parents=True, exist_ok=True)
        backend_root = _stack_locks.file_backend_root(self.backend)
        if backend_root is not None:
            backend_root.mkdir(parents=True, exist_ok=True)
        env = self.env()
        self._check_passphrase()
        options = auto.LocalWorkspaceOptions(
            work_dir=str(work_dir),
            pulumi_home=env["PULUMI_HOME"],
            env_vars=env,
            secrets_provider="passphrase",
            project_settings=auto.ProjectSettings(
                name=PROJECT,
                runtime="python",
                main=str(work_dir),
                backend=auto.ProjectBackend(url=self.backend),
            ),
            pulumi_command=self._command(env["PULUMI_HOME"]),
        )
        opener = auto.create_or_select_stack if create else auto.select_stack
        try:
            try:
                return opener(name, project_name=PROJECT, program=program, opts=options)
            except auto.StackAlreadyExistsError:
                # Another process (a second `homelab up`, a sensor's run) created it between
                # this one's select and create: it exists now, so select it.
                return auto.select_stack(name, project_name=PROJECT, program=program, opts=options)
        except auto.StackNotFoundError:
            raise  # only when not creating: the caller knows what a missing stack means
        except auto.CommandError as exc:
            damaged = self._state_error(name, exc)
            if damaged is not None:
                raise damaged from exc
            raise StackError(f"cannot create or select stack {name}: {_tail(exc)}") from exc

    def _command(self, pulumi_home: str) -> auto.PulumiCommand:
        """The Pulumi CLI: the toolchain's (at least its verified version), or ``pulumi`` on
        PATH."""
        if not self.use_toolchain:
            return _pulumi_command(None, None)
        pulumi, version = _toolchain(pulumi_home)[1:]
        binary = Path(pulumi)
        if binary.parent.name != "bin":  # PulumiCommand runs <root>/bin/pulumi
            raise ToolchainError("pulumi", f"{pulumi} is not in a bin directory")
        return _pulumi_command(str(binary.parent.parent), version)

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
def _pulumi_command(root: str | None, version: str | None) -> auto.PulumiCommand:
    """``auto.PulumiCommand`` for ``<root>/bin/pulumi``, at least ``version`` (checked once per
    process: the constructor runs ``pulumi version``), or ``pulumi`` on PATH, any version."""
    from pulumi import automation as auto
    from semver import VersionInfo

    try:
        if root is None:
            return auto.PulumiCommand(skip_version_check=True)
        assert version is not None
        return auto.PulumiCommand(root=root, version=VersionInfo.parse(version.lstrip("v")))
    except (OSError, subprocess.CalledProcessError, auto.InvalidVersionError) as exc:
        where = f"{root}/bin/pulumi" if root else "pulumi on PATH"
        raise ToolchainError("pulumi", f"cannot run {where}: {exc}") from exc


@contextlib.contextmanager
def _program_lock(stack: str, log: Log) -> Iterator[None]:
    """Hold :data:`PROGRAM_LOCK`, saying so when another program holds it first."""
    if not PROGRAM_LOCK.acquire(blocking=False):
        log.info(f"{stack}: waiting for another Pulumi program in this process")
        PROGRAM_LOCK.acquire()
    try:
        yield
    finally:
        PROGRAM_LOCK.release()


def _reason(recorder: EventRecorder, exc: Exception) -> str:
    """Pulumi's reason, or how its CLI ended when it gave none (killed by a signal)."""
    reason = recorder.reason(_stderr(exc))
    code = re.search(r"code: (-?\d+)", str(exc))
    if reason != "no reason given" or code is None:
        return reason
    status = int(code.group(1))
    if status < 0:
        return f"the Pulumi CLI was killed by signal {-status} before it gave a reason"
    return f"the Pulumi CLI exited with code {status} and no reason"


def _stderr(exc: Exception) -> str:
    """The stderr part of a CommandError's text (``code: ... stdout: ... stderr: ...``)."""
    text = str(exc)
    return text.split("\n stderr: ", 1)[-1]


def _tail(exc: Exception) -> str:
    text = _stderr(exc)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-6:])

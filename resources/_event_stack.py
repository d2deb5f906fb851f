"""A Pulumi ``Stack`` whose results come from the engine's events (imported only when a stack
runs: it loads the Automation API).

``Stack.up`` (and ``refresh``, ``destroy``) end by running the CLI three more times: twice
``pulumi stack output`` and once ``pulumi stack history``, to fill the result's outputs and
summary. Both are already in the event stream of the operation itself: the root stack
resource's outputs (secrets masked, nested ones too) and the summary event's resource
changes. :class:`EventStack` answers from the events, so an operation costs one CLI run
(plus ``stack select``), which is most of a no-op's overhead over ``pulumi preview``.
It also answers :meth:`masked_outputs` with one CLI run that never asks for secrets.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pulumi.automation import (
    LocalWorkspace,
    OutputValue,
    ProjectBackend,
    ProjectSettings,
    PulumiCommand,
    Stack,
    UpdateSummary,
)
from pulumi.automation._stack import StackInitMode
from semver import VersionInfo

from resources._stack_result import SECRET_MASK, EventRecorder

__all__ = ["EventStack", "KnownPulumi", "open_stack"]

# How the engine marks a secret value in events and state.
_SECRET_SIG = "4dabf18193072939515e22adb298388d"


def _masked(value: Any) -> Any:
    """``value`` with every secret inside it, at any depth, replaced by ``[secret]``."""
    if isinstance(value, dict):
        if _SECRET_SIG in value:
            return SECRET_MASK
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


class KnownPulumi(PulumiCommand):
    """The Pulumi CLI at ``command`` whose version the toolchain has verified already.

    ``PulumiCommand()`` runs ``pulumi version`` to learn it; the toolchain ran ``--version``
    when it verified the binary, so each step process is spared that run.
    """

    def __init__(self, command: str, version: str) -> None:
        self.command = command
        self.version = VersionInfo.parse(version.lstrip("v"))


class EventStack(Stack):
    """A Stack that reads an operation's outputs and summary from its recorded events.

    ``known``: the stack exists already, so it is not selected. Selecting runs the CLI once
    (``pulumi stack select``) only to check that; every command of a Stack names its stack
    (``--stack``) anyway.
    """

    recorder: EventRecorder | None = None

    def __init__(
        self, name: str, workspace: LocalWorkspace, mode: StackInitMode, *, known: bool = False
    ) -> None:
        if not known:
            super().__init__(name, workspace, mode)
            return
        self.name = name
        self.workspace = workspace
        self._mode = mode

    def outputs(self) -> dict[str, OutputValue]:
        recorded = self.recorder.stack_outputs if self.recorder else None
        if recorded is None:
            return self.masked_outputs()
        return {
            k: OutputValue(_masked(v), secret=_masked(v) == SECRET_MASK)
            for k, v in recorded.items()
        }

    def info(self, show_secrets: bool = True) -> UpdateSummary | None:
        summary = self.recorder.summary if self.recorder else None
        if summary is None:
            return super().info(show_secrets=False)
        now = datetime.now()
        return UpdateSummary(
            kind="update",
            start_time=now,
            end_time=now,
            message="",
            environment={},
            config={},
            result="succeeded",
            resource_changes=summary,  # type: ignore[arg-type]
        )

    def masked_outputs(self) -> dict[str, OutputValue]:
        """The stack's outputs as ``pulumi stack output --json`` shows them: secrets masked."""
        ws = self.workspace
        assert isinstance(ws, LocalWorkspace)
        result = ws.pulumi_command.run(
            ["stack", "output", "--json", "--stack", self.name], ws.work_dir, ws.env_vars
        )
        values = json.loads(result.stdout or "{}")
        return {k: OutputValue(_masked(v), secret=v == SECRET_MASK) for k, v in values.items()}


def open_stack(
    name: str,
    project: str,
    program: Any,
    *,
    work_dir: str,
    env: dict[str, str],
    backend: str,
    command: PulumiCommand,
    create: bool = True,
    known: bool = False,
) -> EventStack:
    """Select stack ``name`` of ``project`` with the inline ``program`` (creating it if
    missing and ``create``; else ``StackNotFoundError``). ``known``: it exists (its state is in
    the backend, its settings in ``work_dir``), so it is used without selecting it."""
    settings = ProjectSettings(
        name=project, runtime="python", main=work_dir, backend=ProjectBackend(url=backend)
    )
    workspace = LocalWorkspace(
        work_dir=work_dir,
        pulumi_home=env["PULUMI_HOME"],
        program=program,
        env_vars=env,
        secrets_provider="passphrase",
        project_settings=settings,
        pulumi_command=command,
    )
    # Stack.create_or_select and Stack.select build a plain Stack; the mode is what they pass.
    mode = StackInitMode.CREATE_OR_SELECT if create else StackInitMode.SELECT
    return EventStack(name, workspace, mode, known=known)

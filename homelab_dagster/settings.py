"""Settings: which inventory, which target, where state lives. Read once, from the environment.

| variable              | default                          | meaning                               |
|-----------------------|----------------------------------|---------------------------------------|
| ``HOMELAB_INVENTORY`` | ``<project>/homelab.yaml``       | the inventory file                    |
| ``HOMELAB_TARGET``    | ``twin``                         | ``twin`` or ``homelab``: which world  |
| ``HOMELAB_STATE_DIR`` | ``<project>/.homelab``           | twin clusters, Pulumi state, weights  |
| ``HOMELAB_TWIN_PORT_BASE`` | ``16443``                   | the twin's first API server port      |

``<project>`` is the directory holding ``pyproject.toml`` above the current directory,
or the current directory itself. The target is chosen here and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from homelab_dagster.errors import SettingsError

__all__ = ["Settings", "Target", "project_root"]


class Target(StrEnum):
    """The world the resources talk to."""

    TWIN = "twin"
    HOMELAB = "homelab"


def project_root(start: Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: cwd) with a pyproject.toml."""
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "pyproject.toml").is_file() and (candidate / "homelab.yaml").exists():
            return candidate
    return here


@dataclass(frozen=True)
class Settings:
    """Where the inventory is, which target runs, and where state is kept."""

    inventory_path: Path
    target: Target
    state_dir: Path
    twin_port_base: int = 16443

    @property
    def steps_log(self) -> Path:
        """Where the CLI's runs send what their steps print themselves (step_server.py)."""
        return self.state_dir / "logs" / "steps.log"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``HOMELAB_*`` variables (``os.environ`` by default).

        Raises:
            SettingsError: ``HOMELAB_TARGET`` is neither ``twin`` nor ``homelab``.
        """
        env = os.environ if environ is None else environ
        root = project_root()
        raw_target = env.get("HOMELAB_TARGET", Target.TWIN.value)
        try:
            target = Target(raw_target)
        except ValueError:
            choices = ", ".join(t.value for t in Target)
            raise SettingsError(
                f"HOMELAB_TARGET={raw_target!r} is not a target (choose one of: {choices})"
            ) from None
        inventory = Path(env.get("HOMELAB_INVENTORY") or root / "homelab.yaml")
        state_dir = Path(env.get("HOMELAB_STATE_DIR") or root / ".homelab")
        raw_port = env.get("HOMELAB_TWIN_PORT_BASE", "16443")
        # Below 32768: the kernel hands out ports above it for outgoing connections, and
        # one of those can take a twin process's port between the check and the bind.
        if not raw_port.isdigit() or not 1024 <= int(raw_port) <= 32000:
            raise SettingsError(
                f"HOMELAB_TWIN_PORT_BASE={raw_port!r} is not a port between 1024 and 32000 "
                "(ports above 32768 are the kernel's ephemeral range)"
            )
        return cls(
            inventory_path=inventory.resolve(),
            target=target,
            state_dir=state_dir.resolve(),
            twin_port_base=int(raw_port),
        )

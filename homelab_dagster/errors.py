"""The exceptions homelab-dagster raises.

Every failure the core can name has a class of its own; errors from third-party SDKs
(Pulumi, the Kubernetes client, flytekit, the OpenAI client) are translated where they
enter, with the original kept as ``__cause__``. The edges (the CLI, an asset failure,
an asset check) turn these into messages for people.

    HomelabError
    ├── InventoryError          the inventory file is missing, unreadable or invalid
    ├── SettingsError           an environment setting is malformed
    ├── ToolchainError          a tool of the twin could not be found, built or verified
    ├── TwinError               a twin control plane could not be started or reached
    │   └── PortInUseError      a port the twin needs is taken by another process
    ├── StackError              a Pulumi operation failed
    │   └── StackLockedError    another update holds the stack's lock
    ├── KubernetesError         a cluster's API could not be reached or refused a request
    ├── TrainingError           a training run could not be launched or failed
    ├── WeightsError            a weights version could not be stored or found
    └── EndpointError           an endpoint could not be deployed or does not serve
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "EndpointError",
    "HomelabError",
    "InventoryError",
    "KubernetesError",
    "PortInUseError",
    "Problem",
    "SettingsError",
    "StackError",
    "StackLockedError",
    "ToolchainError",
    "TrainingError",
    "TwinError",
    "WeightsError",
]


class HomelabError(Exception):
    """Base class of every error homelab-dagster raises on purpose."""


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with an inventory: where (file, line, field path) and why."""

    file: str
    line: int | None
    path: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path or '<root>'}: {self.reason}"


class InventoryError(HomelabError):
    """The inventory is missing, unreadable or breaks one or more rules.

    ``problems`` holds every problem found, not only the first.
    """

    def __init__(self, file: str, problems: list[Problem]) -> None:
        self.file = file
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.path, p.reason))
        count = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{file}: {count} problem{'s' if count != 1 else ''}:\n{lines}")


class SettingsError(HomelabError):
    """An environment setting (``HOMELAB_*``) has a value that cannot be used."""


class ToolchainError(HomelabError):
    """A tool of the twin could not be found, built or verified; ``tool`` names it."""

    def __init__(self, tool: str, reason: str) -> None:
        super().__init__(f"toolchain: {tool}: {reason}")
        self.tool = tool
        self.reason = reason


class TwinError(HomelabError):
    """A control plane of the twin could not be started, reached or stopped."""


class PortInUseError(TwinError):
    """A loopback port the twin needs is already taken by another process."""


class StackError(HomelabError):
    """A Pulumi stack operation failed; the message carries the engine's reason."""


class StackLockedError(StackError):
    """Another update holds the stack's lock (possibly a dead process's)."""


class KubernetesError(HomelabError):
    """A cluster's Kubernetes API could not be reached, or refused a request."""


class TrainingError(HomelabError):
    """A training run could not be launched, failed, or produced unusable weights."""


class WeightsError(HomelabError):
    """A version of model weights could not be stored, found or verified."""


class EndpointError(HomelabError):
    """An endpoint could not be deployed, or does not serve what it should."""

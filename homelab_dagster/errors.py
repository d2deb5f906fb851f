"""The exceptions homelab-dagster raises.

Every failure the core can name has a class of its own; errors from third-party SDKs
(Pulumi, the Kubernetes client, flytekit, the OpenAI client) are translated where they
enter, with the original kept as ``__cause__``. The edges (the CLI, an asset failure,
an asset check) turn these into messages for people.

    HomelabError
    ├── InventoryError          the inventory file is missing, unreadable or invalid
    ├── SettingsError           an environment setting is malformed
    ├── ToolchainError          a tool of the twin could not be found, built or verified
    ├── ImageBuildError         an image could not be built from its lock file or pushed
    ├── TwinError               a twin control plane could not be started or reached
    │   ├── PortInUseError      a port the twin needs is taken by another process
    │   ├── RealNodeError       a real twin node (kubelet, containerd) failed to start or stop
    │   ├── TwinHostError       a change the twin makes to its machine (mount, cgroup) failed
    │   ├── TwinRegistryError   the twin's image registry did not start or answer
    │   └── RealNodesUnavailable  real nodes cannot run here; they fall back to KWOK nodes
    ├── StackError              a Pulumi operation failed
    │   ├── StackLockedError    another update holds the stack's lock
    │   └── StackStateError     the stack's state file is damaged or missing (restore it)
    ├── KubernetesError         a cluster's API could not be reached or refused a request
    ├── TrainingError           a training run could not be launched or failed
    ├── WeightsError            a weights version could not be stored or found
    ├── EndpointError           an endpoint could not be deployed or does not serve
    ├── GitError                the watched repository is unreachable, corrupt or lacks the branch
    └── StaleCodeLocationError  a commit needs assets the loaded code location does not hold
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "EndpointError",
    "GitError",
    "HomelabError",
    "ImageBuildError",
    "ImageMissingError",
    "InstanceError",
    "InventoryError",
    "KubernetesError",
    "PortInUseError",
    "Problem",
    "RealNodeError",
    "RealNodesUnavailable",
    "SettingsError",
    "StackError",
    "StackLockedError",
    "StackStateError",
    "StaleCodeLocationError",
    "ToolchainError",
    "TrainingError",
    "TwinError",
    "TwinHostError",
    "TwinRegistryError",
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


class ImageBuildError(HomelabError):
    """An image could not be built from its lock file (mmdebstrap, uv, umoci) or pushed
    (skopeo); ``image`` names it."""

    def __init__(self, image: str, reason: str) -> None:
        super().__init__(f"image {image}: {reason}")
        self.image = image
        self.reason = reason


class TwinError(HomelabError):
    """A control plane of the twin could not be started, reached or stopped."""


class PortInUseError(TwinError):
    """A loopback port the twin needs is already taken by another process."""


class RealNodeError(TwinError):
    """A real node of the twin (its kubelet or containerd) did not start, or did not stop."""


class TwinHostError(TwinError):
    """A change the twin makes to its machine failed: a command it runs, a binary it needs, a
    mount or cgroup it must remove."""


class TwinRegistryError(TwinError):
    """The twin's image registry (Debian's docker-registry on loopback) did not start or answer."""


class TwinStoreError(TwinError):
    """The twin's object store (versitygw) is not built, did not start, or its keys are
    unreadable."""


class ImageMissingError(TwinRegistryError):
    """An image a step's pods pull is not in the twin's registry: the step stops before it
    changes anything, naming the image and the command that provides it."""

    def __init__(self, reference: str, registry: str, command: str, *, built_here: bool) -> None:
        how = (
            f"`{command}` builds it from its lock file and pushes it (`homelab twin up` does so "
            "for every image the inventory uses)"
            if built_here
            else f"no lock file here builds it; push it there: `{command}`"
        )
        super().__init__(f"image {reference} is not in the twin's registry ({registry}): {how}")
        self.reference = reference
        self.command = command


class RealNodesUnavailable(TwinError):
    """Real nodes cannot run on this machine; the twin runs ``nodes`` as KWOK nodes instead.

    Not raised by ``Twin.up`` (the twin still comes up): it is what ``Twin.real_fallback``
    holds, and what a check that needs a real node skips or fails with. ``reason`` says why
    (not Linux, not root, a missing package or tool) and how to fix it.
    """

    def __init__(self, nodes: list[str], reason: str) -> None:
        self.nodes = list(nodes)
        self.reason = reason
        names = ", ".join(self.nodes) or "none"
        super().__init__(f"real twin nodes run as KWOK nodes ({names}): {reason}")


class StackError(HomelabError):
    """A Pulumi stack operation failed; the message carries the engine's reason."""


class StackLockedError(StackError):
    """Another update holds the stack's lock (possibly a dead process's)."""


class StackStateError(StackError):
    """A stack's state in the backend cannot be read (damaged) or is gone while its history
    says it existed: nothing was changed. The message names the file and the command that
    restores it from Pulumi's own backups (``homelab repair state <stack>``)."""


class KubernetesError(HomelabError):
    """A cluster's Kubernetes API could not be reached, or refused a request."""


class TrainingError(HomelabError):
    """A training run could not be launched, failed, or produced unusable weights."""


class WeightsError(HomelabError):
    """A version of model weights could not be stored, found or verified."""


class EndpointError(HomelabError):
    """An endpoint could not be deployed, or does not serve what it should."""


class GitError(HomelabError):
    """The watched repository could not be reached or read: an unreachable remote, a corrupt
    mirror, a missing branch or file, or no ``git`` command. The message carries git's reason."""


class InstanceError(HomelabError):
    """Dagster's instance could not be opened: its storage (PostgreSQL at
    ``HOMELAB_DAGSTER_POSTGRES_URL``, or the SQLite files under ``$DAGSTER_HOME``) cannot be
    reached or read. The message names where, and the database's reason, never a password."""


class StaleCodeLocationError(HomelabError):
    """A commit selects assets that the loaded code location does not define (its inventory is
    older than the commit's): reload the code location; nothing is skipped meanwhile."""

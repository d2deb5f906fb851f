"""The watched repository: a bare mirror under the state directory, read with the ``git`` CLI.

Why the ``git`` command and not a library: every read here (fetch, ancestry, a tree diff,
a file at a commit) is one porcelain or ``cat-file`` call that git answers from its packs in
milliseconds, which the sensor's one-second budget needs; GitPython runs the same ``git``
processes underneath (a layer, not a capability), and dulwich reimplements in pure Python
what the installed ``git`` (with the user's own configuration and credentials) already does.
Errors of
the command (missing, failing, timing out) are mapped to :class:`GitError` in one place,
:func:`run_git`, with git's own reason.

The mirror (``<state>/git/mirror``) is made on the first fetch; each fetch updates one ref
of its own, ``refs/homelab/watched``, from the branch (or the source's ``HEAD``), and the
last commit the sensor handled is kept under ``refs/homelab/applied``, so that a force-push
upstream leaves it in the mirror for the next diff. The inventories the sensor applied are
kept by digest under ``<state>/git/inventories``: the fallback when history was rewritten
and the mirror no longer has the old commit.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from homelab_dagster.errors import GitError

__all__ = ["Blob", "Commit", "GitRepository", "run_git"]

WATCHED_REF = "refs/homelab/watched"
APPLIED_REF = "refs/homelab/applied"
# No prompt for credentials (a daemon has no terminal): fail instead; messages in English.
_ENV = {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "GIT_ASKPASS": "", "SSH_ASKPASS": ""}


def run_git(
    args: Sequence[str],
    *,
    cwd: str | Path | None = None,
    stdin: bytes | None = None,
    timeout_s: float = 120,
    ok_codes: tuple[int, ...] = (0,),
) -> subprocess.CompletedProcess[bytes]:
    """Run ``git <args>``; the finished process (its return code one of ``ok_codes``).

    Raises:
        GitError: git is not installed, timed out, or failed (its last error line quoted).
    """
    command = ["git", *args]
    try:
        done = subprocess.run(
            command,
            cwd=cwd,
            input=stdin,
            capture_output=True,
            timeout=timeout_s,
            env={**os.environ, **_ENV},
            check=False,
        )
    except FileNotFoundError as exc:
        raise GitError(
            "the git command is not installed (it is needed to watch the repository)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise GitError(f"git {args[0]} timed out after {timeout_s:g}s") from exc
    if done.returncode not in ok_codes:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit code {done.returncode}"
        raise GitError(f"git {' '.join(_shown(args))} failed: {reason}")
    return done


def _shown(args: Sequence[str]) -> list[str]:
    return [a for a in args if not a.startswith("--git-dir")][:3]


@dataclass(frozen=True)
class Blob:
    """A file as a commit holds it: its size, and its bytes where they were read."""

    size: int
    data: bytes | None


@dataclass(frozen=True)
class Commit:
    """A commit as the run's tags name it."""

    sha: str
    author: str  # ``Name <email>``
    subject: str


class GitRepository(dg.ConfigurableResource):
    """The repository the Git sensor watches: ``url`` (a path or a URL) and ``branch`` (None:
    the source's ``HEAD``, a checkout's current branch), mirrored under ``state_dir``.

    ``inventory_file`` is the inventory's path inside the repository.
    """

    url: str
    branch: str | None = None
    state_dir: str
    inventory_file: str = "homelab.yaml"
    timeout_s: float = 120

    @property
    def mirror(self) -> Path:
        """The bare mirror: ``<state_dir>/mirror``."""
        return Path(self.state_dir) / "mirror"

    @property
    def watched(self) -> str:
        """What is watched, for messages: ``<url> <branch>`` (or ``<url> HEAD``)."""
        return f"{self.url} {self.branch or 'HEAD'}"

    def _git(
        self, *args: str, stdin: bytes | None = None, ok_codes: tuple[int, ...] = (0,)
    ) -> subprocess.CompletedProcess[bytes]:
        return run_git(
            [f"--git-dir={self.mirror}", *args],
            stdin=stdin,
            timeout_s=self.timeout_s,
            ok_codes=ok_codes,
        )

    def fetch(self) -> str:
        """Bring the mirror up to date with the watched branch; its head commit's SHA.

        Raises:
            GitError: the source is unreachable or lacks the branch, or the mirror is corrupt
                (delete ``<state>/git/mirror`` to start it again).
        """
        if not self.mirror.exists():
            self.mirror.parent.mkdir(parents=True, exist_ok=True)
            run_git(["init", "--bare", "--quiet", str(self.mirror)], timeout_s=self.timeout_s)
        source = f"refs/heads/{self.branch}" if self.branch else "HEAD"
        try:
            self._git(
                "fetch", "--quiet", "--no-tags", "--force", self.url, f"+{source}:{WATCHED_REF}"
            )
        except GitError as exc:
            raise GitError(f"cannot fetch {self.watched} into {self.mirror}: {exc}") from exc
        return self.resolve(WATCHED_REF)

    def resolve(self, rev: str) -> str:
        """The commit SHA ``rev`` names in the mirror.

        Raises:
            GitError: it names no commit there.
        """
        out = self._git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", ok_codes=(0, 1))
        if out.returncode:
            raise GitError(f"{rev} names no commit in {self.mirror}")
        return out.stdout.decode().strip()

    def has_commit(self, sha: str) -> bool:
        """Whether the mirror still holds commit ``sha``."""
        return not self._git("cat-file", "-e", f"{sha}^{{commit}}", ok_codes=(0, 1, 128)).returncode

    def is_ancestor(self, ancestor: str, sha: str) -> bool:
        """Whether ``ancestor`` is ``sha`` or one of its ancestors (false after a rewrite)."""
        out = self._git("merge-base", "--is-ancestor", ancestor, sha, ok_codes=(0, 1))
        return out.returncode == 0

    def count(self, since: str, head: str) -> int:
        """Commits reachable from ``head`` and not from ``since``."""
        return int(self._git("rev-list", "--count", head, f"^{since}").stdout)

    def changed_paths(self, old: str, new: str) -> list[str]:
        """Paths whose content differs between the trees of two commits (renames: both)."""
        out = self._git("diff", "--name-only", "--no-renames", "-z", old, new).stdout
        return [p for p in out.decode().split("\0") if p]

    def commit(self, sha: str) -> Commit:
        """Commit ``sha``'s author and subject."""
        out = self._git("log", "-1", "--format=%H%x00%an <%ae>%x00%s", sha).stdout.decode()
        full, author, subject = out.rstrip("\n").split("\0", 2)
        return Commit(full, author, subject)

    def read(self, *specs: tuple[str, str], max_bytes: int) -> list[Blob | None]:
        """The blob of each ``(commit, path)``: its size, and its bytes where it has at most
        ``max_bytes`` (a larger one is never read); None where the path is not in that commit.
        """
        request = "".join(f"{sha}:{path}\n" for sha, path in specs).encode()
        found: list[tuple[str, int] | None] = []
        for line in self._git("cat-file", "--batch-check", stdin=request).stdout.splitlines():
            if line.endswith((b" missing", b" ambiguous")):  # no such path (or commit)
                found.append(None)
                continue
            oid, kind, size = line.decode().split(" ")
            found.append((oid, int(size)) if kind == "blob" else None)
        small = dict(f for f in found if f is not None and f[1] <= max_bytes)
        data: dict[str, bytes] = {}
        if small:
            request = "".join(f"{oid}\n" for oid in small).encode()
            out = self._git("cat-file", "--batch", stdin=request).stdout
            pos = 0
            for oid, length in small.items():  # each: "<oid> blob <size>\n<bytes>\n"
                start = out.index(b"\n", pos) + 1
                data[oid] = out[start : start + length]
                pos = start + length + 1
        return [None if f is None else Blob(f[1], data.get(f[0])) for f in found]

    def keep(self, sha: str) -> None:
        """Keep commit ``sha`` in the mirror (``refs/homelab/applied``), rewrites or not."""
        self._git("update-ref", APPLIED_REF, sha)

    # ------------------------------------------------------------- applied inventories

    def save_inventory(self, text: str) -> str:
        """Keep an applied inventory's text by its digest (sha256); the digest."""
        digest = hashlib.sha256(text.encode()).hexdigest()
        store = Path(self.state_dir) / "inventories"
        path = store / f"{digest}.yaml"
        if not path.exists():
            store.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            partial.write_text(text, encoding="utf-8")
            partial.replace(path)
        return digest

    def saved_inventory(self, digest: str) -> str | None:
        """The applied inventory kept under ``digest``, or None."""
        path = Path(self.state_dir) / "inventories" / f"{digest}.yaml"
        return path.read_text(encoding="utf-8") if path.is_file() else None

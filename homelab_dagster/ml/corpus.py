"""The training corpus: text files of the project, chosen by globs, addressed by content.

A corpus resolves once, before anything is launched: an empty one (no file matches, or
every match is empty) is a :class:`~homelab_dagster.errors.TrainingError` with the globs in
the message. Its digest is the tree digest (:mod:`homelab_dagster.ml.digest`) of the
matched files relative to the root, so editing a document changes it and touching one
does not.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from homelab_dagster.errors import TrainingError
from homelab_dagster.inventory import check_corpus_glob
from homelab_dagster.ml.digest import directory_digest, file_sha256, tree_digest

__all__ = ["Corpus", "read_corpus_dir", "resolve_corpus"]


@dataclass(frozen=True)
class Corpus:
    """The files a run trains on: ``files`` maps relative POSIX paths to their sha256."""

    root: Path
    globs: tuple[str, ...]
    files: dict[str, str]
    digest: str
    total_bytes: int

    def stage(self, dest: str | Path) -> Path:
        """Copy the corpus' files into ``dest`` (relative paths kept) and return ``dest``."""
        dest = Path(dest)
        for rel in self.files:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.root / rel, target)
        return dest


def resolve_corpus(root: str | Path, globs: list[str] | tuple[str, ...]) -> Corpus:
    """The non-empty text files below ``root`` that ``globs`` match.

    Raises:
        TrainingError: a glob is absolute or leaves the root; a match is a link out of the
            root; no file matches; every match is empty; a matched file is not UTF-8 text.
    """
    root = Path(root).resolve()
    matched: set[Path] = set()
    for pattern in globs:
        reason = check_corpus_glob(pattern)
        if reason:
            raise TrainingError(f"{reason} ({root})")
        for path in root.glob(pattern):
            if not path.is_file():
                continue
            real = path.resolve()
            if not real.is_relative_to(root):
                raise TrainingError(
                    f"corpus glob {pattern!r} matches {path.relative_to(root)}, a link to "
                    f"{real} outside {root}: the corpus must stay in the project"
                )
            matched.add(path)
    if not matched:
        raise TrainingError(
            f"the corpus is empty: the globs {list(globs)} match no files under {root}"
        )
    files: dict[str, str] = {}
    total = 0
    for path in sorted(matched):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TrainingError(f"corpus file {path} is not UTF-8 text: {exc.reason}") from exc
        if not text.strip():
            continue
        with path.open("rb") as stream:
            files[path.relative_to(root).as_posix()] = file_sha256(stream)
        total += len(data)
    if not files:
        raise TrainingError(
            f"the corpus is empty: the globs {list(globs)} match {len(matched)} file(s) under "
            f"{root}, all of them empty"
        )
    return Corpus(
        root=root,
        globs=tuple(globs),
        files=files,
        digest=tree_digest(files.items()),
        total_bytes=total,
    )


def read_corpus_dir(directory: str | Path) -> tuple[list[str], str]:
    """The texts of a staged corpus directory, sorted by relative path, and its digest.

    Raises:
        TrainingError: the directory holds no non-empty text.
    """
    directory = Path(directory)
    digest, files, _ = directory_digest(directory)
    texts = [(directory / rel).read_text(encoding="utf-8") for rel in files]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise TrainingError(f"the staged corpus at {directory} holds no text")
    return texts, digest

"""The digest that addresses a version of weights: one sha256 over a directory's files.

Definition (stable; the weights store, the export task and the docs share it)::

    file digest  = sha256(file bytes), lowercase hex
    entries      = for every regular file below the directory, its path relative to the
                   directory in POSIX form (``/`` separators, UTF-8), sorted by that path
    tree digest  = sha256 of the concatenation, over entries, of
                   ``<relative path> NUL <file digest> LF``

Names, contents and the set of files count; timestamps, permissions and the directory's own
location do not. The same bytes under another root have the same digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

__all__ = ["directory_digest", "file_sha256", "tree_digest"]

_CHUNK = 1 << 20


def file_sha256(stream: BinaryIO) -> str:
    """sha256 (hex) of everything left to read in ``stream``."""
    digest = hashlib.sha256()
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def tree_digest(entries: Iterable[tuple[str, str]]) -> str:
    """The tree digest of ``(relative POSIX path, file sha256)`` pairs, in any order."""
    digest = hashlib.sha256()
    for path, file_digest in sorted(entries):
        digest.update(f"{path}\0{file_digest}\n".encode())
    return digest.hexdigest()


def directory_digest(root: str | Path) -> tuple[str, dict[str, str], int]:
    """``(tree digest, {relative path: file sha256}, total bytes)`` of the files below ``root``."""
    root = Path(root)
    files: dict[str, str] = {}
    size = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with path.open("rb") as stream:
            files[path.relative_to(root).as_posix()] = file_sha256(stream)
        size += path.stat().st_size
    return tree_digest(files.items()), files, size

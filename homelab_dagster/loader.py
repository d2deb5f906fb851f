"""Loading ``homelab.yaml``: parse, validate shapes, apply the rules, report every problem.

Problems carry the file, the YAML line (where the field exists in the file), the dotted
field path and the reason. Nothing is returned unless the whole file is valid.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from homelab_dagster import rules
from homelab_dagster.errors import InventoryError, Problem
from homelab_dagster.inventory import Inventory

__all__ = ["LoadedInventory", "inventory_or_none", "load_inventory", "parse_inventory"]


@dataclass(frozen=True)
class LoadedInventory:
    """A valid inventory with where it came from and the digest of its bytes."""

    inventory: Inventory
    path: Path
    digest: str


def load_inventory(path: str | Path) -> LoadedInventory:
    """Read and validate the inventory at ``path``.

    Raises:
        InventoryError: the file is missing, is not YAML, or breaks any rule; every
            problem found is listed.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problem = Problem(str(path), None, "", f"cannot read the inventory: {exc.strerror}")
        raise InventoryError(str(path), [problem]) from exc
    inventory = parse_inventory(text, str(path))
    digest = hashlib.sha256(text.encode()).hexdigest()
    return LoadedInventory(inventory=inventory, path=path, digest=digest)


def parse_inventory(text: str, file: str = "homelab.yaml") -> Inventory:
    """Validate inventory YAML ``text``; ``file`` names it in problems."""
    try:
        document = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise InventoryError(
            file, [Problem(file, line, "", f"not valid YAML: {exc.problem}")]
        ) from exc
    if not isinstance(document, CommentedMap):
        raise InventoryError(file, [Problem(file, 1, "", "the inventory must be a mapping")])
    try:
        inventory = Inventory.model_validate(_plain(document))
    except ValidationError as exc:
        problems = [_problem_from_error(file, document, err) for err in exc.errors()]
        raise InventoryError(file, problems) from None
    findings = rules.check(inventory)
    if findings:
        raise InventoryError(
            file,
            [Problem(file, _line_of(document, p), _dotted(p), reason) for p, reason in findings],
        )
    return inventory


def _plain(node: object) -> object:
    """ruamel's round-trip nodes as plain dicts and lists (pydantic's strict input)."""
    if isinstance(node, CommentedMap):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, CommentedSeq):
        return [_plain(v) for v in node]
    return node


def _dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path).replace(".[", "[")


def _line_of(document: CommentedMap, path: tuple[str | int, ...]) -> int | None:
    """The 1-based line of the deepest part of ``path`` present in the document."""
    node: object = document
    line: int | None = None
    for part in path:
        if isinstance(node, CommentedMap) and part in node:
            line = node.lc.key(part)[0] + 1
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
            line = node.lc.item(part)[0] + 1
            node = node[part]
        else:
            break
    return line


def _problem_from_error(file: str, document: CommentedMap, err: typing.Any) -> Problem:
    path = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    reason = err["msg"]
    if err["type"] == "extra_forbidden":
        reason = f"unknown key {path[-1]!r}"
        known = _fields_at(Inventory, path[:-1])
        close = difflib.get_close_matches(str(path[-1]), known, n=1)
        if close:
            reason += f" (did you mean {close[0]!r}?)"
        elif known:
            reason += f" (allowed: {', '.join(sorted(known))})"
    elif err["type"] == "missing":
        reason = "required field is missing"
    elif "input" in err and err["type"] not in {"value_error"}:
        reason = f"{reason} (got {err['input']!r})"
    return Problem(file, _line_of(document, path), _dotted(path), reason)


def _fields_at(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """The field names (aliases where set) of the model found at ``path`` below ``model``."""
    annotation: object = model
    for part in path:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = next(
                (f for n, f in annotation.model_fields.items() if (f.alias or n) == part), None
            )
            if field is None:
                return []
            annotation = field.annotation
        else:
            args = typing.get_args(annotation)
            annotation = args[-1] if args else None
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [f.alias or n for n, f in annotation.model_fields.items()]
    return []


def _unwrap(annotation: object) -> object:
    """``X | None`` as X."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return members[0] if len(members) == 1 else annotation
    return annotation


def inventory_or_none(path: str | Path) -> Inventory | None:
    """The valid inventory at ``path``, or None (with a warning) when it is not valid.

    The code location still loads with an invalid inventory, so the UI can show the
    inventory's failing check; nothing else is declared until the file is fixed.
    """
    try:
        return load_inventory(path).inventory
    except InventoryError as exc:
        logging.getLogger("homelab_dagster").warning("inventory not loaded: %s", exc)
        return None

"""Loading ``homelab.yaml``: parse, validate shapes, apply the rules, report every problem.

Problems carry the file, the YAML line (where the field exists in the file), the dotted
field path and the reason. Nothing is returned unless the whole file is valid.

Bad input is refused before it costs anything: a file larger than :data:`MAX_BYTES`, bytes
that are not UTF-8 text (a binary file), nesting deeper than :data:`MAX_DEPTH`, and a
document that expands to more than :data:`MAX_VALUES` values (a YAML alias bomb: anchors
are fine, each alias counts the values it stands for).
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
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from homelab_dagster import rules
from homelab_dagster.errors import InventoryError, Problem
from homelab_dagster.inventory import NAME_RULES, Inventory

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_VALUES",
    "LoadedInventory",
    "decode_inventory",
    "inventory_or_none",
    "load_inventory",
    "parse_inventory",
]

# The shipped inventory is ~12 KB, 8 levels deep and ~1,500 values: ample headroom.
MAX_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_VALUES = 100_000


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
        with path.open("rb") as stream:
            data = stream.read(MAX_BYTES + 1)  # never more than the cap, whatever the size
    except OSError as exc:
        problem = Problem(str(path), None, "", f"cannot read the inventory: {exc.strerror}")
        raise InventoryError(str(path), [problem]) from exc
    inventory = parse_inventory(decode_inventory(data, str(path)), str(path))
    digest = hashlib.sha256(data).hexdigest()
    return LoadedInventory(inventory=inventory, path=path, digest=digest)


def decode_inventory(data: bytes, file: str, size: int | None = None) -> str:
    """The text of an inventory's bytes (a file's, a commit's blob): ``data``, of ``size``
    bytes in all (default: ``len(data)``; a caller that did not read a larger one whole says
    how large it is).

    Raises:
        InventoryError: larger than :data:`MAX_BYTES`, or not UTF-8 text (a binary file).
    """
    _check_size(len(data) if size is None else size, file)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        reason = (
            f"not UTF-8 text (a binary file?): byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start} ({exc.reason})"
        )
        raise InventoryError(file, [Problem(file, line, "", reason)]) from None


def parse_inventory(text: str, file: str = "homelab.yaml") -> Inventory:
    """Validate inventory YAML ``text``; ``file`` names it in problems."""
    _check_size(len(text.encode("utf-8", "surrogatepass")), file)
    depth, deepest_line = _flow_depth(text)
    if depth > MAX_DEPTH:
        reason = f"brackets nested more than {MAX_DEPTH} levels deep"
        raise InventoryError(file, [Problem(file, deepest_line, "", reason)])
    try:
        document = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise InventoryError(
            file, [Problem(file, line, "", f"not valid YAML: {exc.problem}")]
        ) from exc
    except YAMLError as exc:  # the reader's: a control character, such as a binary file's NUL
        line = text.count("\n", 0, getattr(exc, "position", 0)) + 1
        reason = f"not YAML text (a binary file?): {_reader_reason(exc)}"
        raise InventoryError(file, [Problem(file, line, "", reason)]) from exc
    except RecursionError:
        reason = f"nested too deeply to read (at most {MAX_DEPTH} levels are allowed)"
        raise InventoryError(file, [Problem(file, None, "", reason)]) from None
    if not isinstance(document, CommentedMap):
        raise InventoryError(file, [Problem(file, 1, "", "the inventory must be a mapping")])
    try:
        inventory = Inventory.model_validate(_plain(document, _Budget(file, document)))
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


def _check_size(size: int, file: str) -> None:
    if size > MAX_BYTES:
        reason = (
            f"the inventory is larger than {MAX_BYTES // 1024} KiB ({size} bytes read): "
            "refused unread"
        )
        raise InventoryError(file, [Problem(file, None, "", reason)])


def _flow_depth(text: str) -> tuple[int, int]:
    """How deep ``[`` and ``{`` nest outside quotes and comments, and the line where that
    depth is first reached. Checked before parsing: the YAML scanner's time grows with the
    square of the flow nesting (a megabyte of brackets would take minutes)."""
    depth = deepest = 0
    line = deepest_line = 1
    quote = ""
    comment = False
    previous = "\n"
    for char in text:
        if char == "\n":
            line += 1
            comment = False
        elif comment:
            pass
        elif quote:
            if char == quote and not (quote == '"' and previous == "\\"):
                quote = ""
        elif char in "'\"" and previous in " \t\n[{,:":  # where a quoted scalar can start
            quote = char
        elif char == "#" and previous in " \t\n":
            comment = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest, deepest_line = depth, line
                if deepest > MAX_DEPTH:
                    break
        elif char in "]}":
            depth = max(depth - 1, 0)
        previous = char
    return deepest, deepest_line


def _reader_reason(exc: YAMLError) -> str:
    """ruamel's ReaderError says which character, at which offset; other errors as they are."""
    character = getattr(exc, "character", None)
    if isinstance(character, int):
        return f"character #x{character:04x} at offset {getattr(exc, 'position', '?')}"
    return str(exc)


class _Budget:
    """How many values ``_plain`` may still produce, and where an overflow is reported."""

    def __init__(self, file: str, document: CommentedMap) -> None:
        self.file = file
        self.document = document
        self.left = MAX_VALUES

    def spend(self, path: tuple[str | int, ...]) -> None:
        if len(path) > MAX_DEPTH:
            self.fail(path, f"nested more than {MAX_DEPTH} levels deep")
        self.left -= 1
        if self.left < 0:
            self.fail(
                path,
                f"the inventory expands to more than {MAX_VALUES} values (aliases counted "
                "each time they are used: a YAML alias bomb?)",
            )

    def fail(self, path: tuple[str | int, ...], reason: str) -> typing.NoReturn:
        where = path[:MAX_DEPTH]
        problem = Problem(self.file, _line_of(self.document, where), _dotted(where), reason)
        raise InventoryError(self.file, [problem])


def _plain(node: object, budget: _Budget, path: tuple[str | int, ...] = ()) -> object:
    """ruamel's round-trip nodes as plain dicts and lists (pydantic's strict input), within
    the budget's depth and count of values."""
    budget.spend(path)
    if isinstance(node, CommentedMap):
        return {str(k): _plain(v, budget, (*path, str(k))) for k, v in node.items()}
    if isinstance(node, CommentedSeq):
        return [_plain(v, budget, (*path, i)) for i, v in enumerate(node)]
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
    elif err["type"] == "string_pattern_mismatch" and err["ctx"]["pattern"] in NAME_RULES:
        reason = f"{err['input']!r} is {NAME_RULES[err['ctx']['pattern']]}"
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

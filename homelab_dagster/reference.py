"""The field reference of docs/inventory.md, generated from the inventory model.

``python -m homelab_dagster.reference`` rewrites the part of docs/inventory.md between the
markers; a test fails when the file and the model disagree.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from homelab_dagster import inventory as inv

__all__ = ["BEGIN", "END", "render", "rewrite"]

BEGIN = "<!-- BEGIN GENERATED FIELD REFERENCE (python -m homelab_dagster.reference) -->"
END = "<!-- END GENERATED FIELD REFERENCE -->"

_MODELS: list[tuple[str, type[BaseModel]]] = [
    ("top level", inv.Inventory),
    ("clusters.<name>", inv.Cluster),
    ("clusters.<name>.network", inv.Network),
    ("clusters.<name>.nodes[]", inv.NodePool),
    ("clusters.<name>.nodes[].gpu", inv.GpuSpec),
    ("clusters.<name>.nodes[].taints[]", inv.Taint),
    ("clusters.<name>.node_ports.<service>", inv.NodePort),
    ("components.<name>", inv.Component),
    ("mesh", inv.Mesh),
    ("mesh.links[]", inv.MeshLink),
    ("ml", inv.Ml),
    ("orchestrator", inv.Orchestrator),
    ("models.<name>", inv.Model),
    ("models.<name>.architecture", inv.ModelArchitecture),
    ("training_runs.<name>", inv.TrainingRun),
    ("training_runs.<name>.hyperparameters", inv.TrainingHyperparameters),
    ("endpoints.<name>", inv.Endpoint),
]


def _type_name(annotation: object) -> str:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, inv.StrEnum):
        return " \\| ".join(f"`{m.value}`" for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def render() -> str:
    """The generated reference: one table per model, one row per field."""
    parts = [BEGIN, ""]
    for where, model in _MODELS:
        parts += [f"### `{where}`", "", (model.__doc__ or "").strip().splitlines()[0], ""]
        parts += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = "empty"
            elif field.default is PydanticUndefined or field.default is None:
                default = "-"
            else:
                default = f"`{field.default!r}`" if field.default == "" else f"`{field.default}`"
            meaning = (field.description or "").replace("|", "\\|")
            kind = _type_name(field.annotation)
            parts.append(f"| `{field.alias or name}` | {kind} | {default} | {meaning} |")
        parts.append("")
    parts.append(END)
    return "\n".join(parts)


def rewrite(path: Path) -> bool:
    """Replace the generated part of ``path``; True when it changed."""
    text = path.read_text(encoding="utf-8")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    new = head + render() + tail
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/inventory.md")
    print(f"{target}: {'rewritten' if rewrite(target) else 'up to date'}")

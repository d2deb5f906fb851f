"""Which assets a change to the repository affects, and why: the one mapping the Git sensor
and ``homelab plan`` apply.

Pure functions of (the inventory before, the inventory after, the paths that changed). They
return an :class:`Impact`: the assets selected, each with the reasons (which path or which
inventory entry selected it), and notes for the changes that select nothing. Assets are
named by family and entry (:class:`AssetRef`); the layers above turn them into Dagster keys
(``assets/_keys.py``), so the naming of keys stays in one place.

What selects what (docs/operations.md, "The Git sensor"):

| change | selects |
|---|---|
| ``clusters.<c>``: nodes (labels, taints, sizes), namespaces, quotas, components | ``cluster/<c>`` |
| ``clusters.<c>``: any other field (purpose, host, network, ports, version, flags, a node's ``twin``) | nothing: no stack reads it |
| ``components.<name>`` | every cluster listing it |
| one mesh link | that link |
| ``mesh.transport``, ``mesh.export_label`` | every link |
| a training run (any field but ``schedule``) | the run and its model's weights |
| a trained model | its weights and the runs that train it |
| an external model | nothing: its weights are observed, never materialised |
| an endpoint | the endpoint |
| ``orchestrator`` | ``orchestrator`` |
| ``ml``, ``version``, ``name``, ``port_ranges`` | nothing: the resources' configuration or validation (:data:`IGNORED_SECTIONS`) |
| ``infra/cluster.py`` | every cluster |
| ``infra/mesh.py`` | every link |
| ``infra/endpoint.py``; the serving code (``homelab_dagster/serving.py``, ``resources/vllm.py``, ``resources/weights_copy.py``) | every endpoint |
| ``infra/orchestrator.py`` | ``orchestrator`` |
| ``homelab_dagster/ml/``, ``homelab_dagster/workflows/``, ``resources/training_task.py`` | every training run |
| ``infra/images.py``, ``infra/toolchain.py``, ``infra/tools/``: not programs (:data:`NOT_PROGRAMS`) | nothing |
| ``docs/``, ``tests/``, ``benchmarks/``, ``*.md``, comments, reordering | nothing |

Every Pulumi program of ``infra/`` is in :data:`PROGRAMS`, and every other module there in
:data:`NOT_PROGRAMS`; every section of the inventory is diffed here or named in
:data:`IGNORED_SECTIONS`: ``tests/test_changes.py`` fails on a new one that is in neither.

Only the assets a change touches directly are selected: what must follow them downstream
is the asset graph's business (its automation conditions), not this mapping's.
Entries removed from the inventory select nothing (their asset is gone; the stack stays until
it is destroyed by hand) and are reported as notes.
"""  # noqa: E501

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from homelab_dagster.inventory import Inventory

__all__ = [
    "CLUSTER_STACK_FIELDS",
    "IGNORED_SECTIONS",
    "NOT_PROGRAMS",
    "PROGRAMS",
    "SECTIONS",
    "AssetRef",
    "Impact",
    "Selection",
    "affected",
    "cluster",
    "endpoint",
    "everything",
    "inventory_impact",
    "mesh_link",
    "model_weights",
    "orchestrator",
    "paths_impact",
    "training_run",
]

# The fields of a cluster that its stack (infra/cluster.py) reads. The others are read by the
# twin, the validator or the asset's description only.
CLUSTER_STACK_FIELDS = frozenset({"nodes", "namespaces", "quotas", "components"})
# Fields of a node pool that only the twin reads (how it runs the node, not what it is).
_TWIN_ONLY_NODE_FIELDS = (".twin",)
# Fields of a training run that change no asset: the schedule decides when, not what.
_RUN_CADENCE_FIELDS = frozenset({"schedule"})
_SHOWN_PATHS = 3  # changed fields named in one reason; the rest are counted

_IGNORED_DIRS = ("docs/", "tests/", "benchmarks/")

# The Pulumi programs of infra/, each with the family of assets whose stacks run it.
PROGRAMS = {
    "infra/cluster.py": "cluster",
    "infra/mesh.py": "mesh_link",
    "infra/endpoint.py": "vllm_endpoint",
    "infra/orchestrator.py": "orchestrator",
}
# The other modules of infra/, and why a change to them selects nothing.
NOT_PROGRAMS = {
    "infra/__init__.py": "the package",
    "infra/images.py": "builds the twin's images (an image is named by its lock file's "
    "content; a pod runs a new one when its asset next runs)",
    "infra/toolchain.py": "builds the twin's tools",
    "infra/tools/": "the twin's tools' Go modules",
}
# Code that the assets of one family run (besides their program), and what to call it.
_CODE = (
    (
        ("homelab_dagster/serving.py", "resources/vllm.py", "resources/weights_copy.py"),
        "vllm_endpoint",
        "the serving code",
    ),
    (
        ("homelab_dagster/ml/", "homelab_dagster/workflows/", "resources/training_task.py"),
        "training_run",
        "the training code",
    ),
)
# The inventory's sections that select assets (diffed by inventory_impact), and those that
# select none, with why.
SECTIONS = frozenset(
    {"clusters", "components", "mesh", "models", "training_runs", "endpoints", "orchestrator"}
)
IGNORED_SECTIONS = {
    "version": "the file's format",
    "name": "the homelab's name (descriptions only)",
    "port_ranges": "validation: a NodePort outside its range is refused before anything runs",
    "ml": "how training runs and where weights live: the resources' configuration, read when "
    "the code location reloads (what a run trains is unchanged)",
}


class AssetRef(NamedTuple):
    """An asset by family and entry: ``AssetRef("cluster", ("forge",))`` is ``cluster/forge``.

    ``args`` are the arguments of the family's key function in ``assets/_keys.py``.
    """

    family: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.family}/{'__'.join(self.args)}" if self.args else self.family


def cluster(name: str) -> AssetRef:
    """``cluster/<name>``."""
    return AssetRef("cluster", (name,))


def mesh_link(source: str, target: str) -> AssetRef:
    """``mesh_link/<source>__<target>``."""
    return AssetRef("mesh_link", (source, target))


def training_run(name: str) -> AssetRef:
    """``training_run/<name>``."""
    return AssetRef("training_run", (name,))


def model_weights(model: str) -> AssetRef:
    """``model_weights/<model>``."""
    return AssetRef("model_weights", (model,))


def endpoint(name: str) -> AssetRef:
    """``vllm_endpoint/<name>``."""
    return AssetRef("vllm_endpoint", (name,))


def orchestrator() -> AssetRef:
    """``orchestrator``."""
    return AssetRef("orchestrator", ())


def _family(family: str, new: Inventory) -> list[AssetRef]:
    """Every asset of ``family`` in ``new``."""
    if family == "cluster":
        return [cluster(name) for name in new.clusters]
    if family == "mesh_link":
        return [mesh_link(link.source, link.target) for link in new.mesh.links]
    if family == "vllm_endpoint":
        return [endpoint(name) for name in new.endpoints]
    if family == "training_run":
        return [training_run(name) for name in new.training_runs]
    if family == "orchestrator":
        return [orchestrator()]
    raise ValueError(f"no asset family {family!r}")


@dataclass(frozen=True)
class Selection:
    """One asset selected by one change: ``reason`` names the path or entry, and what changed."""

    asset: AssetRef
    reason: str


@dataclass
class Impact:
    """What a change selects (with why), and what it changed that selects nothing (notes)."""

    selections: list[Selection] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def select(self, asset: AssetRef, reason: str) -> None:
        """Select ``asset`` because of ``reason``."""
        self.selections.append(Selection(asset, reason))

    def extend(self, other: Impact) -> None:
        """Add ``other``'s selections and notes to these."""
        self.selections.extend(other.selections)
        self.notes.extend(other.notes)

    @property
    def assets(self) -> list[AssetRef]:
        """The selected assets, each once, in the order first selected."""
        return list(dict.fromkeys(s.asset for s in self.selections))

    def reasons(self) -> dict[AssetRef, list[str]]:
        """Each selected asset with every reason that selected it."""
        out: dict[AssetRef, list[str]] = {}
        for s in self.selections:
            out.setdefault(s.asset, []).append(s.reason)
        return out


def affected(
    old: Inventory | None,
    new: Inventory,
    paths: Iterable[str] | None,
    inventory_file: str = "homelab.yaml",
) -> Impact:
    """The impact of going from ``old`` to ``new`` with ``paths`` changed (repository-relative).

    The inventory is diffed entry by entry whatever ``paths`` says (``old`` None: no inventory
    before, so every entry of ``new`` counts as added); ``inventory_file`` itself is left to
    that diff. ``paths`` None: the changed paths cannot be known (the old commit is gone), so
    every path the mapping knows counts as changed.
    """
    impact = inventory_impact(old, new)
    if paths is None:
        impact.extend(_unknown_paths(new))
    else:
        impact.extend(paths_impact([p for p in paths if p != inventory_file], new))
    return impact


def everything(new: Inventory, reason: str) -> Impact:
    """Every asset of ``new`` that a change can select, each for ``reason``."""
    impact = inventory_impact(None, new)
    impact.selections = [Selection(asset, reason) for asset in impact.assets]
    return impact


# ------------------------------------------------------------------------ code paths


def paths_impact(paths: Iterable[str], new: Inventory) -> Impact:
    """What changed code (repository-relative ``paths``) selects in ``new``."""
    impact = Impact()
    unmapped: list[str] = []
    for path in sorted(set(paths)):
        if path.startswith(_IGNORED_DIRS) or path.endswith(".md"):
            continue  # documentation and tests: never an asset's input
        if path.startswith(tuple(NOT_PROGRAMS)):
            continue
        mapped = _code_path(path)
        if mapped is None:
            unmapped.append(path)
            continue
        family, what = mapped
        for asset in _family(family, new):
            impact.select(asset, f"{path} changed ({what})")
    if unmapped:
        impact.notes.append(f"{_summary(unmapped)} changed: no asset is mapped; selects nothing")
    return impact


def _code_path(path: str) -> tuple[str, str] | None:
    """(the family whose assets ``path`` is code of, what that code is), or None."""
    if path in PROGRAMS:
        return PROGRAMS[path], "their Pulumi program"
    for prefixes, family, what in _CODE:
        if path.startswith(prefixes):
            return family, what
    return None


def _unknown_paths(new: Inventory) -> Impact:
    impact = Impact()
    why = "the changed paths are unknown (the old commit is gone): every mapped code path"
    families = [*PROGRAMS.values(), *(family for _, family, _ in _CODE)]
    for family in dict.fromkeys(families):
        for asset in _family(family, new):
            impact.select(asset, why)
    return impact


# ------------------------------------------------------------------------ the inventory


def inventory_impact(old: Inventory | None, new: Inventory) -> Impact:
    """The semantic diff of two inventories, entry by entry (``old`` None: all is added)."""
    impact = Impact()
    before = _plain(old) if old is not None else {}
    after = _plain(new)
    _clusters(impact, before.get("clusters", {}), after["clusters"])
    _components(impact, before.get("components", {}), after["components"], new)
    _mesh(impact, before.get("mesh", {}), after["mesh"], new)
    _models(impact, before.get("models", {}), after["models"], new)
    _training_runs(impact, before.get("training_runs", {}), after["training_runs"])
    _endpoints(impact, before.get("endpoints", {}), after["endpoints"])
    if old is None:
        impact.select(orchestrator(), "homelab.yaml: orchestrator added")
        return impact
    if changed := _changed(before.get("orchestrator"), after["orchestrator"], "orchestrator"):
        impact.select(orchestrator(), f"homelab.yaml: {_summary(changed)} changed")
    for top, why in IGNORED_SECTIONS.items():
        if changed := _changed(before.get(top), after.get(top), top):
            impact.notes.append(
                f"homelab.yaml: {_summary(changed)} changed: {why}; selects nothing"
            )
    return impact


def _clusters(impact: Impact, before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    for name, entry in after.items():
        where = f"clusters.{name}"
        if name not in before:
            impact.select(cluster(name), f"homelab.yaml: {where} added")
            continue
        changed = _changed(before[name], entry, where)
        stack = [
            p
            for p in changed
            if _field_of(p, where) in CLUSTER_STACK_FIELDS
            and not p.endswith(_TWIN_ONLY_NODE_FIELDS)
        ]
        other = [p for p in changed if p not in stack]
        if stack:
            impact.select(cluster(name), f"homelab.yaml: {_summary(stack)} changed")
        if other:
            impact.notes.append(
                f"homelab.yaml: {_summary(other)} changed: no stack reads it; selects nothing"
            )
    _removed(impact, "clusters", before, after)


def _components(
    impact: Impact, before: Mapping[str, Any], after: Mapping[str, Any], new: Inventory
) -> None:
    for name, entry in after.items():
        where = f"components.{name}"
        changed = ["added"] if name not in before else _changed(before[name], entry, where)
        if not changed:
            continue
        users = [c for c, spec in new.clusters.items() if name in spec.components]
        what = f"{where} added" if name not in before else f"{_summary(changed)} changed"
        for user in users:
            impact.select(cluster(user), f"homelab.yaml: {what} (listed by {user})")
        if not users:
            impact.notes.append(f"homelab.yaml: {what}: no cluster lists it; selects nothing")
    _removed(impact, "components", before, after)


def _mesh(
    impact: Impact, before: Mapping[str, Any], after: Mapping[str, Any], new: Inventory
) -> None:
    for top in ("transport", "export_label"):
        if before and before.get(top) != after.get(top):
            for link in new.mesh.links:
                impact.select(
                    mesh_link(link.source, link.target),
                    f"homelab.yaml: mesh.{top} changed (every link)",
                )
    old_links, new_links = before.get("links", {}), after["links"]
    for key, entry in new_links.items():
        where = f"mesh.links.{key}"
        source, target = entry["from"], entry["to"]
        if key not in old_links:
            impact.select(mesh_link(source, target), f"homelab.yaml: {where} added")
        elif changed := _changed(old_links[key], entry, where):
            impact.select(mesh_link(source, target), f"homelab.yaml: {_summary(changed)} changed")
    _removed(impact, "mesh.links", old_links, new_links)


def _models(
    impact: Impact, before: Mapping[str, Any], after: Mapping[str, Any], new: Inventory
) -> None:
    for name, entry in after.items():
        where = f"models.{name}"
        changed = [] if name not in before else _changed(before[name], entry, where)
        if name in before and not changed:
            continue
        what = f"{where} added" if name not in before else f"{_summary(changed)} changed"
        if entry["source"] != "trained":
            impact.notes.append(
                f"homelab.yaml: {what}: an external model's weights are observed, not "
                "materialised; selects nothing"
            )
            continue
        impact.select(model_weights(name), f"homelab.yaml: {what}")
        for run_name, run in new.training_runs.items():
            if run.model == name:
                impact.select(training_run(run_name), f"homelab.yaml: {what} (trained by it)")
    _removed(impact, "models", before, after)


def _training_runs(impact: Impact, before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    for name, entry in after.items():
        where = f"training_runs.{name}"
        if name not in before:
            what = f"{where} added"
        else:
            changed = _changed(before[name], entry, where)
            cadence = [p for p in changed if _field_of(p, where) in _RUN_CADENCE_FIELDS]
            if cadence:
                impact.notes.append(
                    f"homelab.yaml: {_summary(cadence)} changed: the schedule, not what it "
                    "trains; selects nothing"
                )
            changed = [p for p in changed if p not in cadence]
            if not changed:
                continue
            what = f"{_summary(changed)} changed"
        impact.select(training_run(name), f"homelab.yaml: {what}")
        models = [entry["model"]]
        if name in before and before[name]["model"] != entry["model"]:
            models.append(before[name]["model"])  # the old model loses a run of its own
        for model in models:
            impact.select(model_weights(model), f"homelab.yaml: {what} (trains {model})")
    _removed(impact, "training_runs", before, after)


def _endpoints(impact: Impact, before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    for name, entry in after.items():
        where = f"endpoints.{name}"
        if name not in before:
            impact.select(endpoint(name), f"homelab.yaml: {where} added")
        elif changed := _changed(before[name], entry, where):
            impact.select(endpoint(name), f"homelab.yaml: {_summary(changed)} changed")
    _removed(impact, "endpoints", before, after)


def _removed(
    impact: Impact, section: str, before: Mapping[str, Any], after: Mapping[str, Any]
) -> None:
    for name in before.keys() - after.keys():
        impact.notes.append(
            f"homelab.yaml: {section}.{name} removed: its asset is gone; selects nothing "
            "(what it made stays until destroyed by hand)"
        )


# ------------------------------------------------------------------------ the diff


def _plain(inventory: Inventory) -> dict[str, Any]:
    """The inventory as canonical plain data: order that carries no meaning is removed."""
    data = inventory.model_dump(mode="json", by_alias=True)
    data["mesh"]["links"] = {
        f"{link['from']}__{link['to']}": link for link in data["mesh"].get("links", [])
    }
    return {key: _canonical(value) for key, value in data.items()}


def _canonical(value: Any) -> Any:
    """Mappings as they are (dicts compare without order); lists of named entries as mappings
    by name; lists of strings or of mappings sorted (their order means nothing here); other
    lists (ranges, pairs) as they are."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_canonical(v) for v in value]
        if items and all(isinstance(v, dict) and "name" in v for v in items):
            return {v["name"]: v for v in items}
        if all(isinstance(v, str) for v in items):
            return sorted(items)
        if all(isinstance(v, dict) for v in items):
            return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
        return items
    return value


def _changed(before: Any, after: Any, where: str) -> list[str]:
    """The dotted paths under ``where`` whose values differ (leaves, or whole lists)."""
    if before == after:
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        out: list[str] = []
        for key in sorted(before.keys() | after.keys(), key=str):
            out.extend(_changed(before.get(key), after.get(key), f"{where}.{key}"))
        return out
    return [where]


def _field_of(path: str, where: str) -> str:
    """The first field under ``where`` of the dotted ``path``."""
    return path[len(where) + 1 :].split(".", 1)[0]


def _summary(paths: list[str]) -> str:
    shown = ", ".join(paths[:_SHOWN_PATHS])
    more = len(paths) - _SHOWN_PATHS
    return f"{shown} (and {more} more)" if more > 0 else shown

"""Fault: bad input everywhere it enters. The inventory file (huge, deeply nested, a YAML
alias bomb, binary, not UTF-8), names that are not Kubernetes names or carry path separators,
corpus globs that leave the repository (``..``, absolute, links out), and run configuration
of the wrong type from the UI's launchpad. Each is refused with the file, the field and the
reason, and nothing reaches Pulumi or Kubernetes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from homelab_dagster.errors import InventoryError, TrainingError
from homelab_dagster.loader import MAX_BYTES, MAX_DEPTH, MAX_VALUES, load_inventory
from homelab_dagster.ml.corpus import resolve_corpus

from .conftest import homelab

pytestmark = [pytest.mark.faults]


def alias_bomb(levels: int = 8, width: int = 10) -> bytes:
    """A "billion laughs": each level's list holds ``width`` aliases of the one below, so a
    few hundred bytes stand for ``width ** levels`` values."""
    lines = ["version: 1", "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    lines.append(f"clusters: {{pi: [{', '.join([f'*l{levels - 1}'] * width)}]}}")
    return ("\n".join(lines) + "\n").encode()


# (file bytes, what the problem says, its line or None)
BAD_FILES: dict[str, tuple[bytes, str, int | None]] = {
    "huge": (
        b"version: 1\n" + b"# padding\n" * (MAX_BYTES // 10 + 1),
        f"larger than {MAX_BYTES // 1024} KiB",
        None,
    ),
    "deeply-nested": (
        b"version: 1\nclusters: " + b"[" * 100_000 + b"]" * 100_000 + b"\n",
        f"nested more than {MAX_DEPTH} levels deep",
        2,
    ),
    "deeply-nested-block": (
        b"version: 1\nclusters:\n"
        + b"".join(b"  " * (i + 1) + f"k{i}:\n".encode() for i in range(MAX_DEPTH + 5))
        + b"  " * (MAX_DEPTH + 6)
        + b"end\n",
        f"nested more than {MAX_DEPTH} levels deep",
        None,
    ),
    "alias-bomb": (alias_bomb(), f"expands to more than {MAX_VALUES} values", None),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "UTF-8", 1),
    "nul-bytes": (b"version: 1\nname: a\x00b\n", "not YAML text (a binary file?)", 2),
    "latin-1": ("version: 1\nname: café\n".encode("latin-1"), "not UTF-8 text", 2),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_inventory_file_is_refused_with_its_file_and_reason(case, tmp_path):
    """Injects: an inventory file that is huge, deeply nested (flow and block), an alias
    bomb, binary, with NUL bytes, or Latin-1. Asserts: `load_inventory` raises
    InventoryError naming the file, the line where known, and the reason."""
    data, reason, line = BAD_FILES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(data)
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    (problem,) = info.value.problems
    assert problem.file == str(path)
    assert reason in problem.reason, problem
    if line is not None:
        assert problem.line == line, problem


@pytest.mark.parametrize("case", ["huge", "alias-bomb", "binary"])
def test_homelab_validate_and_up_refuse_a_bad_file_and_nothing_is_created(case, tmp_path):
    """Injects: the bad file as the inventory of `homelab validate` and `homelab up --env pi`.
    Asserts: both exit 1 with the file and the reason on the terminal; `up` started no twin,
    opened no Pulumi stack and recorded no Dagster run (the state directory holds none of
    them)."""
    data, reason, _ = BAD_FILES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(data)
    state = tmp_path / "state"
    checked = homelab(state, "validate", str(path), timeout=120)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert str(path) in checked.stderr and reason in checked.stderr, checked.stderr

    up = homelab(state, "up", "--env", "pi", timeout=120, env={"HOMELAB_INVENTORY": str(path)})
    assert up.returncode == 1, up.stdout + up.stderr
    assert str(path) in up.stderr and reason in up.stderr, up.stderr
    assert not (state / "twin").exists()
    assert not (state / "pulumi").exists()
    assert not (state / "dagster").exists()


def _rename(mapping: str, old: str | None, new: str) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        entries = data[mapping]
        entries[new] = entries.pop(old or next(iter(entries)))

    return edit


def _set(path: tuple[str | int, ...], value: object) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        node: Any = data
        for part in path[:-1]:
            node = (
                node[part]
                if not (part == "*" and isinstance(node, dict))
                else next(iter(node.values()))
            )
        node[path[-1]] = value

    return edit


# (edit of the shipped inventory, the field the problem names, what its reason says)
BAD_NAMES = {
    "cluster-with-slash": (_rename("clusters", "pi", "pi/edge"), "clusters.pi/edge", "Kubernetes"),
    "cluster-dot-dot": (_rename("clusters", "pi", "../etc"), "clusters.../etc", "Kubernetes"),
    "cluster-uppercase": (_rename("clusters", "pi", "Pi_Edge"), "clusters.Pi_Edge", "Kubernetes"),
    "cluster-too-long": (_rename("clusters", "pi", "p" * 64), "clusters." + "p" * 64, "63"),
    "node-with-slash": (
        _set(("clusters", "pi", "nodes", 0, "name"), "edge/1"),
        "clusters.pi.nodes[0].name",
        "Kubernetes",
    ),
    "model-with-slash": (_rename("models", None, "../../weights"), "models.../../weights", "/"),
    "endpoint-with-slash": (_rename("endpoints", None, "a/b"), "endpoints.a/b", "Kubernetes"),
    "training-run-with-space": (
        _rename("training_runs", None, "run me"),
        "training_runs.run me",
        "Kubernetes",
    ),
    "component-with-slash": (
        _rename("components", "cert-manager", "cert/manager"),
        "components.cert/manager",
        "Kubernetes",
    ),
    "corpus-dot-dot": (
        _set(("training_runs", "*", "corpus"), ["docs/*.md", "../secrets/*"]),
        "training_runs.",
        "leaves the project",
    ),
    "corpus-absolute": (
        _set(("training_runs", "*", "corpus"), ["/etc/*"]),
        "training_runs.",
        "is absolute",
    ),
    "corpus-home": (
        _set(("training_runs", "*", "corpus"), ["~/.ssh/*"]),
        "training_runs.",
        "home directory",
    ),
}


@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_bad_names_and_corpus_globs_are_refused_with_the_field(case, inventory_text, tmp_path):
    """Injects: a cluster, node, model, endpoint, training run or component name that is not a
    Kubernetes name or holds a path separator; a corpus glob that leaves the project.
    Asserts: InventoryError naming the file, the field (with its line) and the reason."""
    edit, field, reason = BAD_NAMES[case]
    path = tmp_path / "homelab.yaml"
    path.write_text(inventory_text(edit))
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    matching = [p for p in info.value.problems if p.path.startswith(field) and reason in p.reason]
    assert matching, info.value.problems
    assert matching[0].file == str(path) and matching[0].line


def test_homelab_up_refuses_a_bad_name_before_anything_runs(inventory_text, tmp_path):
    """Injects: a cluster named ``../etc`` in the inventory of `homelab up --env pi`.
    Asserts: exit 1 naming the file, the field and the rule; no twin, stack or run created."""
    path = tmp_path / "homelab.yaml"
    path.write_text(inventory_text(_rename("clusters", "forge", "../etc")))
    state = tmp_path / "state"
    up = homelab(state, "up", "--env", "pi", timeout=120, env={"HOMELAB_INVENTORY": str(path)})
    assert up.returncode == 1, up.stdout + up.stderr
    assert "clusters.../etc" in up.stderr and "not a valid Kubernetes name" in up.stderr
    assert not [p for p in ("twin", "pulumi", "dagster") if (state / p).exists()]


def test_a_corpus_link_out_of_the_project_is_refused(tmp_path):
    """Injects: corpus files and a directory that are symbolic links to files outside the
    project. Asserts: TrainingError naming the glob, the link and its target, before any
    file is read; the files inside the project still resolve."""
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.md").write_text("a secret, outside the project")
    (outside / "dir" / "also.md").write_text("another secret")
    project = tmp_path / "project"
    (project / "docs").mkdir(parents=True)
    (project / "docs" / "ok.md").write_text("inside")
    (project / "docs" / "link.md").symlink_to(outside / "secret.md")
    (project / "linked").symlink_to(outside / "dir")
    assert resolve_corpus(project, ["docs/ok.md"]).files

    with pytest.raises(TrainingError) as info:
        resolve_corpus(project, ["docs/*.md"])
    message = str(info.value)
    assert "'docs/*.md'" in message and "docs/link.md" in message
    assert str(outside / "secret.md") in message and "outside" in message
    with pytest.raises(TrainingError, match=r"linked/also\.md"):
        resolve_corpus(project, ["linked/*.md"])
    with pytest.raises(TrainingError, match="leaves the project"):
        resolve_corpus(project, ["docs/../../outside/*.md"])
    with pytest.raises(TrainingError, match="is absolute"):
        resolve_corpus(project, [str(outside / "*.md")])


@pytest.mark.twin
@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"refresh": "yes"}, "refresh"),
        ({"refresh": True, "force": 1}, "force"),
    ],
    ids=["wrong-type", "unknown-field"],
)
def test_launchpad_run_config_of_the_wrong_type_is_refused_before_any_step(
    config, says, twin, dev_ui
):
    """Injects: the launchpad's *Materialize* of cluster/pi (GraphQL ``launchRun``, as the UI
    sends it) with run config of the wrong type, or a field the config does not have.
    Asserts: Dagster refuses it (RunConfigValidationInvalid, naming the field) and no run is
    created; pi's stack is untouched (no lock, its state byte for byte as before)."""
    from homelab_dagster.settings import Settings, Target

    settings = Settings(twin.root.parent / "homelab.yaml", Target.TWIN, twin.root.parent)
    backend = settings.state_dir / "pulumi" / "backend" / ".pulumi"
    before = _snapshot(backend)
    runs = dev_ui.run_ids()
    answer = dev_ui.launch(["cluster", "pi"], {"ops": {"cluster__pi": {"config": config}}})
    assert answer["__typename"] == "RunConfigValidationInvalid", answer
    errors = json.dumps(answer["errors"])
    assert says in errors and "cluster__pi" in errors, errors
    assert dev_ui.run_ids() == runs
    assert _snapshot(backend) == before


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes (empty when it does not exist)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

"""The change-to-asset mapping (homelab_dagster/changes.py), case by case."""

from __future__ import annotations

from typing import Any

import pytest

from homelab_dagster import changes
from homelab_dagster.changes import affected, everything, inventory_impact, paths_impact
from homelab_dagster.inventory import Inventory
from homelab_dagster.loader import parse_inventory


@pytest.fixture(scope="module")
def shipped(project_root) -> Inventory:
    return parse_inventory((project_root / "homelab.yaml").read_text())


@pytest.fixture
def edited(inventory_text):
    """``edited(edit)``: the shipped inventory changed by ``edit(data)``, validated."""

    def make(edit) -> Inventory:
        return parse_inventory(inventory_text(edit))

    return make


def node(data: dict[str, Any], cluster: str, name: str) -> dict[str, Any]:
    return next(n for n in data["clusters"][cluster]["nodes"] if n["name"] == name)


def selected(impact: changes.Impact) -> list[str]:
    return sorted(str(a) for a in impact.assets)


ALL_ENDPOINTS = ["vllm_endpoint/sre-agent", "vllm_endpoint/vllm"]
ALL_CLUSTERS = ["cluster/air", "cluster/forge", "cluster/pi", "cluster/pro", "cluster/studio"]
ALL_LINKS = [
    "mesh_link/pi__studio",
    "mesh_link/pro__studio",
    "mesh_link/studio__air",
    "mesh_link/studio__forge",
    "mesh_link/studio__pro",
]

# ------------------------------------------------------------------ homelab.yaml, entry by entry


def test_a_forge_label_selects_forge_alone_and_says_which_label(shipped, edited):
    def edit(d):
        node(d, "forge", "forge-platform")["labels"]["zone-hint"] = "rack-2"

    impact = inventory_impact(shipped, edited(edit))
    assert selected(impact) == ["cluster/forge"]
    (reason,) = impact.reasons()[changes.cluster("forge")]
    assert "clusters.forge.nodes.forge-platform.labels.zone-hint" in reason


def test_a_comment_selects_nothing(shipped, project_root):
    text = (project_root / "homelab.yaml").read_text()
    commented = text.replace("  forge:\n", "  # the GPU box\n  forge:  # trailing\n", 1)
    assert commented != text
    impact = inventory_impact(shipped, parse_inventory(commented))
    assert impact.selections == []
    assert impact.notes == []


def test_reordering_selects_nothing(shipped, edited):
    def edit(d):
        d["clusters"] = dict(reversed(d["clusters"].items()))
        d["mesh"]["links"].reverse()
        d["clusters"]["forge"]["nodes"].reverse()
        d["clusters"]["forge"]["namespaces"].reverse()
        d["clusters"]["forge"]["components"].reverse()
        d["training_runs"]["sre-runbook"]["corpus"].reverse()

    impact = inventory_impact(shipped, edited(edit))
    assert impact.selections == []
    assert impact.notes == []


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["clusters"]["pi"]["namespaces"].append("iot"), "namespaces"),
        (lambda d: d["clusters"]["pi"].update(quotas={"edge": {"pods": "10"}}), "quotas"),
        (lambda d: d["clusters"]["pi"]["components"].remove("flux2"), "components"),
        (lambda d: node(d, "pi", "pi-edge").update(count=3), "nodes.pi-edge.count"),
        (
            lambda d: node(d, "pi", "pi-control-plane").update(
                taints=[{"key": "edge", "effect": "NoSchedule"}]
            ),
            "nodes.pi-control-plane.taints",
        ),
    ],
)
def test_what_the_cluster_stack_reads_selects_the_cluster(shipped, edited, edit, field):
    impact = inventory_impact(shipped, edited(edit))
    assert selected(impact) == ["cluster/pi"]
    assert f"clusters.pi.{field}" in impact.reasons()[changes.cluster("pi")][0]


def test_a_cluster_field_no_stack_reads_selects_nothing_with_a_note(shipped, edited):
    def edit(d):
        d["clusters"]["pi"]["purpose"] = "edge, IoT and a weather station"

    impact = inventory_impact(shipped, edited(edit))
    assert impact.selections == []
    assert impact.notes == [
        "homelab.yaml: clusters.pi.purpose changed: no stack reads it; selects nothing"
    ]


def test_a_component_selects_every_cluster_listing_it(shipped, edited):
    def gpu_plugin(d):
        d["components"]["nvidia-device-plugin"]["version"] = "0.17.1"

    def flux(d):
        d["components"]["flux2"]["values"] = {"logLevel": "debug"}

    assert selected(inventory_impact(shipped, edited(gpu_plugin))) == ["cluster/forge"]
    impact = inventory_impact(shipped, edited(flux))
    assert selected(impact) == ALL_CLUSTERS  # every cluster lists flux2
    assert "(listed by pi)" in impact.reasons()[changes.cluster("pi")][0]


def test_one_link_selects_that_link(shipped, edited):
    def edit(d):
        d["mesh"]["links"][0]["latency_ms"] = [3, 4]  # studio -> forge

    impact = inventory_impact(shipped, edited(edit))
    assert selected(impact) == ["mesh_link/studio__forge"]
    assert "mesh.links.studio__forge.latency_ms" in impact.selections[0].reason


def test_an_added_link_is_selected_and_a_removed_one_is_a_note(shipped, edited):
    def edit(d):
        d["mesh"]["links"].pop()  # pi -> studio
        d["mesh"]["links"].append({"from": "air", "to": "forge"})

    impact = inventory_impact(shipped, edited(edit))
    assert selected(impact) == ["mesh_link/air__forge"]
    assert impact.selections[0].reason == "homelab.yaml: mesh.links.air__forge added"
    assert any("mesh.links.pi__studio removed" in note for note in impact.notes)


def test_the_export_label_selects_every_link(shipped, edited):
    def edit(d):
        d["mesh"]["export_label"] = "mirror.linkerd.io/exported-to"

    assert selected(inventory_impact(shipped, edited(edit))) == ALL_LINKS


def test_hyperparameters_select_the_run_and_its_weights(shipped, edited):
    def edit(d):
        d["training_runs"]["sre-runbook"]["hyperparameters"]["learning_rate"] = 1.0e-4

    impact = inventory_impact(shipped, edited(edit))
    assert selected(impact) == ["model_weights/sre-agent", "training_run/sre-runbook"]
    reason = impact.reasons()[changes.training_run("sre-runbook")][0]
    assert "training_runs.sre-runbook.hyperparameters.learning_rate" in reason


def test_a_schedule_selects_nothing(shipped, edited):
    def edit(d):
        d["training_runs"]["sre-runbook"]["schedule"] = "0 3 * * 0"

    impact = inventory_impact(shipped, edited(edit))
    assert impact.selections == []
    assert "training_runs.sre-runbook.schedule" in impact.notes[0]


def test_a_trained_model_selects_its_weights_and_its_runs(shipped, edited):
    def edit(d):
        d["models"]["sre-agent"]["architecture"]["n_layer"] = 3

    impact = inventory_impact(shipped, edited(edit))
    assert selected(impact) == ["model_weights/sre-agent", "training_run/sre-runbook"]


def test_an_external_model_selects_nothing(shipped, edited):
    def edit(d):
        d["models"]["llama-3.1-70b-instruct"]["parameters"] = "71B"

    impact = inventory_impact(shipped, edited(edit))
    assert impact.selections == []
    assert "observed, not materialised" in impact.notes[0]


def test_an_endpoint_selects_the_endpoint(shipped, edited):
    def edit(d):
        d["endpoints"]["vllm"]["max_model_len"] = 8192

    impact = inventory_impact(shipped, edited(edit))
    assert selected(impact) == ["vllm_endpoint/vllm"]


def test_top_level_settings_select_nothing(shipped, edited):
    def edit(d):
        d["ml"]["flyte_domain"] = "staging"
        d["port_ranges"]["data"] = [30500, 30589]

    impact = inventory_impact(shipped, edited(edit))
    assert impact.selections == []
    assert len(impact.notes) == 2


def test_no_inventory_before_selects_every_entry(shipped):
    impact = inventory_impact(None, shipped)
    assert selected(impact) == sorted(
        [
            *ALL_CLUSTERS,
            *ALL_LINKS,
            "model_weights/sre-agent",
            "orchestrator",
            "training_run/sre-runbook",
            "vllm_endpoint/sre-agent",
            "vllm_endpoint/vllm",
        ]
    )
    assert selected(everything(shipped, "why")) == selected(impact)
    assert {s.reason for s in everything(shipped, "why").selections} == {"why"}


# ------------------------------------------------------------------ code paths


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("infra/cluster.py", ALL_CLUSTERS),
        ("infra/mesh.py", ALL_LINKS),
        ("infra/endpoint.py", ALL_ENDPOINTS),
        ("infra/orchestrator.py", ["orchestrator"]),
        ("homelab_dagster/serving.py", ALL_ENDPOINTS),
        ("resources/vllm.py", ALL_ENDPOINTS),
        ("resources/weights_copy.py", ALL_ENDPOINTS),
        ("homelab_dagster/ml/train.py", ["training_run/sre-runbook"]),
        ("homelab_dagster/workflows/train.py", ["training_run/sre-runbook"]),
        ("resources/training_task.py", ["training_run/sre-runbook"]),
        ("infra/images.py", []),
        ("infra/tools/kwok/go.mod", []),
        ("docs/operations.md", []),
        ("tests/test_changes.py", []),
        ("benchmarks/git_sensor_tick.py", []),
        ("README.md", []),
    ],
)
def test_a_code_path_selects_its_assets(shipped, path, expected):
    impact = paths_impact([path], shipped)
    assert selected(impact) == expected
    assert impact.notes == []
    assert all(s.reason.startswith(path) for s in impact.selections)


def test_an_unmapped_path_selects_nothing_with_a_note(shipped):
    impact = paths_impact(["assets/clusters.py"], shipped)
    assert impact.selections == []
    assert impact.notes == ["assets/clusters.py changed: no asset is mapped; selects nothing"]


def test_how_the_twin_runs_a_node_selects_nothing(shipped, edited):
    def edit(d):
        node(d, "forge", "forge-inference")["twin"] = "fake"

    impact = inventory_impact(shipped, edited(edit))
    assert impact.selections == []
    assert "clusters.forge.nodes.forge-inference.twin" in impact.notes[0]


def test_affected_joins_the_inventory_diff_and_the_paths(shipped, edited):
    def edit(d):
        node(d, "forge", "forge-platform")["labels"]["tier"] = "platform-2"

    impact = affected(shipped, edited(edit), ["homelab.yaml", "infra/cluster.py", "docs/x.md"])
    assert selected(impact) == ALL_CLUSTERS
    reasons = impact.reasons()[changes.cluster("forge")]
    assert len(reasons) == 2  # the label, and the program
    assert impact.notes == []  # homelab.yaml itself is left to the semantic diff


def test_unknown_paths_count_every_mapped_path_as_changed(shipped):
    impact = affected(shipped, shipped, None)
    assert selected(impact) == sorted(
        [*ALL_CLUSTERS, *ALL_LINKS, *ALL_ENDPOINTS, "orchestrator", "training_run/sre-runbook"]
    )
    assert "the changed paths are unknown" in impact.selections[0].reason


def test_every_pulumi_program_and_inventory_section_is_mapped_or_ignored(project_root):
    """A new program in infra/ or a new section of the inventory cannot be forgotten: each is
    mapped to the assets it changes or named, with why, as selecting nothing."""
    modules = {
        path.relative_to(project_root).as_posix() for path in (project_root / "infra").glob("*.py")
    }
    programs = {
        module for module in modules if "import pulumi\n" in (project_root / module).read_text()
    }
    assert programs == set(changes.PROGRAMS), "a Pulumi program is not mapped (changes.PROGRAMS)"
    others = {m for m in modules - programs if not m.startswith(tuple(changes.NOT_PROGRAMS))}
    assert not others, f"{others}: neither a mapped program nor in changes.NOT_PROGRAMS"
    assert all((project_root / path).exists() for path in changes.NOT_PROGRAMS)
    sections = set(Inventory.model_fields)
    assert sections == changes.SECTIONS | set(changes.IGNORED_SECTIONS), (
        "an inventory section is neither diffed (changes.SECTIONS) nor ignored"
    )
    assert not changes.SECTIONS & set(changes.IGNORED_SECTIONS)


def test_the_orchestrator_section_selects_the_orchestrator_and_ml_selects_nothing(shipped, edited):
    def edit(d):
        d["orchestrator"]["namespace"] = "dagster-2"
        d.setdefault("ml", {})["weights_bucket"] = "other-bucket"

    impact = inventory_impact(shipped, edited(edit))
    assert selected(impact) == ["orchestrator"]
    assert impact.reasons()[changes.orchestrator()] == [
        "homelab.yaml: orchestrator.namespace changed"
    ]
    (note,) = impact.notes
    assert note.startswith("homelab.yaml: ml.weights_bucket changed: how training runs")

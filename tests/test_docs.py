"""docs/ stays true to the code."""

from __future__ import annotations

from homelab_dagster import reference


def test_inventory_reference_matches_the_model(project_root):
    text = (project_root / "docs" / "inventory.md").read_text()
    start = text.index(reference.BEGIN)
    end = text.index(reference.END) + len(reference.END)
    assert text[start:end] == reference.render(), (
        "docs/inventory.md is stale: run `uv run python -m homelab_dagster.reference`"
    )

"""Shared fixtures: the project root, the shipped inventory, and a way to break it."""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def project_root() -> Path:
    """The repository's root."""
    return ROOT


@pytest.fixture(scope="session")
def shipped_inventory_data() -> dict[str, Any]:
    """The shipped homelab.yaml as plain data (never mutate: use ``inventory_text``)."""
    return YAML(typ="safe").load((ROOT / "homelab.yaml").read_text())


@pytest.fixture
def inventory_text(shipped_inventory_data: dict[str, Any]) -> Callable[..., str]:
    """``inventory_text(edit)``: the shipped inventory, changed by ``edit(data)``, as YAML."""

    def make(edit: Callable[[dict[str, Any]], None] | None = None) -> str:
        data = copy.deepcopy(shipped_inventory_data)
        if edit:
            edit(data)
        buffer = io.StringIO()
        YAML(typ="safe").dump(data, buffer)
        return buffer.getvalue()

    return make


# ---------------------------------------------------------------------------- the twin


@pytest.fixture(scope="session")
def toolchain():
    """The twin's toolchain, already built (``make tools``); CI fails without it."""
    from homelab_dagster.errors import ToolchainError
    from infra.toolchain import ensure_toolchain

    try:
        return ensure_toolchain(build=False)
    except ToolchainError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the twin's toolchain is missing in CI: {exc}")
        pytest.skip(f"the twin's toolchain is not built (run `make tools`): {exc}")


@pytest.fixture(scope="session")
def shipped_inventory(project_root):
    """The shipped inventory, validated."""
    from homelab_dagster.loader import load_inventory

    return load_inventory(project_root / "homelab.yaml").inventory


@pytest.fixture(scope="session")
def twin(tmp_path_factory, toolchain, shipped_inventory):
    """A twin of the shipped inventory in a temporary state dir, purged at the end.

    Clusters start on demand: ``twin.up(["forge"])`` in a test (idempotent, so tests that
    share a cluster pay for it once). Ports start at ``HOMELAB_TEST_TWIN_PORT_BASE``
    (default 26443), away from a developer's own twin.
    """
    from homelab_dagster.twin import Twin

    base = int(os.environ.get("HOMELAB_TEST_TWIN_PORT_BASE", "26443"))
    state = tmp_path_factory.mktemp("twin-state")
    instance = Twin(shipped_inventory, state, toolchain, api_port_base=base)
    yield instance
    instance.down(purge=True)

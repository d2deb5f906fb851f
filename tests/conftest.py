"""Shared fixtures: the project root, the shipped inventory, and a way to break it."""

from __future__ import annotations

import copy
import io
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

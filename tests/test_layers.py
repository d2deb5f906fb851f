"""The layers hold (import-linter's contracts in pyproject.toml), and a wrong import breaks them."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PACKAGES = ("homelab_dagster", "assets", "resources", "sensors", "infra")
# The modules of homelab_dagster above the core: the CLI and the code location.
NOT_CORE = {"homelab_dagster.__main__", "homelab_dagster.cli", "homelab_dagster.definitions"}


def _contracts(root: Path) -> dict[str, dict]:
    config = tomllib.loads((root / "pyproject.toml").read_text())
    return {c["id"]: c for c in config["tool"]["importlinter"]["contracts"]}


def _lint_imports(root: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    selected = [arg for c in contracts for arg in ("--contract", c)]
    return subprocess.run(
        [str(lint), "--no-cache", *selected],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_core_contract_names_every_core_module(project_root):
    import homelab_dagster

    modules = {
        f"homelab_dagster.{m.name}"
        for m in pkgutil.iter_modules(homelab_dagster.__path__)
        if f"homelab_dagster.{m.name}" not in NOT_CORE
    }
    assert set(_contracts(project_root)["core"]["source_modules"]) == modules


@pytest.fixture
def tree_copy(tmp_path, project_root) -> Path:
    """The packages and pyproject.toml, copied where a test may break them."""
    for package in PACKAGES:
        shutil.copytree(
            project_root / package,
            tmp_path / package,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    shutil.copy(project_root / "pyproject.toml", tmp_path)
    return tmp_path


def _add_import(module: Path, statement: str) -> None:
    module.write_text(f"{module.read_text()}\n{statement}\n")


def test_the_contracts_hold(tree_copy):
    result = _lint_imports(tree_copy)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "statement", "contract"),
    [
        ("homelab_dagster/settings.py", "import assets.jobs", "core"),
        ("homelab_dagster/twin.py", "import homelab_dagster.cli.output", "core"),
        ("homelab_dagster/inventory.py", "import infra.cluster", "core"),
        ("resources/pulumi.py", "import assets.jobs", "layers"),
        ("infra/cluster.py", "import resources.pulumi", "layers"),
        ("assets/jobs.py", "import homelab_dagster.definitions", "layers"),
        ("sensors/training.py", "import homelab_dagster.cli", "layers"),
    ],
)
def test_an_import_up_the_layers_breaks_the_build(tree_copy, module, statement, contract):
    _add_import(tree_copy / module, statement)
    result = _lint_imports(tree_copy, contract)
    assert result.returncode != 0, result.stdout[-3000:]
    assert "1 broken" in result.stdout


def test_the_code_location_imports_no_cli_module(project_root):
    probe = (
        "import sys, homelab_dagster.definitions;"
        "print(','.join(sorted(m for m in sys.modules if m.startswith('homelab_dagster.cli')"
        " or m in ('typer', 'rich'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=project_root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""

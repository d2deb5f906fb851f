"""Fixtures of the fault suite: Pulumi stacks of the twin target over a temporary state
directory, configured as the twin's deployment configures them."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from resources.pulumi import PulumiStacks


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A state directory of its own (``HOMELAB_STATE_DIR``)."""
    return tmp_path / "state"


@pytest.fixture
def stacks(state_dir: Path, toolchain, monkeypatch) -> PulumiStacks:
    """Stacks of target ``twin`` under ``state_dir``, as ``resources.deployment`` builds them
    (so ``homelab`` commands with ``HOMELAB_STATE_DIR=state_dir`` see the same stacks)."""
    monkeypatch.delenv("PULUMI_CONFIG_PASSPHRASE", raising=False)
    monkeypatch.delenv("PULUMI_BACKEND_URL", raising=False)
    return PulumiStacks(
        target="twin",
        state_dir=str(state_dir),
        backend_url=f"file://{state_dir / 'pulumi' / 'backend'}",
        passphrase_file=str(state_dir / "pulumi" / "passphrase"),
        generate_passphrase=True,
        install_charts=False,  # as on the twin: chart repositories cannot be reached
        linkerd_link=False,
        lock_wait_s=5,
        lock_poll_s=0.2,
    )


@pytest.fixture
def log() -> logging.Logger:
    return logging.getLogger("faults")


def homelab(state_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``homelab ARGS`` (``python -m homelab_dagster``) on ``state_dir``, its output captured."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOMELAB_", "PULUMI_"))}
    env["HOMELAB_STATE_DIR"] = str(state_dir)
    return subprocess.run(
        [sys.executable, "-m", "homelab_dagster", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[2],
    )

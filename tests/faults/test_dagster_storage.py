"""Fault: Dagster's storage cannot be reached. ``HOMELAB_DAGSTER_POSTGRES_URL`` names a
PostgreSQL server that is not there, or one that refuses the URL's password: the command says
where (host, port, database, the variable) and the database's reason, exits 1, and neither a
traceback nor the password reaches the terminal."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from .conftest import homelab

pytestmark = [pytest.mark.faults]


def _closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refused(state_dir: Path, tmp_path: Path, url: str, password: str) -> str:
    done = homelab(
        state_dir,
        "status",
        env={"HOMELAB_DAGSTER_POSTGRES_URL": url, "DAGSTER_HOME": str(tmp_path / "home")},
        timeout=120,
    )
    printed = done.stdout + done.stderr
    assert done.returncode == 1, printed
    assert "Traceback" not in printed, printed
    assert password not in printed
    assert "Dagster's storage cannot be opened: PostgreSQL at 127.0.0.1:" in done.stderr
    assert "(HOMELAB_DAGSTER_POSTGRES_URL)" in done.stderr
    return done.stderr


def test_a_server_that_is_not_there_is_named_with_its_reason(state_dir, tmp_path):
    port = _closed_port()
    password = "canary-pw-" + "9" * 8
    url = f"postgresql+psycopg2://dagster:{password}@127.0.0.1:{port}/dagster"
    said = _refused(state_dir, tmp_path, url, password)
    assert f"127.0.0.1:{port}/dagster" in said
    assert "Connection refused" in said


def test_a_wrong_password_is_named_without_either_password(postgres_url, state_dir, tmp_path):
    real = make_url(postgres_url)
    wrong = "wrong-" + (real.password or "")[::-1]
    url = real.set(password=wrong).render_as_string(hide_password=False)
    said = _refused(state_dir, tmp_path, url, wrong)
    assert real.password not in said
    assert "password authentication failed" in said

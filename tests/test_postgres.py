"""Dagster's storage in PostgreSQL (``HOMELAB_DAGSTER_POSTGRES_URL``): the instance's
``dagster.yaml`` names the variable, never the password, and what one process records (a
materialisation, a sensor's cursor) a new process on the same database reads back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from homelab_dagster.cli.launch import ensure_dagster_home
from homelab_dagster.errors import SettingsError
from homelab_dagster.settings import Settings
from sensors.git import SENSOR_NAME

# The first process: a materialisation of the inventory and its check, in this instance.
MATERIALISE = """
import sys
from pathlib import Path

import dagster as dg

from assets import build_inventory_defs

defs = build_inventory_defs(Path(sys.argv[1]))
with dg.DagsterInstance.get() as instance:
    result = dg.materialize([*defs.assets, *defs.asset_checks], instance=instance)
    print(type(instance.run_storage).__name__, result.run_id)
"""

# The process after the restart: what the instance remembers.
READ_BACK = """
import json, sys

import dagster as dg

with dg.DagsterInstance.get() as instance:
    event = instance.get_latest_materialization_event(dg.AssetKey("homelab_inventory"))
    cursors = {
        state.instigator_name: getattr(state.instigator_data, "cursor", None)
        for state in instance.all_instigator_state()
    }
    print(json.dumps({"run_id": event.run_id if event else None, "cursors": cursors}))
"""


def _python(code: str, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_dagster_yaml_names_the_variable_not_the_url(tmp_path, monkeypatch):
    url = "postgresql+psycopg2://homelab:not-in-files@db.example:5432/dagster"
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    home = Path(ensure_dagster_home(Settings.from_env({"HOMELAB_STATE_DIR": str(tmp_path)})))
    sqlite = (home / "dagster.yaml").read_text()
    assert "storage" not in sqlite and "nux:\n  enabled: false" in sqlite

    env = {"HOMELAB_STATE_DIR": str(tmp_path), "HOMELAB_DAGSTER_POSTGRES_URL": url}
    ensure_dagster_home(Settings.from_env(env))
    text = (home / "dagster.yaml").read_text()
    assert "postgres_url:\n      env: HOMELAB_DAGSTER_POSTGRES_URL" in text
    assert "not-in-files" not in text and "db.example" not in text
    assert "not-in-files" not in repr(Settings.from_env(env))
    with pytest.raises(SettingsError, match=r"must start with postgresql\+psycopg2://") as err:
        Settings.from_env(env | {"HOMELAB_DAGSTER_POSTGRES_URL": url.split("+psycopg2")[1]})
    assert "not-in-files" not in str(err.value)

    # A dagster.yaml someone else wrote is theirs.
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: true\n")
    ensure_dagster_home(Settings.from_env({"HOMELAB_STATE_DIR": str(tmp_path)}))
    assert (home / "dagster.yaml").read_text() == "telemetry:\n  enabled: true\n"


@pytest.mark.slow
def test_materialisation_and_sensor_cursor_survive_a_restart(
    postgres_url, dagster_env, project_root, monkeypatch
):
    env = dagster_env | {"HOMELAB_DAGSTER_POSTGRES_URL": postgres_url}
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    home = Path(ensure_dagster_home(Settings.from_env(env)))

    storage, run_id = _python(MATERIALISE, str(project_root / "homelab.yaml"), env=env).split()
    assert storage == "PostgresRunStorage"
    cursor = json.dumps({"sha": "0" * 40, "inventory": "homelab.yaml"})
    # The operator's way to set a cursor (the UI has the same): the code location loads.
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("dagster")),
            "sensor",
            "cursor",
            SENSOR_NAME,
            "--set",
            cursor,
            "-w",
            "workspace.yaml",
        ],
        env=env,
        cwd=project_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    after = json.loads(_python(READ_BACK, env=env))
    assert after == {"run_id": run_id, "cursors": {SENSOR_NAME: cursor}}
    # Nothing in DAGSTER_HOME holds the password, and nothing went to SQLite files.
    password = postgres_url.split(":")[2].split("@")[0]
    for path in home.rglob("*"):
        if path.is_file():
            assert password.encode() not in path.read_bytes(), path
    assert not list(home.rglob("*.db")), "SQLite files were written"

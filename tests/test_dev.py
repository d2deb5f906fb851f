"""Operator comfort: `homelab dev` (what `make dev` runs) is Dagster's current tooling (`dg
dev`), quiet, offline (no telemetry, no onboarding dialog), and stops on Ctrl-C and SIGTERM;
the project is a `dg` project."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import HomelabDev, free_port


def _graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["sigterm", "ctrl-c"],
)
def test_dev_serves_quietly_and_stops(sig, group, dagster_env, tmp_path):
    dev = HomelabDev(dagster_env, tmp_path / "dev.log", free_port())
    dev.wait_ready()
    assert _graphql(dev.url, "{ shouldShowNux }") == {"shouldShowNux": False}
    # Ctrl-C in a terminal signals the whole foreground process group; SIGTERM (a pod being
    # stopped, `kill`) only the process.
    # About 9 s on an idle machine (the code servers go last); room for a loaded CI runner.
    seconds = dev.stop(sig, group=group, timeout=30)
    assert seconds < 30
    output = dev.output()
    assert "DAGSTER_HOME=" in output and "(SQLite)" in output
    for noise in ("supersed", "does not match the virtual environment", "Traceback"):
        assert noise not in output, output
    assert not (Path(dagster_env["DAGSTER_HOME"]) / "logs" / "event.log").exists(), "telemetry"


@pytest.mark.slow
def test_dg_check_defs(project_root):
    dg = Path(sys.executable).with_name("dg")
    env = os.environ | {"VIRTUAL_ENV": sys.prefix}
    done = subprocess.run(
        [str(dg), "check", "defs"],
        cwd=project_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All definitions loaded successfully" in done.stdout + done.stderr


def test_shell_completion_completes_the_verbs():
    homelab = Path(sys.executable).with_name("homelab")

    def complete(words: str) -> list[str]:
        env = os.environ | {
            "_HOMELAB_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split(" ")) - 1),
        }
        done = subprocess.run([str(homelab)], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("homelab tw") == ["twin"]
    assert {"up", "down", "status"} <= set(complete("homelab twin "))
    assert "dev" in complete("homelab d")

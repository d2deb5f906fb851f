"""Fault: two ``homelab up --env pi`` started at once on the same state directory and the same
Dagster home (two terminals, or a terminal and a schedule)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from resources import _stack_locks
from resources.pulumi import PROJECT

pytestmark = [pytest.mark.faults, pytest.mark.twin, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_two_ups_at_once_one_waits_or_fails_clearly_and_nothing_is_corrupted(
    short_tmp, toolchain, twin_port_base, monkeypatch
):
    """Injects: two `homelab up --env pi` processes started together with the same
    HOMELAB_STATE_DIR and DAGSTER_HOME. Asserts: at least one succeeds; the other succeeds
    too (it waited) or fails with an `error:` line and no traceback; the stack's state is
    readable, holds no pending operation and no lock; Dagster's instance records the
    successful run; a third `homelab up --env pi` succeeds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOMELAB_", "DAGSTER_"))}
    env |= {
        "HOMELAB_STATE_DIR": str(short_tmp / "state"),
        "DAGSTER_HOME": str(short_tmp / "dagster"),
        "HOMELAB_TWIN_PORT_BASE": str(twin_port_base + 700),
    }
    homelab = [sys.executable, "-m", "homelab_dagster"]
    backend = f"file://{short_tmp / 'state' / 'pulumi' / 'backend'}"
    try:
        procs = [
            subprocess.Popen(
                [*homelab, "up", "--env", "pi"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [p.communicate(timeout=900)[0] for p in procs]
        codes = [p.returncode for p in procs]
        assert 0 in codes, "\n----\n".join(o[-4000:] for o in outputs)
        for code, output in zip(codes, outputs, strict=True):
            assert "Traceback" not in output, output[-3000:]
            if code != 0:
                assert code == 1 and "error:" in output, output[-3000:]

        files = _stack_locks.state_files(backend, PROJECT, "twin.cluster.pi")
        assert files is not None and files.file.exists() and not files.damaged()
        assert files.pending_operations() == []
        assert _stack_locks.read_locks(backend, "twin.cluster.pi") == []

        import dagster as dg

        ok = outputs[codes.index(0)]
        (run_id,) = re.findall(r"\(run ([0-9a-f-]{36})\)", ok)
        monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
        with dg.DagsterInstance.get() as inst:
            run = inst.get_run_by_id(run_id)
            assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS

        third = subprocess.run(
            [*homelab, "up", "--env", "pi"], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert third.returncode == 0, (third.stdout + third.stderr)[-3000:]
    finally:
        subprocess.run([*homelab, "twin", "down", "--purge"], cwd=ROOT, env=env, timeout=300)

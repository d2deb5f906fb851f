"""The ``homelab`` CLI through typer's runner: output and exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from homelab_dagster.cli import app

runner = CliRunner()


def test_validate_the_shipped_inventory(project_root):
    result = runner.invoke(app, ["validate", str(project_root / "homelab.yaml")])
    assert result.exit_code == 0, result.output
    assert "is valid" in result.output
    assert "5 clusters, 34 nodes, 6 GPUs, 5 mesh links" in result.output.replace("\n", " ")


def test_validate_reports_every_problem_and_exits_1(tmp_path, inventory_text):
    def edit(data):
        data["clusters"]["pro"]["api_port"] = 6443
        data["endpoints"]["vllm"]["tensor_parallel_size"] = 4

    bad = tmp_path / "bad.yaml"
    bad.write_text(inventory_text(edit))
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    assert "clusters.pro.api_port" in result.output
    assert "endpoints.vllm.tensor_parallel_size" in result.output
    assert "2 problem(s)" in result.output


def test_validate_a_missing_file(tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "cannot read the inventory" in result.output


def test_show_uses_the_environment_setting(project_root, monkeypatch):
    monkeypatch.setenv("HOMELAB_INVENTORY", str(project_root / "homelab.yaml"))
    result = runner.invoke(app, ["show"])
    assert result.exit_code == 0, result.output
    assert "forge" in result.output and "sre-agent" in result.output


def test_bad_target_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HOMELAB_TARGET", "prod")
    result = runner.invoke(app, ["show"])
    assert result.exit_code == 1
    assert "HOMELAB_TARGET='prod' is not a target" in result.output


def test_usage_error_exits_2():
    assert runner.invoke(app, ["validate", "a", "b"]).exit_code == 2


@pytest.mark.twin
def test_up_materialises_one_cluster_on_the_twin(
    project_root, short_tmp, toolchain, twin_port_base
):
    # A subprocess, as a person runs it: the code location it loads reads this environment.
    env = {
        **os.environ,
        "HOMELAB_STATE_DIR": str(short_tmp / "state"),
        "DAGSTER_HOME": str(short_tmp / "dagster"),
        "HOMELAB_TWIN_PORT_BASE": str(twin_port_base + 200),  # beside the session twin
    }
    homelab = [sys.executable, "-m", "homelab_dagster"]
    try:
        result = subprocess.run(
            [*homelab, "up", "--env", "air"],
            cwd=project_root,
            env=env,
            capture_output=True,
            text=True,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:]
        assert "twin air: ready" in output
        assert "materialised" in output and "cluster/air" in output
        assert (short_tmp / "dagster" / "dagster.yaml").exists()
        # What the steps print themselves goes to a file, not through the progress display.
        assert "STEP_WORKER_STARTED" not in output
        steps_log = short_tmp / "state" / "logs" / "steps.log"
        assert 'Executing step "cluster__air"' in steps_log.read_text()
    finally:
        subprocess.run([*homelab, "twin", "down", "--purge"], cwd=project_root, env=env)


def test_up_unknown_cluster_exits_2(project_root, monkeypatch):
    monkeypatch.chdir(project_root)
    result = runner.invoke(app, ["up", "--env", "mars"])
    assert result.exit_code == 2
    assert "unknown cluster 'mars'" in result.output


def _homelab(*args: str, cwd) -> subprocess.CompletedProcess[str]:
    """The real entry point (``python -m homelab_dagster``), as a person runs it."""
    return subprocess.run(
        [sys.executable, "-m", "homelab_dagster", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
    )


def test_the_command_keeps_its_exit_codes_and_output(project_root, tmp_path):
    ok = _homelab("validate", cwd=project_root)
    assert ok.returncode == 0 and "is valid" in ok.stdout
    missing = _homelab("validate", str(tmp_path / "nope.yaml"), cwd=project_root)
    assert missing.returncode == 1
    assert "cannot read the inventory" in missing.stderr + missing.stdout
    unknown = _homelab("nosuch", cwd=project_root)
    assert unknown.returncode == 2 and "No such command" in unknown.stderr


def test_validate_and_show_import_no_dagster(project_root):
    # The commands that only read the inventory stay quick: Dagster and the code location
    # are imported when a command runs a job.
    probe = (
        "import sys; from homelab_dagster.cli import app;"
        "from typer.testing import CliRunner; r = CliRunner().invoke(app, ['show']);"
        "print(r.exit_code, 'dagster' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=project_root, capture_output=True, text=True
    )
    assert result.stdout.strip() == "0 False", result.stderr


def test_the_steps_output_goes_to_the_log_and_the_console_keeps_the_terminal(tmp_path):
    # What child processes print (Dagster's step processes inherit fds 1 and 2) lands in the
    # steps log; this process's own prints still reach its stdout, and both come back after.
    probe = f"""
import os, subprocess, sys
from pathlib import Path
from homelab_dagster.cli.output import console, steps_output_to
log = Path({str(tmp_path / "logs" / "steps.log")!r})
with steps_output_to(log):
    step = "import sys; print('from a step'); print('oops', file=sys.stderr)"
    subprocess.run([sys.executable, "-c", step])
    console.print("from the progress display")
    print("from the command")
print("after")
os.write(1, b"fd after\\n")
print(oct(log.stat().st_mode & 0o777))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "from the progress display",
        "from the command",
        "after",
        "fd after",
        "0o600",
    ]
    assert result.stderr == ""
    assert (tmp_path / "logs" / "steps.log").read_text() == "from a step\noops\n"


def test_a_failed_run_names_each_failure_and_the_steps_log(tmp_path, capsys):
    import typer

    from homelab_dagster.cli.launch import RunOutcome
    from homelab_dagster.cli.output import exit_if_failed
    from homelab_dagster.settings import Settings

    settings = Settings.from_env({"HOMELAB_STATE_DIR": str(tmp_path)})
    failed = RunOutcome("r1", False, {"cluster__air": "failed"}, {"cluster__air": "stack locked"})
    with pytest.raises(typer.Exit) as exited:
        exit_if_failed(failed, settings, "materialising cluster/air")
    assert exited.value.exit_code == 1
    err = capsys.readouterr().err
    assert "cluster__air" in err and "stack locked" in err
    assert "run r1 failed (materialising cluster/air)" in err
    assert str(settings.steps_log) in err.replace("\n", "")
    exit_if_failed(RunOutcome("r2", True), settings)  # a run that succeeded: no exit


def test_the_progress_table_ends_its_line_where_output_is_not_a_terminal():
    """In a log or a pipe, what is printed after the table starts a line of its own (rich's
    Live leaves its last frame's line open there: `┘drift cluster/pi: ...`)."""
    import io

    import dagster as dg
    from rich.console import Console

    from homelab_dagster.cli.launch import _Follower

    out = io.StringIO()
    with dg.instance_for_test() as instance:
        follower = _Follower(instance, "no-such-run", Console(file=out, width=60), "steps")
        follower.start()
        follower.stop()
    assert "└" in out.getvalue() and out.getvalue().endswith("┘\n"), repr(out.getvalue())

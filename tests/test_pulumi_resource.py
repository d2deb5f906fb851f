"""The Pulumi resource's own logic: names, passphrase, locks, events, results, and the rule
that only Pulumi's public Automation API is used.

The parts that need the Pulumi CLI run in tests/test_pulumi_stacks.py (with the toolchain)
and tests/test_clusters_twin.py (against the twin).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from pulumi import automation as auto

from homelab_dagster.errors import StackError, StackLockedError, ToolchainError
from homelab_dagster.settings import Settings, Target
from resources import _stack_locks
from resources._stack_result import (
    SECRET_MASK,
    EventRecorder,
    StackResult,
    change_counts,
    mask_outputs,
)
from resources.deployment import build_deployment
from resources.pulumi import PulumiStacks, _pulumi_command


def stacks(tmp_path, **kwargs) -> PulumiStacks:
    defaults = {
        "target": "twin",
        "state_dir": str(tmp_path),
        "passphrase_file": str(tmp_path / "pulumi" / "passphrase"),
        "generate_passphrase": True,
        "use_toolchain": False,
        "lock_wait_s": 0.5,
        "lock_poll_s": 0.1,
    }
    return PulumiStacks(**(defaults | kwargs))


def test_stack_names_follow_the_asset_keys(tmp_path):
    p = stacks(tmp_path)
    assert p.stack_name(["cluster", "forge"]) == "twin.cluster.forge"
    assert p.stack_name(["mesh_link", "studio__forge"]) == "twin.mesh_link.studio__forge"
    assert p.backend == f"file://{tmp_path}/pulumi/backend?metadata=skip"
    assert p.work_dir("twin.cluster.forge") == tmp_path / "pulumi" / "work" / "twin.cluster.forge"


def test_a_file_backend_writes_no_sidecars_unless_its_url_says_otherwise(tmp_path):
    """gocloud's ``.attrs`` sidecars are rewritten in place, so a read of a state while another
    process writes it can fail; ``metadata=skip`` turns them off, kept where a URL chooses."""
    url = f"file://{tmp_path}/b"
    assert stacks(tmp_path, backend_url=url).backend == f"{url}?metadata=skip"
    assert stacks(tmp_path, backend_url=f"{url}?no_tmp_dir=false").backend == (
        f"{url}?no_tmp_dir=false&metadata=skip"
    )
    for chosen in (f"{url}?metadata=", f"{url}?metadata=skip"):
        assert stacks(tmp_path, backend_url=chosen).backend == chosen
    assert stacks(tmp_path, backend_url="s3://bucket/x").backend == "s3://bucket/x"


def test_the_target_picks_the_configuration(tmp_path, shipped_inventory):
    twin = Settings(tmp_path / "homelab.yaml", Target.TWIN, tmp_path)
    resources = build_deployment(twin, shipped_inventory).resources
    assert resources["pulumi"].backend_url == f"file://{tmp_path}/pulumi/backend"
    assert resources["pulumi"].generate_passphrase
    assert resources["kubernetes"].context("forge") == "twin-forge"
    assert resources["kubernetes"].kubeconfig == str(tmp_path / "twin" / "kubeconfig")
    homelab_settings = Settings(tmp_path / "homelab.yaml", Target.HOMELAB, tmp_path)
    homelab = build_deployment(homelab_settings, shipped_inventory).resources
    assert homelab["pulumi"].passphrase_file is None
    assert not homelab["pulumi"].use_toolchain
    assert homelab["kubernetes"].context("air") == "kind-air"
    assert homelab["kubernetes"].context("forge") == "forge"


def test_the_twin_passphrase_is_generated_once_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv("PULUMI_CONFIG_PASSPHRASE", raising=False)
    p = stacks(tmp_path)
    p._check_passphrase()
    path = tmp_path / "pulumi" / "passphrase"
    first = path.read_text()
    assert len(first.strip()) >= 32
    assert path.stat().st_mode & 0o777 == 0o600
    p._check_passphrase()
    assert path.read_text() == first
    assert p.env()["PULUMI_CONFIG_PASSPHRASE_FILE"] == str(path)
    assert first.strip() not in json.dumps(p.env())


def test_a_readable_passphrase_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("PULUMI_CONFIG_PASSPHRASE", raising=False)
    path = tmp_path / "pulumi" / "passphrase"
    path.parent.mkdir()
    path.write_text("not so secret\n")
    path.chmod(0o644)
    with pytest.raises(StackError, match=r"readable by others .*chmod 600"):
        stacks(tmp_path)._check_passphrase()


def test_a_passphrase_variable_that_would_shadow_the_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PULUMI_CONFIG_PASSPHRASE", "x")
    with pytest.raises(StackError, match="PULUMI_CONFIG_PASSPHRASE is set"):
        stacks(tmp_path)._check_passphrase()


def test_without_a_passphrase_file_the_environment_must_have_one(tmp_path, monkeypatch):
    for var in ("PULUMI_CONFIG_PASSPHRASE", "PULUMI_CONFIG_PASSPHRASE_FILE"):
        monkeypatch.delenv(var, raising=False)
    p = stacks(tmp_path, passphrase_file=None)
    with pytest.raises(StackError, match="no secrets passphrase"):
        p._check_passphrase()
    monkeypatch.setenv("PULUMI_CONFIG_PASSPHRASE_FILE", "/somewhere/else")
    p._check_passphrase()


def write_lock(tmp_path, stack: str, pid: int, host: str | None = None) -> str:
    lock_dir = tmp_path / "pulumi" / "backend" / ".pulumi" / "locks" / "organization" / "homelab"
    (lock_dir / stack).mkdir(parents=True, exist_ok=True)
    path = lock_dir / stack / "4d1f.json"
    record = {"pid": pid, "username": "ops", "hostname": host or socket.gethostname()}
    path.write_text(json.dumps(record | {"timestamp": "2026-01-01T00:00:00Z"}))
    return str(path)


def test_a_dead_owners_lock_fails_at_once_with_the_command_that_clears_it(tmp_path, monkeypatch):
    monkeypatch.delenv("PULUMI_CONFIG_PASSPHRASE", raising=False)
    dead_pid = 4_000_000  # above pid_max: never a live process
    path = write_lock(tmp_path, "twin.cluster.forge", dead_pid)
    p = stacks(tmp_path, lock_wait_s=60)
    with pytest.raises(StackLockedError) as info:
        p._wait_for_locks("twin.cluster.forge", deadline=float("inf"), log=logging.getLogger())
    message = str(info.value)
    assert f"ops@{socket.gethostname()} (pid {dead_pid}, process gone" in message
    assert "pulumi cancel --yes --stack twin.cluster.forge" in message
    assert f"rm {path}" in message
    assert os.path.exists(path)  # reported, never cleared


def test_a_live_owners_lock_is_waited_for_then_named(tmp_path):
    write_lock(tmp_path, "twin.cluster.air", os.getpid())
    p = stacks(tmp_path)
    with pytest.raises(StackLockedError, match=r"locked by ops@.*pid \d+, since .*gave up after"):
        p._wait_for_locks("twin.cluster.air", time.monotonic() + 0.3, logging.getLogger())


def test_locks_of_other_hosts_are_never_judged_dead(tmp_path):
    write_lock(tmp_path, "twin.cluster.pi", 4_000_000, host="elsewhere")
    (lock,) = _stack_locks.read_locks(f"file://{tmp_path}/pulumi/backend", "twin.cluster.pi")
    assert not lock.dead and lock.owner().startswith("ops@elsewhere (pid 4000000, since")
    assert _stack_locks.read_locks("s3://bucket", "twin.cluster.pi") == []


def event(**kinds):
    fields = dict.fromkeys(
        [
            "resource_pre_event",
            "res_outputs_event",
            "res_op_failed_event",
            "diagnostic_event",
            "summary_event",
        ]
    )
    return SimpleNamespace(**(fields | kinds))


def step(op: str, typ: str, name: str, diffs=()):
    """A step event's payload as the Automation API gives it (its own dataclass)."""
    from pulumi.automation import events

    urn = f"urn:pulumi:twin.cluster.forge::homelab::{typ}::{name}"
    metadata = events.StepEventMetadata(
        op=events.OpType(op), urn=urn, type=typ, provider="", diffs=list(diffs)
    )
    return SimpleNamespace(metadata=metadata)


def test_events_are_logged_resource_by_resource(caplog):
    caplog.set_level(logging.INFO)
    recorder = EventRecorder("twin.cluster.forge", "up", logging.getLogger("t"))
    ns = "kubernetes:core/v1:Namespace"
    recorder(event(resource_pre_event=step("create", ns, "namespace-ml-training")))
    recorder(event(res_outputs_event=step("create", ns, "namespace-ml-training")))
    recorder(
        event(
            resource_pre_event=step(
                "update", "kubernetes:core/v1:NodePatch", "node-a", ["metadata"]
            )
        )
    )
    recorder(event(resource_pre_event=step("same", ns, "namespace-linkerd")))
    diag = SimpleNamespace(message="labels: Invalid value: 'x y'\n", severity="error")
    recorder(event(diagnostic_event=diag))
    assert caplog.messages[:3] == [
        f"twin.cluster.forge: creating {ns} namespace-ml-training",
        f"twin.cluster.forge: created {ns} namespace-ml-training",
        "twin.cluster.forge: updating kubernetes:core/v1:NodePatch node-a (metadata)",
    ]
    assert "namespace-linkerd" not in " ".join(caplog.messages)  # unchanged: debug only
    assert recorder.reason("stderr tail") == "labels: Invalid value: 'x y'"
    assert [s.op for s in recorder.steps] == ["create", "update", "same"]


def test_a_preview_logs_what_it_would_do(caplog):
    caplog.set_level(logging.INFO)
    recorder = EventRecorder("twin.cluster.forge", "preview", logging.getLogger("t"))
    recorder(
        event(resource_pre_event=step("delete", "kubernetes:core/v1:Namespace", "namespace-edge"))
    )
    assert caplog.messages == [
        "twin.cluster.forge: would delete kubernetes:core/v1:Namespace namespace-edge"
    ]


def test_results_mask_secrets_and_count_changes():
    sig = "4dabf18193072939515e22adb298388d"  # the engine's mark of a secret value
    outputs = mask_outputs(
        {
            "nodes": auto.OutputValue(["a", "b"], secret=False),
            "kubeconfig": auto.OutputValue("apiVersion: v1 token: abc", secret=True),
            "nested": {"user": "ops", "password": {sig: "1b47", "ciphertext": "abc"}},
        }
    )
    assert outputs == {
        "kubeconfig": SECRET_MASK,
        "nested": {"user": "ops", "password": SECRET_MASK},
        "nodes": ["a", "b"],
    }
    result = StackResult("up", "twin.cluster.forge", {"same": 20, "create": 2}, 1.5, outputs)
    metadata = result.metadata()
    assert metadata["pulumi_changed"] == 2
    assert metadata["pulumi_stack"] == "twin.cluster.forge"
    assert "abc" not in json.dumps(metadata["pulumi_outputs"].value)
    assert set(metadata) == {
        "pulumi_stack",
        "pulumi_operation",
        "pulumi_changes",
        "pulumi_changed",
        "pulumi_duration_s",
        "pulumi_resource_count",
        "pulumi_outputs",
        "pulumi_plan",
    }


def test_change_counts_come_from_the_sdks_typed_results():
    recorder = EventRecorder("twin.cluster.forge", "up", logging.getLogger("t"))
    preview = auto.PreviewResult("", "", {auto.OpType.SAME: 3, auto.OpType.CREATE: 1})
    assert change_counts(preview, recorder) == {"same": 3, "create": 1}
    # An empty stack's destroy has no changes in its history: the summary event's count.
    recorder(event(summary_event=SimpleNamespace(resource_changes={auto.OpType.SAME: 1})))
    summary = SimpleNamespace(resource_changes=None)
    assert change_counts(auto.DestroyResult("", "", summary), recorder) == {"same": 1}


def test_a_pulumi_cli_that_cannot_run_is_a_toolchain_error(tmp_path, monkeypatch):
    monkeypatch.delenv("PULUMI_CONFIG_PASSPHRASE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no pulumi anywhere
    _pulumi_command.cache_clear()  # the CLI is asked for its version once per process
    try:
        with pytest.raises(ToolchainError, match="cannot run pulumi on PATH"):
            stacks(tmp_path).outputs("twin.cluster.forge")
    finally:
        _pulumi_command.cache_clear()


_PRIVATE_TEXT = re.compile(r"pulumi\.automation\._\w+|from\s+pulumi\.automation\s+import\s+_\w+")


def _private_automation_uses(path: Path) -> list[str]:
    """Imports of ``pulumi.automation._*`` modules, and ``_names`` read from the Automation
    API's package, in one source file."""
    text = path.read_text()
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError:  # not this test's business: the plain text still tells
        return [f"{path}: {m.group()}" for m in _PRIVATE_TEXT.finditer(text)]
    aliases = {"pulumi.automation"}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
            aliases |= {a.asname for a in node.names if a.name == "pulumi.automation" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if node.module == "pulumi":
                aliases |= {a.asname or a.name for a in node.names if a.name == "automation"}
        private = [n for n in names if "pulumi.automation._" in n]
        if private:  # one finding per statement
            found.append(f"{path}:{node.lineno}: {private[0]}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and ast.unparse(node.value) in aliases
        ):
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


# The benchmark's stand-in for Pulumi's Python language host (benchmarks/pulumi_noop.py) serves a
# shell project with the SDK's LanguageServer: a measuring tool, not part of the product.
_PRIVATE_ALLOWED = {"benchmarks/pulumi_noop.py"}


def test_only_pulumis_public_automation_api_is_used(project_root, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from pulumi.automation._stack import StackInitMode\n"
        "import pulumi.automation._cmd\n"
        "from pulumi.automation import _server\n"
        "from pulumi import automation as auto\n"
        "auto._stack.Stack\n"
    )
    assert len(_private_automation_uses(bad)) == 4  # every form is seen
    broken = tmp_path / "broken.py"
    broken.write_text("from pulumi.automation._stack import StackInitMode\ntry, x:\n")
    assert len(_private_automation_uses(broken)) == 1  # and in a file that does not parse
    sources = []
    for folder, dirs, files in os.walk(project_root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        sources += [Path(folder) / f for f in files if f.endswith(".py")]
    assert len(sources) > 20
    found = [
        use
        for path in sources
        if str(path.relative_to(project_root)) not in _PRIVATE_ALLOWED
        for use in _private_automation_uses(path)
    ]
    assert found == []

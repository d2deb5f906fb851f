"""The Git sensor against real repositories: the code location's sensor, evaluated by Dagster
(``evaluate_tick``) with ``build_sensor_context``, on commits made with the ``git`` CLI."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import dagster as dg
import pytest

from homelab_dagster.definitions import build_definitions
from homelab_dagster.errors import GitError, InventoryError, StaleCodeLocationError
from homelab_dagster.loader import MAX_BYTES, load_inventory
from homelab_dagster.settings import Settings, Target
from resources.git import GitRepository
from sensors.git import (
    SENSOR_NAME,
    TAG_AUTHOR,
    TAG_BASE,
    TAG_COMMIT,
    TAG_COMMITS,
    TAG_REWRITTEN,
    TAG_SUBJECT,
    GitCursor,
)

E = TypeVar("E", bound=BaseException)

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")

FORGE_PLATFORM = "labels: {tier: platform}}\n      # twin: real: on the twin, training pods"
STUDIO_LINK = "    - {from: studio, to: forge, latency_ms: [2, 3]}"


class Origin:
    """A repository the sensor watches, with commits made by the ``git`` CLI."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def git(self, *args: str) -> str:
        env = {
            "GIT_AUTHOR_NAME": "Ada Lovelace",
            "GIT_AUTHOR_EMAIL": "ada@example.org",
            "GIT_COMMITTER_NAME": "Ada Lovelace",
            "GIT_COMMITTER_EMAIL": "ada@example.org",
            "PATH": "/usr/bin:/bin:/usr/local/bin",
            "HOME": str(self.path),
        }
        done = subprocess.run(
            ["git", "-C", str(self.path), *args],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        return done.stdout.strip()

    def commit(self, message: str, files: dict[str, str]) -> str:
        for name, text in files.items():
            (self.path / name).parent.mkdir(parents=True, exist_ok=True)
            (self.path / name).write_text(text)
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")

    def inventory(self) -> str:
        return (self.path / "homelab.yaml").read_text()

    def edit_inventory(self, message: str, old: str, new: str) -> str:
        text = self.inventory()
        assert old in text, old
        return self.commit(message, {"homelab.yaml": text.replace(old, new, 1)})


@pytest.fixture
def origin(tmp_path, project_root) -> Origin:
    repo = Origin(tmp_path / "origin")
    repo.path.mkdir()
    repo.git("init", "-q", "-b", "main")
    repo.commit(
        "the homelab",
        {
            "homelab.yaml": (project_root / "homelab.yaml").read_text(),
            "docs/operations.md": "# Operations\n",
            "tests/test_x.py": "def test_x():\n    pass\n",
            "infra/cluster.py": "# the cluster program\n",
        },
    )
    return repo


@pytest.fixture(scope="module")
def code_location(project_root, tmp_path_factory) -> dg.Definitions:
    """The code location of the shipped inventory (what the sensor's commits start from)."""
    settings = Settings(
        project_root / "homelab.yaml", Target.TWIN, tmp_path_factory.mktemp("state")
    )
    return build_definitions(settings, load_inventory(settings.inventory_path).inventory)


@pytest.fixture
def git(tmp_path, origin) -> GitRepository:
    return GitRepository(url=str(origin.path), branch="main", state_dir=str(tmp_path / "state"))


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture
def tick(code_location, git, instance):
    """``tick(cursor)``: one evaluation of the code location's Git sensor."""
    sensor = code_location.resolve_sensor_def(SENSOR_NAME)

    def evaluate(cursor: str | None, repository: GitRepository | None = None):
        with dg.build_sensor_context(
            cursor=cursor,
            instance=instance,
            definitions=code_location,
            resources={"git": repository or git},
        ) as context:
            return sensor.evaluate_tick(context)

    return evaluate


def sha_of(raw: str | None) -> str:
    """The commit a stored cursor records."""
    cursor = GitCursor.load(raw)
    assert cursor is not None
    return cursor.sha


def cause(exc: BaseException, kind: type[E]) -> E:
    """The first exception of ``kind`` in ``exc``'s chain (Dagster wraps the sensor's error)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    raise AssertionError(f"no {kind.__name__} in the chain of {exc!r}")


def test_the_first_tick_records_the_head_and_requests_nothing(tick, origin):
    result = tick(None)
    assert result.run_requests == []
    assert "first tick" in result.skip_message
    cursor = GitCursor.load(result.cursor)
    assert cursor is not None
    assert cursor.sha == origin.git("rev-parse", "HEAD")


def test_a_forge_label_commit_runs_cluster_forge_alone_tagged_with_the_commit(tick, origin, capfd):
    first = tick(None)
    sha = origin.edit_inventory(
        "forge-platform: a zone hint",
        FORGE_PLATFORM,
        FORGE_PLATFORM.replace("{tier: platform}", "{tier: platform, zone-hint: rack-2}"),
    )
    result = tick(first.cursor)
    (request,) = result.run_requests
    assert request.asset_selection == [dg.AssetKey(["cluster", "forge"])]
    assert request.tags[TAG_COMMIT] == sha
    assert request.tags[TAG_AUTHOR] == "Ada Lovelace <ada@example.org>"
    assert request.tags[TAG_SUBJECT] == "forge-platform: a zone hint"
    assert request.tags[TAG_BASE] == sha_of(first.cursor)
    assert request.tags[TAG_COMMITS] == "1"
    assert TAG_REWRITTEN not in request.tags
    assert sha_of(result.cursor) == sha
    # The tick's log says which entry selected which asset.
    assert (
        f"{sha[:12]}: cluster/forge selected by homelab.yaml: "
        "clusters.forge.nodes.forge-platform.labels.zone-hint changed"
    ) in capfd.readouterr().err


@pytest.mark.parametrize(
    "change",
    [
        {"homelab.yaml": lambda text: text.replace("  forge:\n", "  forge:  # the GPU box\n")},
        {"docs/operations.md": lambda text: text + "\nA new runbook.\n"},
        {"tests/test_x.py": lambda text: text + "\n\ndef test_y():\n    pass\n"},
    ],
    ids=["comment", "docs", "test"],
)
def test_a_comment_docs_or_test_commit_requests_nothing(tick, origin, change):
    first = tick(None)
    files = {name: edit((origin.path / name).read_text()) for name, edit in change.items()}
    sha = origin.commit("words", files)
    result = tick(first.cursor)
    assert result.run_requests == []
    assert "nothing to materialise" in result.skip_message
    assert sha_of(result.cursor) == sha


def test_a_commit_to_the_endpoint_program_requests_the_endpoints(tick, origin):
    """The issue's case: ``infra/endpoint.py`` changed, the endpoints it programs are
    requested (the external model's endpoint too: its server is ours, its weights are not)."""
    first = tick(None)
    sha = origin.commit("endpoint program", {"infra/endpoint.py": "# the endpoint program\n"})
    (request,) = tick(first.cursor).run_requests
    assert {k.to_user_string() for k in request.asset_selection} == {
        "vllm_endpoint/sre-agent",
        "vllm_endpoint/vllm",
    }
    assert request.tags[TAG_COMMIT] == sha


def test_many_commits_coalesce_into_one_run(tick, origin):
    first = tick(None)
    origin.edit_inventory("forge label", FORGE_PLATFORM, FORGE_PLATFORM.replace("platform}", "p2}"))
    origin.commit("docs", {"docs/operations.md": "# Ops\n"})
    origin.edit_inventory("link", STUDIO_LINK, STUDIO_LINK.replace("[2, 3]", "[2, 4]"))
    head = origin.commit("program", {"infra/cluster.py": "# the cluster program, v2\n"})
    (request,) = tick(first.cursor).run_requests
    assert sorted(k.to_user_string() for k in request.asset_selection) == sorted(
        [f"cluster/{c}" for c in ("air", "pro", "studio", "pi", "forge")]
        + ["mesh_link/studio__forge"]
    )
    assert request.tags[TAG_COMMIT] == head
    assert request.tags[TAG_COMMITS] == "4"


def test_the_cursor_survives_a_new_evaluation(tick, origin, code_location, git):
    first = tick(None)
    origin.edit_inventory("forge label", FORGE_PLATFORM, FORGE_PLATFORM.replace("platform}", "p2}"))
    second = tick(first.cursor)
    assert len(second.run_requests) == 1
    # A restarted daemon: a new instance, a new sensor context, the stored cursor.
    with (
        dg.instance_for_test() as fresh,
        dg.build_sensor_context(
            cursor=second.cursor, instance=fresh, definitions=code_location, resources={"git": git}
        ) as context,
    ):
        again = code_location.resolve_sensor_def(SENSOR_NAME).evaluate_tick(context)
    assert again.run_requests == []
    assert "no new commit" in again.skip_message
    assert again.cursor == second.cursor


def test_an_invalid_inventory_fails_the_tick_and_keeps_the_cursor(tick, origin):
    first = tick(None)
    bad = FORGE_PLATFORM.replace("{tier: platform}", "{tier: 'not a label!'}")
    origin.edit_inventory("a bad label", FORGE_PLATFORM, bad)
    with pytest.raises(Exception) as failed:
        tick(first.cursor)
    problems = cause(failed.value, InventoryError)
    assert any("not a label!" in str(p) for p in problems.problems)
    # The cursor stayed: the fix is diffed against the commit before the bad one.
    origin.edit_inventory("fixed", bad, FORGE_PLATFORM.replace("platform}", "p2}"))
    (request,) = tick(first.cursor).run_requests
    assert request.tags[TAG_COMMITS] == "2"


def test_a_force_push_is_detected_and_diffed_against_the_cursor_commit(tick, origin):
    first = tick(None)
    base = sha_of(first.cursor)
    origin.edit_inventory("forge label", FORGE_PLATFORM, FORGE_PLATFORM.replace("platform}", "p2}"))
    handled = tick(first.cursor)
    assert [k.to_user_string() for k in handled.run_requests[0].asset_selection] == [
        "cluster/forge"
    ]
    # Rewrite history: drop the forge commit, change a link instead, force the branch.
    origin.git("reset", "-q", "--hard", base)
    head = origin.edit_inventory("link", STUDIO_LINK, STUDIO_LINK.replace("[2, 3]", "[2, 4]"))
    (request,) = tick(handled.cursor).run_requests
    # Against the inventory at the cursor commit: forge's label goes back, the link changes.
    assert sorted(k.to_user_string() for k in request.asset_selection) == [
        "cluster/forge",
        "mesh_link/studio__forge",
    ]
    assert request.tags[TAG_REWRITTEN] == "true"
    assert request.tags[TAG_COMMIT] == head


def test_a_rewrite_past_the_mirror_uses_the_last_applied_inventory(tick, origin, git, tmp_path):
    first = tick(None)
    origin.edit_inventory("forge label", FORGE_PLATFORM, FORGE_PLATFORM.replace("platform}", "p2}"))
    handled = tick(first.cursor)
    # The applied commit is gone: history rewritten, and a fresh mirror that never saw it.
    origin.git("reset", "-q", "--hard", sha_of(first.cursor))
    origin.git("commit", "-q", "--amend", "-m", "the homelab, reworded")
    shutil.rmtree(git.mirror)
    (request,) = tick(handled.cursor).run_requests
    selected = {k.to_user_string() for k in request.asset_selection}
    assert "cluster/forge" in selected  # the label is gone again: from the kept inventory
    assert "training_run/sre-runbook" in selected  # the code may have changed: all of it
    assert "vllm_endpoint/sre-agent" in selected  # so may the serving code
    assert "model_weights/sre-agent" not in selected  # no code path maps to it; unchanged
    assert request.tags[TAG_COMMITS] == "unknown"
    assert request.tags[TAG_REWRITTEN] == "true"


def test_an_unreachable_repository_fails_the_tick_clearly(tick, tmp_path):
    gone = GitRepository(url=str(tmp_path / "nowhere"), state_dir=str(tmp_path / "state2"))
    with pytest.raises(Exception) as failed:
        tick(GitCursor("0" * 40, "0").dump(), gone)
    error = cause(failed.value, GitError)
    assert "cannot fetch" in str(error)
    assert "nowhere" in str(error)


def test_a_corrupt_mirror_fails_the_tick_clearly(tick, git):
    first = tick(None)
    (git.mirror / "HEAD").write_text("garbage\n")
    with pytest.raises(Exception) as failed:
        tick(first.cursor)
    assert "cannot fetch" in str(cause(failed.value, GitError))


def test_assets_the_code_location_lacks_fail_the_tick(tick, origin):
    first = tick(None)
    origin.edit_inventory(
        "a new link",
        STUDIO_LINK,
        STUDIO_LINK + "\n    - {from: air, to: forge, latency_ms: [1, 2]}",
    )
    with pytest.raises(Exception) as failed:
        tick(first.cursor)
    assert "mesh_link/air__forge" in str(cause(failed.value, StaleCodeLocationError))


def test_a_commit_without_the_inventory_fails_the_tick(tick, origin):
    first = tick(None)
    (origin.path / "homelab.yaml").unlink()
    origin.commit("moved away", {})
    with pytest.raises(Exception) as failed:
        tick(first.cursor)
    assert "homelab.yaml is not in commit" in str(cause(failed.value, GitError))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (lambda text: text.replace("# ", "# caf\xe9 ", 1).encode("latin-1"), "not UTF-8 text"),
        (lambda text: text.encode() + b"#" * MAX_BYTES, "refused unread"),
    ],
    ids=["latin-1", "larger-than-the-limit"],
)
def test_an_inventory_the_loader_refuses_fails_the_tick_naming_the_commit(
    tick, origin, git, content, reason
):
    """A commit's inventory goes through the loader's limits, as a file does: Latin-1 bytes
    or a blob over the size limit fail the tick with the loader's problem (naming the file at
    the commit), not a raw decoding error; an oversized blob is never read whole."""
    first = tick(None)
    (origin.path / "homelab.yaml").write_bytes(content(origin.inventory()))
    sha = origin.commit("an inventory the loader refuses", {})
    with pytest.raises(Exception) as failed:
        tick(first.cursor)
    (problem,) = cause(failed.value, InventoryError).problems
    assert problem.file == f"homelab.yaml@{sha[:12]}"
    assert reason in problem.reason
    (blob,) = git.read((sha, "homelab.yaml"), max_bytes=MAX_BYTES)
    assert (blob.data is None) == (blob.size > MAX_BYTES)


def test_a_cursor_the_sensor_did_not_write_is_a_clear_error():
    with pytest.raises(GitError, match="not a Git cursor"):
        GitCursor.load("4b825dc642cb6eb9a060e54bf8d69288fbee4904")


def test_long_subjects_make_valid_tags(tick, origin):
    first = tick(None)
    subject = "forge: " + "a very long subject " * 30
    origin.edit_inventory(subject, FORGE_PLATFORM, FORGE_PLATFORM.replace("platform}", "p2}"))
    (request,) = tick(first.cursor).run_requests
    assert len(request.tags[TAG_SUBJECT]) <= 200
    assert request.tags[TAG_SUBJECT].startswith("forge: a very long subject")


@pytest.mark.parametrize(
    ("target", "status"),
    [
        (Target.TWIN, dg.DefaultSensorStatus.RUNNING),
        (Target.HOMELAB, dg.DefaultSensorStatus.STOPPED),
    ],
)
def test_the_sensor_runs_by_default_on_the_twin_only(project_root, tmp_path, target, status):
    settings = Settings(project_root / "homelab.yaml", target, tmp_path)
    defs = build_definitions(settings, load_inventory(settings.inventory_path).inventory)
    assert defs.resolve_sensor_def(SENSOR_NAME).default_status is status


# ------------------------------------------------------------------ homelab plan


def test_plan_shows_the_assets_a_change_selects_and_what_follows(origin, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from homelab_dagster.cli.app import app

    origin.commit("docs", {"docs/operations.md": "# Operations, again\n"})
    text = origin.inventory()
    (origin.path / "homelab.yaml").write_text(
        text.replace(FORGE_PLATFORM, FORGE_PLATFORM.replace("platform}", "p2}"))
    )
    monkeypatch.setenv("HOMELAB_INVENTORY", str(origin.path / "homelab.yaml"))
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(app, ["plan"])
    assert result.exit_code == 0, result.output
    assert "against HEAD~1" in result.output
    assert "cluster/forge" in result.output
    assert "clusters.forge.nodes.forge-platform.labels.tier" in result.output
    assert "cluster/air" not in result.output  # docs select nothing
    assert "training_run/sre-runbook" in result.output.split("then downstream")[1]
    # HEAD itself changed only docs.
    assert "nothing to materialise" in CliRunner().invoke(app, ["plan", "--head"]).output


def test_plan_reports_an_invalid_working_tree_inventory(origin, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from homelab_dagster.cli.app import app

    origin.commit("docs", {"docs/operations.md": "# Operations, again\n"})
    (origin.path / "homelab.yaml").write_text(
        origin.inventory().replace("version: 1", "version: 9")
    )
    monkeypatch.setenv("HOMELAB_INVENTORY", str(origin.path / "homelab.yaml"))
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    result = CliRunner().invoke(app, ["plan"])
    assert result.exit_code == 1
    assert "invalid inventory" in result.output


# ------------------------------------------------------------------ on the twin


@pytest.mark.twin
@pytest.mark.slow
def test_on_the_twin_a_label_commit_lands_on_forges_node(twin, origin, git, tmp_path):
    """The acceptance on the twin: the tick's run, materialised, puts the label on the node."""
    from kubernetes import client

    from assets.graph import build_homelab_defs
    from homelab_dagster.loader import parse_inventory
    from resources.deployment import build_deployment

    twin.up(["forge"])
    sha = origin.edit_inventory(
        "forge-platform: a zone hint",
        FORGE_PLATFORM,
        FORGE_PLATFORM.replace("{tier: platform}", "{tier: platform, zone-hint: rack-2}"),
    )
    new = parse_inventory(origin.inventory())
    # The code location of the commit (as after a reload), its sensor, one tick.
    settings = Settings(
        twin.root.parent / "homelab.yaml",
        Target.TWIN,
        twin.root.parent,
        twin_port_base=twin.api_port_base,
    )
    code_location = build_definitions(settings, new)
    with dg.instance_for_test() as instance:
        sensor = code_location.resolve_sensor_def(SENSOR_NAME)
        cursor = GitCursor(origin.git("rev-parse", "HEAD~1"), "0").dump()
        with dg.build_sensor_context(
            cursor=cursor, instance=instance, definitions=code_location, resources={"git": git}
        ) as context:
            (request,) = sensor.evaluate_tick(context).run_requests
        assert request.asset_selection == [dg.AssetKey(["cluster", "forge"])]
        result = dg.materialize(
            list(build_homelab_defs(new).assets or []),
            selection=request.asset_selection,
            resources=build_deployment(settings, new).resources,
            tags=request.tags,
            instance=instance,
            raise_on_error=False,
        )
    assert result.success
    assert result.dagster_run.tags[TAG_COMMIT] == sha
    node = client.CoreV1Api(twin.client("forge")).read_node("forge-platform")
    assert node.metadata.labels["zone-hint"] == "rack-2"


@pytest.mark.twin
@pytest.mark.slow
def test_plan_preview_shows_pulumis_plan_for_the_stacks_a_change_selects(
    twin, origin, tmp_path, project_root
):
    """`homelab plan --preview` on a working-tree change: Pulumi's preview of the selected
    stack, resource by resource, and nothing changed on the cluster."""
    import os
    import subprocess
    import sys

    twin.up(["forge"])
    origin.commit("docs", {"docs/operations.md": "# Operations, again\n"})
    (origin.path / "homelab.yaml").write_text(
        origin.inventory().replace(
            FORGE_PLATFORM, FORGE_PLATFORM.replace("{tier: platform}", "{tier: platform, plan: x}")
        )
    )
    before = _stack_state(twin, "twin.cluster.forge")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOMELAB_", "DAGSTER_"))}
    env |= {
        "HOMELAB_STATE_DIR": str(twin.root.parent),
        "HOMELAB_TWIN_PORT_BASE": str(twin.api_port_base),
        "HOMELAB_INVENTORY": str(origin.path / "homelab.yaml"),
        "DAGSTER_HOME": str(tmp_path / "dagster-home"),
        "COLUMNS": "200",
    }
    done = subprocess.run(
        [sys.executable, "-m", "homelab_dagster", "plan", "--preview"],
        env=env,
        cwd=project_root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "clusters.forge.nodes.forge-platform.labels.plan" in done.stdout
    preview = done.stdout.split("cluster/forge:", 1)[1]
    assert "change(s)" in preview.splitlines()[0] and " 0 change(s)" not in preview.splitlines()[0]
    assert "NodePatch" in preview and "forge-platform" in preview, done.stdout
    # A preview changes no stack: forge's resources in its state are what they were.
    assert _stack_state(twin, "twin.cluster.forge") == before


def _stack_state(twin, stack: str) -> dict[str, object]:
    """Each resource of ``stack``'s checkpoint in the file backend (URN -> its outputs); empty
    for a stack never created or never updated (a preview may create an empty stack)."""
    import json

    found = sorted((twin.root.parent / "pulumi" / "backend").glob(f"**/stacks/**/{stack}.json"))
    if not found:
        return {}
    latest = json.loads(found[0].read_text())["checkpoint"].get("latest") or {}
    return {r["urn"]: r.get("outputs") for r in latest.get("resources") or []}

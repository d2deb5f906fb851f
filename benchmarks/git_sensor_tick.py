"""How long one tick of the Git sensor takes on a long history. Target: under 1 second.

Builds a synthetic repository with ``git fast-import`` (10,000 commits: the shipped
homelab.yaml, 200 source files, docs), lets the sensor record its head (the mirror is
cloned then, outside the measurement), adds 100 commits (inventory edits, a mesh program
change, code and docs), and times the code location's sensor evaluated by Dagster
(``evaluate_tick``) from the recorded cursor: the first tick fetches the 100 commits, the
repeats find them already in the mirror. Reports the first tick and the repeats' median.

    uv run python benchmarks/git_sensor_tick.py [--commits 10000] [--new 100] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FORGE_PLATFORM = "labels: {tier: platform}}\n      - {name: forge-training-primary"
START = 1_700_000_000


def _blob(path: str, text: str) -> bytes:
    data = text.encode()
    return f"M 100644 inline {path}\ndata {len(data)}\n".encode() + data + b"\n"


def _commit(mark: int, parent: str | None, files: list[bytes]) -> bytes:
    message = f"commit {mark}\n".encode()
    head = (
        f"commit refs/heads/main\nmark :{mark}\n"
        f"author Bench <bench@example.org> {START + mark} +0000\n"
        f"committer Bench <bench@example.org> {START + mark} +0000\n"
        f"data {len(message)}\n"
    ).encode()
    return head + message + (f"from {parent}\n".encode() if parent else b"") + b"".join(files)


def _history(count: int, inventory: str) -> Iterator[bytes]:
    """The old history: a tree, then one file changed per commit."""
    tree = [_blob("homelab.yaml", inventory), _blob("infra/cluster.py", "# cluster\n")]
    tree += [_blob("infra/mesh.py", "# mesh\n"), _blob("docs/operations.md", "# ops\n")]
    tree += [_blob(f"src/mod{i}.py", f"# {i}\n") for i in range(200)]
    yield _commit(1, None, tree)
    for mark in range(2, count + 1):
        yield _commit(mark, None, [_blob(f"src/mod{mark % 200}.py", f"# {mark}\n")])


def _new_commits(first: int, count: int, inventory: str) -> Iterator[bytes]:
    """The new commits: every 10th edits Forge's labels, one the mesh program, the rest code
    and docs."""
    for n, mark in enumerate(range(first, first + count)):
        if n % 10 == 0:
            label = FORGE_PLATFORM.replace("{tier: platform}", f"{{tier: platform-{n}}}")
            files = [_blob("homelab.yaml", inventory.replace(FORGE_PLATFORM, label))]
        elif n == 5:
            files = [_blob("infra/mesh.py", "# mesh, v2\n")]
        elif n % 2:
            files = [_blob(f"docs/note{n}.md", f"note {n}\n")]
        else:
            files = [_blob(f"src/mod{n % 200}.py", f"# new {n}\n")]
        yield _commit(mark, "refs/heads/main^0" if n == 0 else None, files)


def _fast_import(repo: Path, stream: Iterator[bytes]) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "fast-import", "--quiet"],
        input=b"".join(stream),
        check=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=10_000)
    parser.add_argument("--new", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    import dagster as dg

    from homelab_dagster.definitions import build_definitions
    from homelab_dagster.loader import load_inventory
    from homelab_dagster.settings import Settings, Target
    from resources.git import GitRepository
    from sensors.git import SENSOR_NAME, GitCursor

    inventory = (ROOT / "homelab.yaml").read_text()
    with tempfile.TemporaryDirectory() as tmp, dg.instance_for_test() as instance:
        origin = Path(tmp) / "origin.git"
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
        started = time.perf_counter()
        _fast_import(origin, _history(options.commits, inventory))
        built = time.perf_counter() - started
        settings = Settings(ROOT / "homelab.yaml", Target.TWIN, Path(tmp) / "state")
        defs = build_definitions(settings, load_inventory(settings.inventory_path).inventory)
        sensor = defs.resolve_sensor_def(SENSOR_NAME)
        git = GitRepository(url=str(origin), branch="main", state_dir=str(Path(tmp) / "git"))

        def tick(cursor: str | None) -> tuple[float, Any]:
            with dg.build_sensor_context(
                cursor=cursor, instance=instance, definitions=defs, resources={"git": git}
            ) as context:
                start = time.perf_counter()
                result = sensor.evaluate_tick(context)
                return time.perf_counter() - start, result

        cloned, first = tick(None)  # records the head; clones the mirror
        _fast_import(origin, _new_commits(options.commits + 1, options.new, inventory))
        cold, result = tick(first.cursor)
        (request,) = result.run_requests
        warm = [tick(first.cursor)[0] for _ in range(options.repeat)]
        count = request.tags["homelab/commits"]
        selected = ", ".join(sorted(k.to_user_string() for k in request.asset_selection))
        assert GitCursor.load(result.cursor) is not None
    median = statistics.median(warm)
    print(f"synthetic history: {options.commits} commits ({built:.2f}s with fast-import)")
    print(f"first tick (no cursor, mirror cloned): {cloned:.3f}s")
    print(f"tick over {count} new commits, fetching them: {cold:.3f}s")
    print(
        f"tick over {count} new commits, already fetched (median of {options.repeat}): "
        f"{median:.3f}s"
    )
    print(f"selected: {selected}")
    print(f"target < 1 s: {'met' if max(cold, median) < 1 else 'missed'}")
    return 0 if max(cold, median) < 1 else 1


if __name__ == "__main__":
    sys.exit(main())

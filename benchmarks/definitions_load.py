"""How much the code location costs to load, against Dagster's own floor.

Runs ``dagster definitions validate`` on the project, and on a synthetic definitions file with
the same number of assets and asset checks (plain assets, no inventory, no resources), in
alternation, and reports the median of each and their ratio. Target: at most 1.2.

    uv run python benchmarks/definitions_load.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _counts() -> tuple[int, int]:
    sys.path.insert(0, str(ROOT))
    from homelab_dagster.definitions import defs

    graph = defs.resolve_asset_graph()
    return len(graph.get_all_asset_keys()), len(graph.asset_check_keys)


def _synthetic(assets: int, checks: int) -> str:
    lines = ["import dagster as dg", ""]
    for i in range(assets):
        deps = f"deps=['a{i - 1}'], " if i else ""
        lines += [f"@dg.asset({deps}group_name='g')", f"def a{i}() -> None: ...", ""]
    for i in range(checks):
        lines += [
            f"@dg.asset_check(asset='a{i % assets}', name='c{i}')",
            f"def c{i}() -> dg.AssetCheckResult: return dg.AssetCheckResult(passed=True)",
            "",
        ]
    names = ", ".join(f"a{i}" for i in range(assets))
    check_names = ", ".join(f"c{i}" for i in range(checks))
    lines.append(f"defs = dg.Definitions(assets=[{names}], asset_checks=[{check_names}])")
    return "\n".join(lines) + "\n"


def _time(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    assets, checks = _counts()
    dagster = [sys.executable, "-m", "dagster", "definitions", "validate"]
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = Path(tmp) / "synthetic_defs.py"
        synthetic.write_text(_synthetic(assets, checks))
        floor, project = [], []
        _time([*dagster, "-f", str(synthetic)])  # warm the file system cache once
        for _ in range(options.repeat):
            floor.append(_time([*dagster, "-f", str(synthetic)]))
            project.append(_time([*dagster, "-w", "workspace.yaml"]))
    f, p = statistics.median(floor), statistics.median(project)
    print(f"assets={assets} checks={checks} repeat={options.repeat}")
    print(f"dagster floor (synthetic): median {f:.2f}s  runs {[round(x, 2) for x in floor]}")
    print(f"homelab code location:     median {p:.2f}s  runs {[round(x, 2) for x in project]}")
    print(f"ratio: {p / f:.2f} (target <= 1.20)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

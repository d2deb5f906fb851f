"""The twin's cost: time to bring all clusters up, and the memory they hold.

Measures, in one run, with a cached toolchain and a fresh state directory:
  - create: ``Twin.up()`` of every inventory cluster from nothing;
  - noop:   ``Twin.up()`` again while everything runs (the idempotent path);
  - start:  ``Twin.up()`` after ``down()`` (stopped clusters started again, data kept);
  - rss:    resident memory of every process of the twin, summed.
Targets (issue: the twin): all five up in under 60 s warm, under 3 GiB resident together.

    uv run python benchmarks/twin_up.py [--port-base 24443]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from homelab_dagster.loader import load_inventory  # noqa: E402
from homelab_dagster.twin import Twin  # noqa: E402
from infra.toolchain import ensure_toolchain  # noqa: E402


def _rss(workdir: Path) -> tuple[int, int]:
    """(processes, bytes) of every process whose command line names ``workdir``."""
    count = total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(workdir) in cmdline and proc.info["memory_info"]:
            count += 1
            total += proc.info["memory_info"].rss
    return count, total


def _timed(label: str, fn) -> float:
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    print(f"{label:<8} {elapsed:6.1f} s")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-base", type=int, default=24443)
    options = parser.parse_args()
    inventory = load_inventory(ROOT / "homelab.yaml").inventory
    toolchain = ensure_toolchain(build=False)
    with tempfile.TemporaryDirectory() as state:
        twin = Twin(inventory, Path(state), toolchain, api_port_base=options.port_base)
        try:
            create = _timed("create", twin.up)
            time.sleep(5)  # let the control planes settle before reading memory
            processes, rss = _rss(twin.workdir)
            noop = _timed("noop", twin.up)
            twin.down()
            start = _timed("start", twin.up)
        finally:
            twin.down(purge=True)
    clusters = len(inventory.clusters)
    print(
        f"clusters {clusters}, processes {processes}, rss {rss / 2**30:.2f} GiB "
        f"({rss / 2**20 / clusters:.0f} MiB per cluster)"
    )
    print(
        f"targets: create {create:.1f} s and start {start:.1f} s vs 60 s; "
        f"rss {rss / 2**30:.2f} GiB vs 3 GiB; noop {noop:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

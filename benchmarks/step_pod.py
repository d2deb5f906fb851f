"""What running steps as pods costs, against running them as local processes, on the twin.

Studio and Forge are started with their real nodes (in a temporary state directory), the
project's image is built from the lock file and pushed to the twin's registry (cached by
content), and ``homelab up --env studio`` deploys the orchestrator (its service account and
RBAC are what step pods run with). Then, alternating, in the same run, ``homelab up --env
forge`` (no-op stack steps: ``cluster/forge`` and the ``studio__forge`` link, nothing to
change) in a fresh process each time:

- **local**: ``HOMELAB_RUNS=local``, each step a process forked from the executor's server;
- **pods**: ``HOMELAB_RUNS=kubernetes``, each step a Kubernetes Job of the project's image on
  Studio's real node (dagster-k8s's ``k8s_job_executor``), as on the homelab.

Reports the medians, the seconds a run pays for its steps being pods, and the ratio.

    uv run python benchmarks/step_pod.py [--repeat 3] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _report import save  # noqa: E402 (benchmarks/, the script's own folder)


def _homelab(env: dict[str, str], *args: str) -> float:
    """Run ``homelab *args`` in a fresh process; its wall time (it must succeed)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "homelab_dagster", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"homelab {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the twin and its state")
    parser.add_argument("--port-base", type=int, default=23443)
    args = parser.parse_args()

    from homelab_dagster.loader import load_inventory
    from homelab_dagster.twin import Twin
    from infra.images import ImageBuilder, missing_tools
    from infra.toolchain import ensure_toolchain

    missing = missing_tools()
    if missing:
        raise SystemExit(f"cannot build the project's image: {missing}")
    # Short: a real node's containerd socket lives below it (a unix socket path is short).
    state = Path(tempfile.mkdtemp(prefix="hl-bench-pods-"))
    inventory_path = ROOT / "homelab.yaml"
    inventory = load_inventory(inventory_path).inventory
    twin = Twin(
        inventory, state / "state", ensure_toolchain(build=False), api_port_base=args.port_base
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOMELAB_", "DAGSTER_"))}
    env |= {
        "HOMELAB_STATE_DIR": str(state / "state"),
        "HOMELAB_TWIN_PORT_BASE": str(args.port_base),
        "HOMELAB_INVENTORY": str(inventory_path),
        "DAGSTER_HOME": str(state / "dagster"),
        "HOMELAB_RUNS": "local",
        "HOMELAB_AUTOMATION": "off",
    }
    try:
        print("twin: starting studio and forge with their real nodes", flush=True)
        twin.up(["studio", "forge"])
        if twin.real_fallback:
            raise SystemExit(f"no real nodes here: {twin.real_fallback}")
        print("image: building and pushing the project's image (cached by content)", flush=True)
        ImageBuilder().build_and_push(["homelab-dagster"], twin.registry)
        print("orchestrator: homelab up --env studio", flush=True)
        _homelab(env, "up", "--env", "studio")
        print("first up --env forge (creates its stacks' resources)", flush=True)
        _homelab(env, "up", "--env", "forge")
        times: dict[str, list[float]] = {"local": [], "pods": []}
        for i in range(args.repeat):
            for mode, runs in (("local", "local"), ("pods", "kubernetes")):
                seconds = _homelab(env | {"HOMELAB_RUNS": runs}, "up", "--env", "forge")
                times[mode].append(seconds)
                print(f"round {i + 1}/{args.repeat}: {mode} {seconds:.1f} s", flush=True)
        median = {k: round(statistics.median(v), 2) for k, v in times.items()}
        report = {
            "machine": f"{os.cpu_count()} cores",
            "rounds": args.repeat,
            "what": "homelab up --env forge, nothing to change (cluster/forge and the "
            "studio__forge link), in a fresh process",
            "seconds": times,
            "median_s": median,
            "pods_overhead_s": round(median["pods"] - median["local"], 2),
            "pods_vs_local": round(median["pods"] / median["local"], 2),
        }
        save("step_pod", report)
    finally:
        if not args.keep:
            twin.down(purge=True)
            shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A reconcile where nothing drifted, against ``pulumi refresh --preview-only`` from the shell.

On a twin of the shipped inventory without its mesh links (in a temporary state directory;
the links' program needs the far cluster's services, which the shell project does not build),
the five cluster stacks are brought up once; then, alternating, in the same run:

- **graph**: the ``reconcile`` job (every cluster's checks, ``no_drift`` among them, and the
  trained model's ``weights_intact``), through Dagster's multiprocess executor, in a fresh
  process each time (as a run worker starts one);
- **watch**: a tick of the ``drift_watch`` sensor, evaluated in this process as the code
  server (a long-lived process) evaluates it for the daemon: every stack's Kubernetes objects
  read and compared with the fingerprints the materialisation recorded; it must find nothing
  to refresh (a changed object would make it request the reconcile run of that stack). The
  first tick (the API discovery of each cluster, cached after) is reported apart;
- **shell**: ``pulumi refresh --preview-only --stack twin.cluster.<c>`` for the five stacks
  one after another, the same program and backend (the project and language host stand-in of
  ``benchmarks/pulumi_noop.py``).

The graph does more (it also reads every node and namespace for the other checks). Reports the
medians and the ratios against the shell (target: at least 2x faster). Between two scheduled
reconciles the watch is what looks for drift; a run of the reconcile job is what it costs
when something changed, and what the schedule still runs in full.

    uv run python benchmarks/reconcile.py [--repeat 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import pulumi_noop  # noqa: E402 (the shell project and environment, shared)
from _report import save  # noqa: E402

CLUSTERS = pulumi_noop.CLUSTERS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the twin and its state")
    parser.add_argument("--port-base", type=int, default=24443)
    parser.add_argument("--run-graph", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_graph:  # the child of _timed_graph: the environment is set already
        print(json.dumps(_reconcile()))
        return 0

    state = Path(tempfile.mkdtemp(prefix="homelab-bench-reconcile-"))
    inventory_path = state / "homelab.yaml"
    _without_links(ROOT / "homelab.yaml", inventory_path)
    os.environ |= {
        "HOMELAB_STATE_DIR": str(state),
        "HOMELAB_TARGET": "twin",
        "HOMELAB_INVENTORY": str(inventory_path),
        "DAGSTER_HOME": str(state / "dagster"),
    }
    os.environ.pop("PULUMI_CONFIG_PASSPHRASE", None)
    (state / "dagster").mkdir()
    (state / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")

    from homelab_dagster.loader import load_inventory
    from homelab_dagster.twin import Twin
    from infra.toolchain import ensure_toolchain

    inventory = load_inventory(inventory_path).inventory
    twin = Twin(inventory, state, ensure_toolchain(build=False), api_port_base=args.port_base)
    try:
        for cluster in CLUSTERS:
            print(f"twin: starting {cluster}", flush=True)
            twin.up([cluster])
        print("first materialisation (creates every stack's resources)", flush=True)
        pulumi_noop._graph()
        shell = pulumi_noop._shell_project(state, inventory_path=inventory_path, twin=twin)
        pulumi_env = pulumi_noop._pulumi_env()
        env = {
            **os.environ,
            **pulumi_env,
            "PATH": f"{shell / 'bin'}{os.pathsep}{pulumi_env['PATH']}",
        }
        watch = _Watch()
        first_tick = watch.timed_tick()
        times: dict[str, list[float]] = {"graph": [], "watch": [], "shell_refresh_preview_only": []}
        for i in range(args.repeat):
            print(f"round {i + 1}/{args.repeat}", flush=True)
            times["graph"].append(_timed_graph())
            times["watch"].append(watch.timed_tick())
            times["shell_refresh_preview_only"].append(
                pulumi_noop._shell(shell, env, "refresh --preview-only")
            )
        median = {k: round(statistics.median(v), 3) for k, v in times.items()}
        shell_s = median["shell_refresh_preview_only"]
        report = {
            "machine": f"{os.cpu_count()} cores",
            "rounds": args.repeat,
            "seconds": times,
            "median_s": median,
            "watch_first_tick_s": round(first_tick, 3),
            "watch_speedup_vs_shell": round(shell_s / median["watch"], 1),
            "graph_speedup_vs_shell": round(shell_s / median["graph"], 2),
            "target": ">= 2",
        }
        save("reconcile", report)
    finally:
        if not args.keep:
            twin.down(purge=True)
            shutil.rmtree(state, ignore_errors=True)
    return 0


def _without_links(source: Path, target: Path) -> None:
    from ruamel.yaml import YAML

    yaml = YAML()
    data = yaml.load(source.read_text())
    data["mesh"]["links"] = []
    with target.open("w") as f:
        yaml.dump(data, f)


def _reconcile() -> dict[str, object]:
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(
            dg.build_reconstructable_job("homelab_dagster.definitions", "job", ("reconcile",)),
            instance=instance,
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
        drift = [
            e.event_specific_data
            for e in result.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
            and e.event_specific_data.check_name == "no_drift"
        ]
    return {
        "success": result.success,
        "drift_checks": len(drift),
        "drifted": [d.asset_key.to_user_string() for d in drift if not d.passed],
    }


class _Watch:
    """The code location as the code server holds it, and ticks of its drift watch."""

    def __init__(self) -> None:
        import dagster as dg

        from homelab_dagster.definitions import build_definitions
        from homelab_dagster.loader import inventory_or_none
        from homelab_dagster.settings import Settings
        from sensors.reconcile import WATCH_SENSOR

        settings = Settings.from_env()
        self.defs = build_definitions(settings, inventory_or_none(settings.inventory_path))
        self.sensor = self.defs.resolve_sensor_def(WATCH_SENSOR)
        self.kubernetes = self.defs.resources["kubernetes"] if self.defs.resources else None
        self.instance = dg.DagsterInstance.get()

    def timed_tick(self) -> float:
        import dagster as dg

        start = time.perf_counter()
        with dg.build_sensor_context(
            instance=self.instance,
            definitions=self.defs,
            resources={"kubernetes": self.kubernetes},
        ) as context:
            tick = self.sensor.evaluate_tick(context)
        seconds = time.perf_counter() - start
        watched = f"{len(CLUSTERS)} stack(s) watched"
        if tick.run_requests or watched not in (tick.skip_message or ""):
            raise SystemExit(f"the drift watch did not find every stack unchanged: {tick}")
        return seconds


def _timed_graph() -> float:
    """One reconcile run in a fresh process."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--run-graph"], check=True, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    outcome = json.loads(out.stdout.strip().splitlines()[-1])
    if not outcome["success"] or outcome["drifted"] or outcome["drift_checks"] != len(CLUSTERS):
        raise SystemExit(f"the reconcile did not find the clusters unchanged: {outcome}")
    return seconds


if __name__ == "__main__":
    sys.exit(main())

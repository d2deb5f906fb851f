"""A no-op materialisation of the five clusters, against ``pulumi`` from the shell.

On a twin of the shipped inventory (in a temporary state directory), the five cluster stacks
are brought up once; then, alternating, in the same run:

- **graph**: the ``up`` job materialising the five ``cluster/*`` assets (nothing changed),
  through Dagster's multiprocess executor, as ``homelab up`` runs it (checks included), in a
  fresh process each time; by default each stack refreshes first (drift repair), and
  **graph_no_refresh** runs with ``refresh: false`` (what ``pulumi up`` does);
- **shell up**: ``pulumi up --yes --stack twin.cluster.<c>`` for the five stacks one after
  another, from a shell, as the owner's ``make up`` did, and **shell up --refresh**, the same
  with the refresh the graph does by default (like for like: the same work on both sides);
- **shell preview**: ``pulumi preview --stack twin.cluster.<c>``, the same way.

The shell runs a plain Pulumi project (``Pulumi.yaml`` + ``__main__.py``) with the same
program, on the same stacks and backend. Pulumi's Python language host
(``pulumi-language-python``) is not served by the Go module proxy, so a stand-in is put on
PATH: it serves the project's program with the Python SDK's own language server (as the
Automation API does for inline programs). Reports the medians and the ratios (targets:
graph at least 1.8x faster than shell up --refresh, with Dagster's public executor configuration
alone; graph under 1.1x shell preview). Each graph is compared
with the shell doing the same work (refresh or not), and the default graph also with plain
``pulumi up``.

    uv run python benchmarks/pulumi_noop.py [--repeat 3] [--keep]
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

from _report import save  # noqa: E402 (benchmarks/, the script's own folder)

CLUSTERS = ("air", "pro", "studio", "pi", "forge")

LANGUAGE_HOST = """#!{python}
# Stand-in for pulumi-language-python (benchmarks/pulumi_noop.py): serves ./__main__.py
# with the Python SDK's language server.
import runpy, signal, sys
from concurrent import futures
import grpc
from pulumi.automation._server import LanguageServer
from pulumi.runtime.proto import language_pb2_grpc

def program():
    runpy.run_path({main!r}, run_name="__main__")

# Pulumi stops its plugins with SIGINT; a shell's background job starts with SIGINT ignored,
# which would leave the CLI waiting 5 s for this host to exit.
signal.signal(signal.SIGINT, signal.default_int_handler)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
language_pb2_grpc.add_LanguageRuntimeServicer_to_server(LanguageServer(program), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"""

PROGRAM = """import pulumi
from homelab_dagster.loader import load_inventory
from infra.cluster import cluster_program

name = pulumi.get_stack().rsplit(".", 1)[-1]
inventory = load_inventory({inventory!r}).inventory
cluster_program(name, inventory.clusters[name], inventory.components,
                cluster_identifier=f"twin.{{name}}", install_charts=False,
                kubeconfig={kubeconfig!r}, context=f"twin-{{name}}")()
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the twin and its state")
    parser.add_argument("--port-base", type=int, default=23443)
    parser.add_argument("--run-graph", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-refresh", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_graph:  # the child of _timed_graph: the environment is set already
        print(json.dumps(_graph(refresh=not args.no_refresh)))
        return 0

    state = Path(tempfile.mkdtemp(prefix="homelab-bench-"))
    os.environ |= {
        "HOMELAB_STATE_DIR": str(state),
        "HOMELAB_TARGET": "twin",
        "DAGSTER_HOME": str(state / "dagster"),
    }
    os.environ.pop("PULUMI_CONFIG_PASSPHRASE", None)
    (state / "dagster").mkdir()
    (state / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")

    from homelab_dagster.loader import load_inventory
    from homelab_dagster.twin import Twin
    from infra.toolchain import ensure_toolchain

    inventory = load_inventory(ROOT / "homelab.yaml").inventory
    toolchain = ensure_toolchain(build=False)
    twin = Twin(inventory, state, toolchain, api_port_base=args.port_base)
    try:
        for cluster in CLUSTERS:  # one at a time: each takes its own ports
            print(f"twin: starting {cluster}", flush=True)
            twin.up([cluster])
        print("first materialisation (creates every stack's resources)", flush=True)
        first = _graph()
        shell = _shell_project(state, inventory_path=ROOT / "homelab.yaml", twin=twin)
        env = {
            **os.environ,
            **_pulumi_env(),
            "PATH": f"{shell / 'bin'}{os.pathsep}{_pulumi_env()['PATH']}",
        }
        times: dict[str, list[float]] = {
            "graph": [],
            "graph_no_refresh": [],
            "shell_up": [],
            "shell_up_refresh": [],
            "shell_preview": [],
        }
        stack_seconds: list[float] = []
        for i in range(args.repeat):
            print(f"round {i + 1}/{args.repeat}", flush=True)
            seconds, per_stack = _timed_graph()
            times["graph"].append(seconds)
            stack_seconds.append(sum(per_stack))
            times["graph_no_refresh"].append(_timed_graph(refresh=False)[0])
            times["shell_up"].append(_shell(shell, env, "up --yes"))
            times["shell_up_refresh"].append(_shell(shell, env, "up --yes --refresh"))
            times["shell_preview"].append(_shell(shell, env, "preview"))
        report = _report(times, stack_seconds, first)
        save("pulumi_noop", report)
    finally:
        if not args.keep:
            twin.down(purge=True)
            shutil.rmtree(state, ignore_errors=True)
    return 0


def _graph(refresh: bool = True) -> tuple[bool, list[float]]:
    import dagster as dg

    from assets import cluster_key

    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(
            dg.build_reconstructable_job("homelab_dagster.definitions", "job", ("up",)),
            instance=instance,
            asset_selection=[cluster_key(c) for c in CLUSTERS],
            run_config={
                "loggers": {"console": {"config": {"log_level": "WARNING"}}},
                "ops": {f"cluster__{c}": {"config": {"refresh": refresh}} for c in CLUSTERS},
            },
        )
        if not result.success:
            raise SystemExit(f"the up job failed (run {result.run_id})")
        durations = [
            e.event_specific_data.materialization.metadata["pulumi_duration_s"].value
            for e in result.all_events
            if e.event_type_value == "ASSET_MATERIALIZATION"
        ]
        changed = [
            e.event_specific_data.materialization.metadata["pulumi_changed"].value
            for e in result.all_events
            if e.event_type_value == "ASSET_MATERIALIZATION"
        ]
    return any(changed), durations


def _timed_graph(refresh: bool = True) -> tuple[float, list[float]]:
    """One graph run in a fresh process, as ``homelab up`` (or a run worker) starts one."""
    flags = ["--run-graph"] + ([] if refresh else ["--no-refresh"])
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, *flags], check=True, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    changed, durations = json.loads(out.stdout.strip().splitlines()[-1])
    if changed:
        raise SystemExit("a no-op materialisation changed something")
    return seconds, durations


def _pulumi_env() -> dict[str, str]:
    from homelab_dagster.settings import Settings
    from resources.deployment import build_deployment

    pulumi = build_deployment(Settings.from_env(), None).resources["pulumi"]
    env = pulumi.env()
    pulumi._check_passphrase()
    return env


def _shell_project(state: Path, inventory_path: Path, twin) -> Path:
    """A plain Pulumi project with the clusters' program, and the language host stand-in."""
    project = state / "shell-project"
    (project / "bin").mkdir(parents=True)
    (project / "Pulumi.yaml").write_text("name: homelab\nruntime: python\n")
    main = project / "__main__.py"
    main.write_text(PROGRAM.format(inventory=str(inventory_path), kubeconfig=str(twin.kubeconfig)))
    host = project / "bin" / "pulumi-language-python"
    host.write_text(LANGUAGE_HOST.format(python=sys.executable, main=str(main)))
    host.chmod(0o755)
    for cluster in CLUSTERS:  # each stack's settings (its passphrase salt) from its work dir
        stack = f"twin.cluster.{cluster}"
        settings = state / "pulumi" / "work" / stack / f"Pulumi.{stack}.yaml"
        if settings.exists():
            shutil.copy(settings, project / settings.name)
    return project


def _shell(project: Path, env: dict[str, str], command: str) -> float:
    loop = "; ".join(
        f"pulumi {command} --stack twin.cluster.{c} --non-interactive >/dev/null" for c in CLUSTERS
    )
    start = time.perf_counter()
    subprocess.run(
        ["bash", "-c", f"set -e; {loop}"],
        cwd=project,
        env={**env, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    return time.perf_counter() - start


def _report(
    times: dict[str, list[float]], stack_seconds: list[float], first: tuple[bool, list[float]]
) -> dict[str, object]:
    median = {k: round(statistics.median(v), 2) for k, v in times.items()}
    return {
        "machine": f"{os.cpu_count()} cores",
        "rounds": len(times["graph"]),
        "seconds": times,
        "median_s": median,
        "graph_speedup_vs_shell_up_refresh (like for like)": round(
            median["shell_up_refresh"] / median["graph"], 2
        ),
        "graph_speedup_vs_shell_up": round(median["shell_up"] / median["graph"], 2),
        "graph_vs_shell_preview": round(median["graph"] / median["shell_preview"], 2),
        "graph_no_refresh_speedup_vs_shell_up (like for like)": round(
            median["shell_up"] / median["graph_no_refresh"], 2
        ),
        "graph_no_refresh_vs_shell_preview": round(
            median["graph_no_refresh"] / median["shell_preview"], 2
        ),
        "sum_of_stack_noop_up_s (inside the graph, median)": round(
            statistics.median(stack_seconds), 2
        ),
        "first_materialisation_stack_s": [round(s, 2) for s in first[1]],
        "targets": {"graph_speedup_vs_shell_up": ">= 2", "graph_vs_shell_preview": "< 1.1"},
    }


if __name__ == "__main__":
    sys.exit(main())

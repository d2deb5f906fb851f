"""Time from a change behind Pulumi's back to its repair, with Dagster's daemon doing it all.

On a twin of Forge alone (the shipped inventory less its links, training runs and endpoints,
in a temporary state directory), ``cluster/forge`` is materialised once; then ``homelab dev``
(the webserver, the daemon and the code server, as ``make dev`` starts them) runs with the
drift watch at its shortest (``HOMELAB_DRIFT_WATCH_S=5``). Each round changes one of the labels
the inventory gives ``forge-inference``, through the API server as kubectl would, and waits
until the label is the inventory's again. Nobody asks: the drift watch sees the node changed
and requests the reconcile run of Forge's checks, whose ``no_drift`` names the label;
``reconcile_repair`` reads that run and requests the repair, which puts the label back.

Reports, per round, the seconds from the change to: the reconcile run's creation, its end,
the repair run's creation, and the label back; and their medians. The owner's goal is under
5 minutes; ours is under 1 minute on the twin.

    uv run python benchmarks/drift_repair.py [--repeat 3] [--keep]
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from _dev import homelab_dev  # noqa: E402
from _report import save  # noqa: E402

NODE = "forge-inference"
LABEL = "role"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the twin and its state")
    parser.add_argument("--port-base", type=int, default=25443)
    parser.add_argument("--timeout", type=float, default=600.0, help="per round, seconds")
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="homelab-bench-drift-"))
    inventory_path = state / "homelab.yaml"
    _forge_only(ROOT / "homelab.yaml", inventory_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOMELAB_", "DAGSTER_"))}
    env.pop("PULUMI_CONFIG_PASSPHRASE", None)
    env |= {
        "HOMELAB_STATE_DIR": str(state),
        "HOMELAB_TARGET": "twin",
        "HOMELAB_INVENTORY": str(inventory_path),
        "HOMELAB_TWIN_PORT_BASE": str(args.port_base),
        "DAGSTER_HOME": str(state / "dagster"),
        "HOMELAB_DRIFT_WATCH_S": "5",
        "HOMELAB_RECONCILE_CRON": "0 0 1 1 *",  # the schedule out of the way: the watch acts
    }
    os.environ.clear()
    os.environ.update(env)

    from kubernetes import client

    from homelab_dagster.loader import load_inventory
    from homelab_dagster.twin import Twin
    from infra.toolchain import ensure_toolchain

    inventory = load_inventory(inventory_path).inventory
    wanted = inventory.clusters["forge"].expanded_nodes()
    label = next(n.labels[LABEL] for n in wanted if n.name == NODE)
    twin = Twin(inventory, state, ensure_toolchain(build=False), api_port_base=args.port_base)
    try:
        homelab = str(Path(sys.executable).with_name("homelab"))
        print("homelab up --env forge (the twin's forge, cluster/forge materialised)", flush=True)
        subprocess.run([homelab, "up", "--env", "forge"], check=True, env=env, cwd=ROOT)
        core = client.CoreV1Api(twin.client("forge"))
        with homelab_dev(env, state / "dev.log"):
            rounds = _rounds(core, label, args.repeat, args.timeout)
        medians = {k: round(statistics.median(r[k] for r in rounds), 1) for k in rounds[0]}
        report = {
            "machine": f"{os.cpu_count()} cores",
            "rounds": rounds,
            "median_s": medians,
            "drift_watch_s": 5,
            "target_s": 60,
            "owners_goal_s": 300,
        }
        save("drift_repair", report)
    finally:
        if not args.keep:
            twin.down(purge=True)
            shutil.rmtree(state, ignore_errors=True)
    return 0


def _rounds(core, label: str, repeat: int, timeout: float) -> list[dict[str, float]]:
    """Change the label ``repeat`` times; each time, wait until it is ``label`` again."""
    import dagster as dg

    instance = dg.DagsterInstance.get()
    rounds = []
    for i in range(repeat):
        time.sleep(10)  # the watch has looked at least once since the last repair
        print(f"round {i + 1}/{repeat}: {NODE} {LABEL}=tampered-{i}", flush=True)
        start = time.time()
        core.patch_node(NODE, {"metadata": {"labels": {LABEL: f"tampered-{i}"}}})
        while core.read_node(NODE).metadata.labels.get(LABEL) != label:
            if time.time() - start > timeout:
                raise SystemExit(f"not repaired within {timeout} s (see dev.log)")
            time.sleep(0.5)
        rounds.append(_phases(instance, start, time.time()))
        print(f"  {rounds[-1]}", flush=True)
    return rounds


def _phases(instance, start: float, repaired: float) -> dict[str, float]:
    """Seconds from ``start`` to each step of the repair, from the instance's runs."""
    import dagster as dg

    def first(kind: str) -> dg.RunRecord:
        records = instance.get_run_records(
            filters=dg.RunsFilter(tags={"homelab/reconcile": kind}, created_after=_utc(start - 1)),
            order_by="create_timestamp",
            ascending=True,
        )
        if not records:
            raise SystemExit(f"no {kind} run was made: the label came back some other way")
        return records[0]

    check, repair = first("check"), first("repair")
    if "homelab/drift-watch" not in check.dagster_run.tags:
        raise SystemExit(f"run {check.dagster_run.run_id} was not the drift watch's")
    return {
        "reconcile_run_created": round(check.create_timestamp.timestamp() - start, 1),
        "reconcile_run_ended": round((check.end_time or repaired) - start, 1),
        "repair_run_created": round(repair.create_timestamp.timestamp() - start, 1),
        "label_back": round(repaired - start, 1),
    }


def _utc(seconds: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, tz=UTC)


def _forge_only(source: Path, target: Path) -> None:
    """The inventory less its links, training runs and endpoints: Forge's own stack is what
    the daemon watches and repairs here."""
    from ruamel.yaml import YAML

    yaml = YAML()
    data = yaml.load(source.read_text())
    data["mesh"]["links"] = []
    for section in ("training_runs", "endpoints"):
        if section in data:
            data[section] = {}
    with target.open("w") as f:
        yaml.dump(data, f)


if __name__ == "__main__":
    sys.exit(main())

"""How long the Dagster UI's asset graph takes to show, for the shipped inventory and for a
synthetic inventory of 100 clusters, in the same run.

For each inventory, ``homelab dev`` serves it (a temporary ``DAGSTER_HOME`` and state
directory, automation off: nothing else runs), and headless Chromium (Debian's, driven by
Selenium through Debian's chromedriver, as ``tests/test_ui.py`` does) opens the global asset
graph with every group expanded, once to warm up and then ``--repeat`` times; a load ends when
the graph is drawn: every group listed, the assets counted ("Materialize all (N)") and cluster
nodes on screen (the graph draws only the nodes in view). The synthetic inventory
is the shipped one plus 95 copies of ``pi`` (their own names, hosts and CIDRs), so every
other family stays the same size. Reports the medians and the ratio (100 clusters against the
shipped five).

    uv run python benchmarks/ui_load.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _dev import homelab_dev  # noqa: E402 (benchmarks/, the script's own folder)
from _report import save  # noqa: E402

SYNTHETIC_CLUSTERS = 100
_MATERIALIZE_ALL = re.compile(r"Materialize all \(\d+\)")


def synthetic_inventory(source: Path, target: Path, clusters: int) -> list[str]:
    """``source`` plus copies of its ``pi`` cluster up to ``clusters`` clusters; their names."""
    from ruamel.yaml import YAML

    yaml = YAML()
    data = yaml.load(source.read_text())
    pi = data["clusters"]["pi"]
    added = []
    for i in range(clusters - len(data["clusters"])):
        name = f"edge-{i:03d}"
        copied = copy.deepcopy(pi)
        copied["host"] = name
        copied["network"]["pod_cidr"] = f"10.{120 + i}.0.0/17"
        copied["network"]["service_cidr"] = f"10.{120 + i}.128.0/20"
        for node in copied["nodes"]:
            node["name"] = node["name"].replace("pi-", f"{name}-", 1)
        data["clusters"][name] = copied
        added.append(name)
    with target.open("w") as f:
        yaml.dump(data, f)
    return added


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1600,1500")
    return webdriver.Chrome(
        service=Service(executable_path="/usr/bin/chromedriver"), options=options
    )


def _groups(inventory: Path, state: Path) -> list[str]:
    import dagster as dg

    from homelab_dagster.definitions import build_definitions
    from homelab_dagster.loader import load_inventory
    from homelab_dagster.settings import Settings

    settings = Settings.from_env({"HOMELAB_STATE_DIR": str(state), "HOMELAB_INVENTORY": ""})
    with dg.DagsterInstance.ephemeral():
        graph = build_definitions(
            settings, load_inventory(inventory).inventory
        ).resolve_asset_graph()
    return sorted({graph.get(k).group_name for k in graph.get_all_asset_keys()})


def _loads(inventory: Path, clusters: set[str], repeat: int, browser) -> list[float]:
    """Serve ``inventory`` with ``homelab dev``; time ``repeat`` loads of the graph (after one
    to warm up) until it is drawn (some of ``clusters`` among its nodes)."""
    tmp = Path(tempfile.mkdtemp(prefix="homelab-bench-ui-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOMELAB_", "DAGSTER_"))}
    env |= {
        "DAGSTER_HOME": str(tmp / "dagster-home"),
        "HOMELAB_STATE_DIR": str(tmp / "state"),
        "HOMELAB_INVENTORY": str(inventory),
        "HOMELAB_AUTOMATION": "off",
    }
    groups = _groups(inventory, tmp / "graph-state")
    try:
        return _timed_loads(inventory, clusters, repeat, browser, env, groups, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _timed_loads(inventory, clusters, repeat, browser, env, groups, tmp) -> list[float]:
    """The loads of :func:`_loads`, with `homelab dev` serving from ``tmp``."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with homelab_dev(env, tmp / "dev.log") as url:
        expanded = ",".join(f"global@global:{g}" for g in groups)

        def drawn(page: str) -> bool:
            """Every group listed, the graph's assets counted, and cluster nodes drawn (the
            graph draws only the nodes in view: some of them)."""
            lines = set(page.splitlines())
            return (
                all(g in lines for g in groups)
                and "homelab_inventory" in lines
                and _MATERIALIZE_ALL.search(page) is not None
                and bool(lines & clusters)
            )

        seconds = []
        for i in range(repeat + 1):
            browser.get("about:blank")
            start = time.perf_counter()
            browser.get(f"{url}/asset-groups?expanded={expanded}")
            try:
                WebDriverWait(browser, 300, poll_frequency=0.1).until(
                    lambda d: drawn(d.find_element(By.TAG_NAME, "body").text)
                )
            except TimeoutException:
                page = browser.find_element(By.TAG_NAME, "body").text
                raise SystemExit(
                    f"{inventory.name}: the graph was not drawn within 300 s; the page "
                    f"shows:\n{page[:2000]}"
                ) from None
            if i:  # the first load warms the code location and the browser's cache
                seconds.append(time.perf_counter() - start)
            print(f"  {inventory.name}: load {i}: {time.perf_counter() - start:.2f} s", flush=True)
        return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="homelab-bench-ui-inv-") as tmp:
        big = Path(tmp) / "homelab-100.yaml"
        added = synthetic_inventory(ROOT / "homelab.yaml", big, SYNTHETIC_CLUSTERS)
        shipped = {"air", "pro", "studio", "pi", "forge"}
        browser = _browser()
        try:
            times = {
                "shipped_5_clusters": _loads(ROOT / "homelab.yaml", shipped, args.repeat, browser),
                f"synthetic_{SYNTHETIC_CLUSTERS}_clusters": _loads(
                    big, shipped | set(added), args.repeat, browser
                ),
            }
        finally:
            browser.quit()
    median = {k: round(statistics.median(v), 2) for k, v in times.items()}
    names = list(median)
    report = {
        "machine": f"{os.cpu_count()} cores",
        "rounds": args.repeat,
        "what": "the global asset graph, every group expanded, until it is drawn (groups "
        "listed, assets counted, cluster nodes in view)",
        "seconds": times,
        "median_s": median,
        "ratio_100_vs_shipped": round(median[names[1]] / median[names[0]], 2),
    }
    save("ui_load", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

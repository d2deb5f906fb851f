"""The Dagster UI of `make dev` in a real browser: headless Chromium from Debian, driven by
Selenium through Debian's chromedriver (fixture ``chrome`` in conftest.py).

One `homelab dev` serves the module, on a free port, with a temporary ``DAGSTER_HOME``,
state dir and copy of the inventory. The tests run in file order: the last one breaks the
inventory copy. Screenshots go to a temporary folder, or to ``$HOMELAB_UI_SCREENSHOTS``:
``make screenshots`` points it at ``docs/images`` (embedded by docs/ui.md).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest
from conftest import HomelabDev, free_port
from ruamel.yaml import YAML
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.slow


class UI:
    """The browser on the webserver: open a page, wait for text, click, take a screenshot."""

    def __init__(self, driver, dev: HomelabDev, shots: Path, inventory: Path) -> None:
        self.driver, self.dev, self.shots, self.inventory = driver, dev, shots, inventory
        self.failures = inventory.parent  # a failure's screenshot: next to the run's files

    def open(self, path: str) -> None:
        self.driver.get(self.dev.url + path)

    def text(self) -> str:
        return self.driver.find_element(By.TAG_NAME, "body").text

    def wait(self, until: Callable[[str], bool], what: str, timeout: float = 300) -> str:
        """Until ``until(page text)``; fails with ``what`` and the page's text."""
        try:
            WebDriverWait(self.driver, timeout, poll_frequency=0.5).until(
                lambda _: until(self.text())
            )
        except TimeoutException as exc:
            self.driver.save_screenshot(str(self.failures / "failure.png"))
            pytest.fail(f"{what} within {timeout}s; the page shows:\n{self.text()[:3000]}\n{exc}")
        return self.text()

    def wait_for(self, *texts: str, timeout: float = 300) -> str:
        return self.wait(lambda page: all(t in page for t in texts), f"no {texts}", timeout)

    def click(self, label: str) -> None:
        """Click the button whose text is ``label`` once it is there (and still there: the
        page re-renders while it loads)."""

        def clicked(_: str) -> bool:
            try:
                self._buttons(label)[0].click()
            except (IndexError, WebDriverException):
                return False
            return True

        self.wait(clicked, f"no button {label!r} to click")

    def _buttons(self, label: str) -> list:
        buttons = self.driver.find_elements(By.TAG_NAME, "button")
        return [b for b in buttons if b.text.strip() == label and b.is_enabled()]

    def shot(self, name: str) -> None:
        self.driver.save_screenshot(str(self.shots / name))

    def runs(self) -> int:
        """How many runs the instance has (asked of the webserver's GraphQL API)."""
        query = "{ runsOrError { ... on Runs { results { runId } } } }"
        request = urllib.request.Request(
            f"{self.dev.url}/graphql",
            data=json.dumps({"query": query}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return len(json.load(response)["data"]["runsOrError"]["results"])


@pytest.fixture(scope="module")
def ui(chrome, tmp_path_factory, project_root):
    tmp = tmp_path_factory.mktemp("ui")
    shots = Path(os.environ.get("HOMELAB_UI_SCREENSHOTS") or tmp / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    inventory = tmp / "homelab.yaml"
    shutil.copy(project_root / "homelab.yaml", inventory)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOMELAB_", "DAGSTER_"))}
    env |= {
        "DAGSTER_HOME": str(tmp / "dagster-home"),
        "HOMELAB_STATE_DIR": str(tmp / "state"),
        "HOMELAB_INVENTORY": str(inventory),
        # No schedule or sensor launches runs of its own (a reconcile of a twin that was
        # never provisioned fails): the runs on the page are the tests' own.
        "HOMELAB_AUTOMATION": "off",
    }
    dev = HomelabDev(env, tmp / "dev.log", free_port())
    try:
        dev.wait_ready()
        yield UI(chrome, dev, shots, inventory)
    finally:
        dev.stop(timeout=60)  # after runs, under load; tests/test_dev.py times the stop


@pytest.fixture(scope="module")
def graph(shipped_inventory, tmp_path_factory):
    """The code location's asset graph for the shipped inventory (what the UI must show)."""
    from homelab_dagster.definitions import build_definitions
    from homelab_dagster.settings import Settings

    state = tmp_path_factory.mktemp("graph-state")
    settings = Settings.from_env({"HOMELAB_STATE_DIR": str(state)})
    # A live instance in context (tests/conftest.py, _live_dagster_instance_in_context: a
    # module fixture is set up outside that function-scoped one).
    with dg.DagsterInstance.ephemeral():
        return build_definitions(settings, shipped_inventory).resolve_asset_graph()


def test_graph_shows_every_group_and_family(ui, graph):
    groups = {graph.get(key).group_name for key in graph.get_all_asset_keys()}
    keys = graph.get_all_asset_keys()
    families = {key.path[0] for key in keys if len(key.path) > 1}
    singles = {key.path[0] for key in keys if len(key.path) == 1}  # homelab_inventory, ...
    assert {"clusters", "mesh", "ml", "inventory"} <= groups
    assert {"homelab_inventory", "orchestrator"} <= singles
    ui.open("/asset-groups")
    ui.wait_for("Global asset lineage", *groups)
    assert "Join the Dagster community" not in ui.text()
    expanded = ",".join(f"global@global:{group}" for group in sorted(groups))
    ui.driver.set_window_size(1600, 1500)  # the whole graph, and the whole catalog
    try:
        ui.open(f"/asset-groups?expanded={expanded}")
        ui.wait_for("homelab_inventory", "forge", "studio__forge", "vllm")
        for _ in range(2):
            ui.driver.find_element(By.CSS_SELECTOR, "[aria-label='zoom_out']").click()
        ui.shot("graph.png")
        # The catalog lists every asset by its key: each family is a key's first part.
        ui.open("/assets")
        ui.wait_for(*(f"{family} / " for family in families))
        ui.wait_for(*singles)
    finally:
        ui.driver.set_window_size(1600, 1000)


def test_forge_page_shows_metadata_and_checks(ui, graph):
    import dagster as dg

    forge = dg.AssetKey(["cluster", "forge"])
    checks = [key.name for key in graph.get_check_keys_for_assets({forge})]
    assert checks
    ui.open("/assets/cluster/forge")
    ui.wait_for("forge: GPU training", "Metadata", "distribution", "k3s", "Latest check results")
    ui.shot("asset-forge.png")
    ui.open("/assets/cluster/forge?view=checks")
    ui.wait_for(f"Checks ({len(checks)})", *checks)


def _materialise_inventory(ui: UI) -> None:
    ui.open("/assets/homelab_inventory")
    ui.wait_for("homelab_inventory", "Latest materialization")
    before = ui.runs()
    ui.click("Materialize")
    # The toast is brief (a loaded machine can miss it); the run it announces stays.
    ui.wait(lambda page: "Launched run" in page or ui.runs() > before, "no run launched")


def test_materialisation_launched_from_the_ui_succeeds(ui):
    _materialise_inventory(ui)
    ui.open("/runs")
    page = ui.wait_for("homelab_inventory", "Success")
    assert "Failure" not in page
    ui.shot("run-success.png")
    ui.open("/assets/homelab_inventory?view=checks")
    ui.wait_for("valid", "Passed")


def test_failing_check_shows_as_failed(ui):
    yaml = YAML(typ="safe")
    data = yaml.load(ui.inventory)
    data["clusters"]["pro"]["api_port"] = data["clusters"]["air"]["api_port"]
    yaml.dump(data, ui.inventory)
    # What an operator does after editing homelab.yaml: reload the code location. With an
    # invalid inventory it holds the inventory asset alone.
    ui.open("/asset-groups")
    ui.wait_for("Global asset lineage", "mesh")
    ui.click("Reload definitions")
    ui.wait(lambda page: "mesh" not in page and "inventory" in page, "no reload")
    for attempt in range(2):
        _materialise_inventory(ui)
        ui.open("/assets/homelab_inventory?view=checks")
        page = ui.wait(
            lambda page: "already used by cluster 'air'" in page or "Execution failed" in page,
            "no check result",
        )
        # A run queued while the daemon still reloads the code location fails to start
        # (seen on a loaded machine): the check then did not run; launch it once more.
        if "Execution failed" not in page or attempt:
            break
    ui.wait_for("valid", "Failed", "already used by cluster 'air'")
    ui.shot("check-failed.png")
    ui.open("/runs")
    ui.wait_for("Failure")

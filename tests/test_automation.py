"""Declarative automation against a real Dagster instance: Dagster's own evaluation of the
code location's conditions (``dg.evaluate_automation_conditions``) over recorded events.

A link follows its clusters once both exist and their blocking checks pass; a model's
weights follow any of its training runs; an endpoint follows its weights (rolled forward when
a new version is current); a failing blocking check upstream holds back.
"""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import pytest

from homelab_dagster.definitions import build_definitions
from homelab_dagster.loader import load_inventory
from homelab_dagster.settings import Settings, Target

STUDIO = dg.AssetKey(["cluster", "studio"])
FORGE = dg.AssetKey(["cluster", "forge"])
LINK = dg.AssetKey(["mesh_link", "studio__forge"])
_BLOCKING = ("nodes_ready", "nodes_match_inventory", "namespaces_present")


@pytest.fixture(scope="module")
def defs(project_root, tmp_path_factory) -> dg.Definitions:
    settings = Settings(project_root / "homelab.yaml", Target.TWIN, tmp_path_factory.mktemp("s"))
    return build_definitions(settings, load_inventory(settings.inventory_path).inventory)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


def _materialised(instance: dg.DagsterInstance, key: dg.AssetKey, *, checks_pass: bool) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key))
    for check in _BLOCKING if key.path[0] == "cluster" else ():
        instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(
                asset_key=key, check_name=check, passed=checks_pass, description=check
            )
        )


def _requested(defs, instance, cursor=None):
    result = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, asset_selection=dg.AssetSelection.assets(LINK), cursor=cursor
    )
    return result, {LINK} if result.get_num_requested(LINK) else set()


def test_a_link_follows_its_clusters_once_both_exist(defs, instance):
    result, requested = _requested(defs, instance)
    assert not requested  # neither cluster exists yet
    _materialised(instance, STUDIO, checks_pass=True)
    result, requested = _requested(defs, instance, result.cursor)
    assert not requested  # forge is still missing
    _materialised(instance, FORGE, checks_pass=True)
    result, requested = _requested(defs, instance, result.cursor)
    assert requested == {LINK}


def test_a_link_re_mirrors_an_endpoint_it_exports_but_never_waits_for_one(defs, instance):
    """The endpoints on forge are the link's upstreams (it mirrors their Services when it
    runs), yet the link is made without them and a failing endpoint holds nothing back."""
    endpoint = dg.AssetKey(["vllm_endpoint", "sre-agent"])
    result, _ = _requested(defs, instance)
    _materialised(instance, STUDIO, checks_pass=True)
    _materialised(instance, FORGE, checks_pass=True)
    result, requested = _requested(defs, instance, result.cursor)
    assert requested == {LINK}  # no endpoint exists yet
    _materialised(instance, LINK, checks_pass=True)
    result, requested = _requested(defs, instance, result.cursor)
    assert not requested
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=endpoint))
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(asset_key=endpoint, check_name="serves_weights", passed=False)
    )
    _, requested = _requested(defs, instance, result.cursor)
    assert requested == {LINK}


def test_a_failing_blocking_check_upstream_holds_the_link_back(defs, instance):
    _materialised(instance, STUDIO, checks_pass=True)
    result, _ = _requested(defs, instance)
    _materialised(instance, FORGE, checks_pass=False)
    result, requested = _requested(defs, instance, result.cursor)
    assert not requested
    _materialised(instance, FORGE, checks_pass=True)
    _, requested = _requested(defs, instance, result.cursor)
    assert requested == {LINK}


def test_weights_follow_any_of_their_training_runs(defs, instance):
    weights = dg.AssetKey(["model_weights", "sre-agent"])
    runs = sorted(key for key in defs.resolve_asset_graph().get(weights).parent_keys)
    selection = dg.AssetSelection.assets(weights)
    first = dg.evaluate_automation_conditions(defs, instance, asset_selection=selection)
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=runs[0]))
    then = dg.evaluate_automation_conditions(
        defs, instance, asset_selection=selection, cursor=first.cursor
    )
    assert not first.get_num_requested(weights)
    assert then.get_num_requested(weights) == 1


def test_an_endpoint_rolls_forward_when_its_weights_change(defs, instance):
    endpoint = dg.AssetKey(["vllm_endpoint", "sre-agent"])
    weights = dg.AssetKey(["model_weights", "sre-agent"])
    upstream = sorted(defs.resolve_asset_graph().get(endpoint).parent_keys)
    assert FORGE in upstream and weights in upstream
    selection = dg.AssetSelection.assets(endpoint)
    result = dg.evaluate_automation_conditions(defs, instance, asset_selection=selection)
    assert not result.get_num_requested(endpoint)  # nothing upstream exists yet
    graph = defs.resolve_asset_graph()
    for key in upstream:  # each materialised, its checks (the weights' gate among them) passed
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key))
        for check in graph.get_check_keys_for_assets({key}):
            instance.report_runless_asset_event(
                dg.AssetCheckEvaluation(asset_key=key, check_name=check.name, passed=True)
            )
    result = dg.evaluate_automation_conditions(
        defs, instance, asset_selection=selection, cursor=result.cursor
    )
    assert result.get_num_requested(endpoint) == 1
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=endpoint))
    result = dg.evaluate_automation_conditions(
        defs, instance, asset_selection=selection, cursor=result.cursor
    )
    assert not result.get_num_requested(endpoint)  # served, nothing new
    # A new version whose gate fails: held back; the same version passing: rolled forward.
    from assets.weights import CHECK_NAME as gate_name  # the promotion gate (blocking)

    gate = dg.AssetCheckKey(weights, gate_name)
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=weights))
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(asset_key=weights, check_name=gate.name, passed=False)
    )
    result = dg.evaluate_automation_conditions(
        defs, instance, asset_selection=selection, cursor=result.cursor
    )
    assert not result.get_num_requested(endpoint)
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(asset_key=weights, check_name=gate.name, passed=True)
    )
    result = dg.evaluate_automation_conditions(
        defs, instance, asset_selection=selection, cursor=result.cursor
    )
    assert result.get_num_requested(endpoint) == 1

"""Check alerts through a real local webhook receiver, read from a real Dagster instance by
the code location's own sensor: one message when a check starts failing, none while it stays
failing, one when it passes again; skipped results alert nothing."""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import pytest
from _webhook_support import Receiver

from homelab_dagster.definitions import build_definitions
from homelab_dagster.loader import load_inventory
from homelab_dagster.settings import Settings, Target
from resources.webhook import Webhook
from sensors.alerts import ALERT_SENSOR

SECRET = "T0KEN-s3cret"
FORGE = dg.AssetKey(["cluster", "forge"])
SRE_AGENT = dg.AssetKey(["vllm_endpoint", "sre-agent"])
VLLM = dg.AssetKey(["vllm_endpoint", "vllm"])


@pytest.fixture(scope="module")
def code_location(project_root, tmp_path_factory) -> dg.Definitions:
    settings = Settings(project_root / "homelab.yaml", Target.TWIN, tmp_path_factory.mktemp("s"))
    return build_definitions(settings, load_inventory(settings.inventory_path).inventory)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(SECRET)
    yield server
    server.close()


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


def _evaluate(code_location, instance, webhook: Webhook, cursor: str | None):
    sensor = code_location.resolve_sensor_def(ALERT_SENSOR)
    with dg.build_sensor_context(
        cursor=cursor, instance=instance, definitions=code_location, resources={"webhook": webhook}
    ) as context:
        result = sensor.evaluate_tick(context)
    return result


def _check(instance, key, name, passed, description, **kwargs) -> None:
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(
            asset_key=key, check_name=name, passed=passed, description=description, **kwargs
        )
    )


def test_a_check_that_starts_failing_is_said_once_and_its_end_once(
    code_location, instance, receiver, capsys
):
    webhook = Webhook(url=receiver.url)
    _check(instance, FORGE, "no_drift", True, "no drift")
    tick = _evaluate(code_location, instance, webhook, None)
    assert receiver.received == []  # passing: nothing to say

    _check(instance, FORGE, "no_drift", False, "Deployment kube-system/x: replicas 1 -> 3")
    tick = _evaluate(code_location, instance, webhook, tick.cursor)
    ((path, message),) = receiver.received
    assert path.endswith(SECRET)
    assert message["event"] == "check_failed"
    assert message["asset"] == "cluster/forge" and message["check"] == "no_drift"
    assert message["severity"] == "ERROR"
    assert message["reason"] == "Deployment kube-system/x: replicas 1 -> 3"
    assert "homelab reconcile" in message["act"]
    assert message["text"].startswith("cluster/forge: no_drift failing: Deployment")

    # Still failing (other words, new evaluations, more ticks): said once.
    _check(instance, FORGE, "no_drift", False, "Deployment kube-system/x: replicas 1 -> 4")
    tick = _evaluate(code_location, instance, webhook, tick.cursor)
    tick = _evaluate(code_location, instance, webhook, tick.cursor)
    assert len(receiver.received) == 1

    _check(instance, FORGE, "no_drift", True, "no drift")
    tick = _evaluate(code_location, instance, webhook, tick.cursor)
    assert [m["event"] for _, m in receiver.received] == ["check_failed", "check_resolved"]
    assert receiver.received[1][1]["act"] is None

    # Fails again: a new problem, said again.
    _check(instance, FORGE, "no_drift", False, "Namespace ml-training: deleted")
    _evaluate(code_location, instance, webhook, tick.cursor)
    assert [m["event"] for _, m in receiver.received][-1] == "check_failed"
    assert SECRET not in capsys.readouterr().err


def test_an_endpoint_behind_its_weights_warns_and_skipped_checks_say_nothing(
    code_location, instance, receiver
):
    webhook = Webhook(url=receiver.url)
    behind = "serves 8a1c2e3f4b5d, but 0c9e7d6a5b4c has been the current version for 5.0 h"
    _check(
        instance,
        SRE_AGENT,
        "serves_current_version",
        False,
        behind,
        severity=dg.AssetCheckSeverity.WARN,
    )
    _check(
        instance,
        VLLM,
        "serves_weights",
        False,
        "skipped: the twin cannot fetch it",
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"skipped": True},
    )
    _evaluate(code_location, instance, webhook, None)
    ((_, message),) = receiver.received
    assert message["asset"] == "vllm_endpoint/sre-agent"
    assert message["severity"] == "WARN" and message["reason"] == behind
    assert message["act"] == "materialise vllm_endpoint/sre-agent (`homelab up`) to roll it forward"


def test_an_alert_the_receiver_refused_is_sent_again_next_tick(code_location, instance):
    refusing = Receiver(SECRET, status=500)
    try:
        _check(instance, FORGE, "nodes_ready", False, "forge-gpu-0 NotReady")
        tick = _evaluate(code_location, instance, Webhook(url=refusing.url), None)
        tick = _evaluate(code_location, instance, Webhook(url=refusing.url), tick.cursor)
        assert len(refusing.received) == 2  # not marked as said while it was refused
    finally:
        refusing.close()
    ok = Receiver(SECRET)
    try:
        tick = _evaluate(code_location, instance, Webhook(url=ok.url), tick.cursor)
        _evaluate(code_location, instance, Webhook(url=ok.url), tick.cursor)
        assert [m["check"] for _, m in ok.received] == ["nodes_ready"]
    finally:
        ok.close()

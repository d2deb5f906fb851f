"""The failure webhook against a real local HTTP server: one message per failed run, with the
asset and the reason, no secret in it; a receiver that is down or slow is reported, never
raised, and its URL is never shown."""

from __future__ import annotations

import json
from collections.abc import Iterator

import dagster as dg
import pytest
from _webhook_support import Receiver, evaluate_failure_sensor

from resources.webhook import Webhook
from sensors.failures import repair_record

SECRET = "T0KEN-s3cret"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(SECRET)
    yield server
    server.close()


def _failed_run(instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    @dg.asset(key=["cluster", "forge"])
    def forge() -> None:
        raise dg.Failure(description="pulumi up of stack twin.cluster.forge failed: refused")

    return dg.materialize(
        [forge], instance=instance, raise_on_error=False, tags={"homelab/commit": "abc123"}
    )


def _cluster_resources() -> dict[str, object]:
    """The twin's Kubernetes resources (the sensor asks the run's step pods, where a step's
    Job failed; these runs' steps are processes, so it never does)."""
    import tempfile

    from homelab_dagster.loader import inventory_or_none
    from homelab_dagster.settings import Settings
    from resources.deployment import build_deployment

    settings = Settings.from_env({"HOMELAB_STATE_DIR": tempfile.mkdtemp()})
    resources = build_deployment(settings, inventory_or_none(settings.inventory_path)).resources
    return {name: resources[name] for name in ("dagster_on_kubernetes", "kubernetes")}


def _evaluate(instance: dg.DagsterInstance, run_id: str, webhook: Webhook):
    return evaluate_failure_sensor(instance, run_id, {"webhook": webhook, **_cluster_resources()})


def test_a_failed_run_sends_one_message_with_the_asset_and_the_reason(receiver, capsys):
    with dg.instance_for_test() as instance:
        result = _failed_run(instance)
        assert not result.success
        _evaluate(instance, result.run_id, Webhook(url=receiver.url))
        record = repair_record(instance, dg.AssetKey(["cluster", "forge"]))
    (path, message) = receiver.received[0:1][0]
    assert len(receiver.received) == 1
    assert path == f"/hooks/{SECRET}"
    assert message["run_id"] == result.run_id
    assert message["commit"] == "abc123"
    (asset,) = message["assets"]
    assert asset["asset"] == "cluster/forge"
    assert "refused" in asset["reason"]
    assert asset["failures"] == 1 and asset["stalled"] is False
    assert SECRET not in json.dumps(message)
    assert record is not None and record.failures == 1
    assert SECRET not in capsys.readouterr().err


def test_three_failed_runs_in_a_row_stall_the_asset_and_say_so(receiver):
    with dg.instance_for_test() as instance:
        for _ in range(3):
            _evaluate(instance, _failed_run(instance).run_id, Webhook(url=receiver.url))
        record = repair_record(instance, dg.AssetKey(["cluster", "forge"]))
    assert [m["assets"][0]["failures"] for _, m in receiver.received] == [1, 2, 3]
    assert receiver.received[-1][1]["assets"][0]["stalled"] is True
    assert record is not None and record.stalled


def test_a_slow_receiver_times_out_without_showing_the_url():
    slow = Receiver(SECRET, delay_s=5)
    try:
        delivery = Webhook(url=slow.url, timeout_s=0.5).post({"event": "test"})
    finally:
        slow.close()
    assert not delivery.sent
    assert "did not answer" in delivery.detail or "timed out" in delivery.detail
    assert SECRET not in delivery.detail


def test_a_receiver_that_refuses_is_reported_not_raised():
    down = Receiver(SECRET, status=500)
    try:
        delivery = Webhook(url=down.url).post({"event": "test"})
    finally:
        down.close()
    assert not delivery.sent and delivery.detail == "the receiver answered HTTP 500"


def test_no_webhook_configured_sends_nothing():
    assert not Webhook().post({"event": "test"}).sent

"""Alerts for what matters, not only failed runs: a check that starts failing, and its end.

The sensor ``check_alerts`` reads, each tick, the latest evaluation of every asset check the
code location defines (one query per check: storage-agnostic, SQLite or PostgreSQL). A check
whose latest result fails, where the last one it alerted on did not, gets one message through
the webhook (:class:`resources.webhook.Webhook`); a check that passes again after an alert
gets one ``check_resolved``. A standing problem is said once, however many ticks and
re-evaluations it lasts, and whatever words its later results use. What that covers:

- drift found (``no_drift``) and a weights version that no longer matches its digest
  (``weights_intact``): the reconcile's checks;
- a blocking check failed (an endpoint that does not serve, a cluster's nodes not ready);
- an endpoint behind its model's current weights (``serves_current_version``, a warning).

A skipped result (an endpoint whose weights this deployment cannot fetch: ``skipped: true``
in its metadata) is not a failure and alerts nothing. Each message is one JSON object with a
``text`` line (Slack's incoming webhooks and ntfy's JSON publishing read it), the asset, the
check, its severity, the reason, and ``act``: the command that acts on it. No secret is in it
(reasons are the checks' own words; the URL is never logged).

The cursor is JSON, ``{"<asset>:<check>": {"id": <storage id>, "failing": bool}}``: the last
result seen of each check and whether an alert for it stands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import dagster as dg

from assets._stack import DRIFT_CHECK
from assets.endpoints import FRESHNESS_CHECK
from assets.weights import INTACT_CHECK
from resources.webhook import Webhook

__all__ = [
    "ALERT_SENSOR",
    "alert_message",
    "build_alert_sensor",
    "latest_evaluation",
    "was_skipped",
]

ALERT_SENSOR = "check_alerts"
_INTERVAL_S = 30
_REASON_LIMIT = 1000


@dataclass(frozen=True)
class _Seen:
    """The last result of one check the sensor read, and whether an alert for it stands."""

    id: int
    failing: bool


def alert_message(
    event: str, key: dg.AssetCheckKey, evaluation: dg.AssetCheckEvaluation, run_id: str | None
) -> dict[str, Any]:
    """The webhook's message for ``event`` (``check_failed`` or ``check_resolved``)."""
    asset = key.asset_key.to_user_string()
    severity = evaluation.severity.value if evaluation.severity else "ERROR"
    reason = (evaluation.description or "no reason given").strip()[:_REASON_LIMIT]
    act = _act(key.name, asset) if event == "check_failed" else None
    verb = {"check_failed": "failing", "check_resolved": "passes again"}[event]
    text = f"{asset}: {key.name} {verb}: {reason}" + (f" ({act})" if act else "")
    return {
        "event": event,
        "text": text,
        "asset": asset,
        "check": key.name,
        "severity": severity,
        "reason": reason,
        "run_id": run_id,
        "act": act,
    }


def _act(check: str, asset: str) -> str:
    """What a person runs about a failing ``check`` of ``asset``."""
    if check in (DRIFT_CHECK, INTACT_CHECK):
        return "`homelab reconcile` shows it and repairs it where allowed"
    if check == FRESHNESS_CHECK:
        return f"materialise {asset} (`homelab up`) to roll it forward"
    return f"`homelab status` shows it; materialise {asset} (`homelab up`) once it is fixed"


def latest_evaluation(
    instance: dg.DagsterInstance, key: dg.AssetCheckKey
) -> tuple[Any, dg.AssetCheckEvaluation] | None:
    """The check's latest result: its execution record (``id``, ``run_id``, ``event``) and
    its evaluation; None where it was never evaluated."""
    record = instance.get_latest_asset_check_evaluation_record(key)
    event = record.event if record is not None else None
    data = event.dagster_event.event_specific_data if event and event.dagster_event else None
    if record is None or not isinstance(data, dg.AssetCheckEvaluation):
        return None
    return record, data


def was_skipped(evaluation: dg.AssetCheckEvaluation) -> bool:
    """A result that says the check could not run here (``skipped: true`` in its metadata:
    an endpoint whose weights this deployment cannot fetch), not that it failed."""
    skipped = evaluation.metadata.get("skipped")
    return isinstance(skipped, dg.BoolMetadataValue) and bool(skipped.value)


def _failing(evaluation: dg.AssetCheckEvaluation) -> bool | None:
    """Whether the result is a failure (None: skipped, neither)."""
    return None if was_skipped(evaluation) else not evaluation.passed


def build_alert_sensor(*, running: bool) -> dg.Definitions:
    """The check alerts sensor, running from the start if ``running``."""
    status = dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED

    @dg.sensor(
        name=ALERT_SENSOR,
        minimum_interval_seconds=_INTERVAL_S,
        default_status=status,
        description="Announces by webhook each check that starts failing (drift, a blocking "
        "check, an endpoint behind its weights), once, and its resolution.",
    )
    def check_alerts(context: dg.SensorEvaluationContext, webhook: Webhook) -> dg.SkipReason:
        seen = {k: _Seen(**v) for k, v in json.loads(context.cursor or "{}").items()}
        repository = context.repository_def
        assert repository is not None
        sent = 0
        for key in sorted(repository.asset_graph.asset_check_keys, key=str):
            latest = latest_evaluation(context.instance, key)
            if latest is None:
                continue
            record, data = latest
            name = f"{key.asset_key.to_user_string()}:{key.name}"
            before = seen.get(name)
            if before is not None and before.id >= record.id:
                continue  # nothing new
            failing = _failing(data)
            standing = before.failing if before else False
            if failing is not None and failing != standing:
                kind = "check_failed" if failing else "check_resolved"
                message = alert_message(kind, key, data, record.run_id)
                if webhook.configured:
                    delivery = webhook.post(message)
                    if not delivery.sent:  # the URL is a secret: never in the log
                        context.log.warning(f"{name}: the webhook failed: {delivery.detail}")
                        continue  # said next tick
                context.log.info(message["text"])
                sent += 1
                standing = failing
            seen[name] = _Seen(record.id, standing)
        context.update_cursor(json.dumps({k: vars(v) for k, v in seen.items()}, sort_keys=True))
        return dg.SkipReason(f"{sent} alert(s)" if sent else "no check changed")

    return dg.Definitions(sensors=[check_alerts])

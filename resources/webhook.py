"""The failure webhook: a JSON message POSTed to a receiver (Slack-style or PagerDuty-style).

The URL is a secret (receivers carry their token in it): it comes from
``$HOMELAB_WEBHOOK_URL`` through ``dg.EnvVar`` at launch, and is never logged, returned or
put in a message. A delivery that fails (refused, timed out, an HTTP error) is reported by
its :class:`Delivery`, never raised: a receiver that is down must not stop failures being
recorded.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg
from pydantic import Field

__all__ = ["Delivery", "Webhook"]


@dataclass(frozen=True)
class Delivery:
    """How a message fared: sent (a 2xx answer), and the receiver's status or why not."""

    sent: bool
    detail: str


class Webhook(dg.ConfigurableResource):
    """Where failed runs are announced (``url`` None: nowhere)."""

    url: str | None = Field(default=None, description="The receiver (a secret: EnvVar only).")
    timeout_s: float = Field(default=10.0, gt=0, description="How long a delivery may take.")

    @property
    def configured(self) -> bool:
        """Whether there is a receiver."""
        return bool(self.url)

    def post(self, message: Mapping[str, Any]) -> Delivery:
        """POST ``message`` as JSON, within ``timeout_s``."""
        if not self.url:
            return Delivery(False, "no webhook configured")
        request = urllib.request.Request(
            self.url,
            data=json.dumps(message, sort_keys=True).encode(),
            headers={"Content-Type": "application/json", "User-Agent": "homelab-dagster"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return Delivery(200 <= response.status < 300, f"HTTP {response.status}")
        except urllib.error.HTTPError as exc:  # the receiver answered with an error
            return Delivery(False, f"the receiver answered HTTP {exc.code}")
        except urllib.error.URLError as exc:  # its reason names no URL
            return Delivery(False, f"the receiver cannot be reached ({exc.reason})")
        except TimeoutError:
            return Delivery(False, f"the receiver did not answer within {self.timeout_s:.0f} s")

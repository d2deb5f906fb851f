"""The failure of an asset whose materialisation a later piece of work delivers.

Such an asset is declared (so the graph is whole in the UI) but never pretends to succeed.
"""

from __future__ import annotations

from typing import NoReturn

import dagster as dg

__all__ = ["PENDING_TAGS", "not_built_yet"]

# Tags an asset whose materialisation is not built yet; `homelab up` leaves such assets out.
PENDING_TAGS = {"homelab/status": "not-built-yet"}


def not_built_yet(key: dg.AssetKey, what: str) -> NoReturn:
    """Fail the materialisation of ``key``, saying what is not built yet."""
    raise dg.Failure(
        description=(
            f"{key.to_user_string()}: {what} is not built yet. The asset is declared so the "
            "graph is complete; see docs/architecture.md, 'What is built'."
        ),
        allow_retries=False,
    )

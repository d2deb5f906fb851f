"""How assets follow their upstreams without being asked: Dagster's declarative automation.

:func:`follow_upstream` is the condition of an asset that must follow what it depends on
(a cluster's mesh links after the cluster, a model's weights after its training runs, an
endpoint after its weights): materialised once an upstream is updated, never while an
upstream (or itself) is in progress, and held back while a blocking check of an upstream
fails. The automation sensor evaluates it (``sensors/reconcile.py``; running by default on
the twin, chosen in ``resources/deployment.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

__all__ = ["follow_upstream"]


def follow_upstream(
    *, wait_for_all: bool = True, optional: Sequence[dg.AssetKey] = ()
) -> dg.AutomationCondition:
    """Dagster's ``eager`` condition, held back by failing blocking checks upstream.

    ``wait_for_all`` False: an upstream never materialised does not hold the asset back
    (a model's weights follow whichever of its training runs ran; the others may never).
    ``optional``: upstreams followed when they are updated, but neither waited for nor
    holding the asset back (a mesh link re-mirrors the endpoints its target exports; it
    links the clusters without them).
    """
    missing = dg.AutomationCondition.any_deps_missing()
    checks = dg.AutomationCondition.all_deps_blocking_checks_passed()
    condition = dg.AutomationCondition.eager()
    if not wait_for_all or optional:
        condition = condition.without(~missing)
    if optional:
        others = dg.AssetSelection.assets(*optional)
        if wait_for_all:
            condition = condition & ~missing.ignore(others)
        checks = checks.ignore(others)
    return condition & checks

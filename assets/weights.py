"""``model_weights/<model>``: the versions of a model's weights, in the weights store.

A trained model's asset registers the weights of its newest training run materialisation
(read from that materialisation's metadata: the data flows one way, training_run ->
model_weights) as a version addressed by their digest, then promotes it to current unless
its held-out loss regresses: the blocking check ``eval_loss_regression`` fails, the
version stays listed but not current, and nothing downstream (the endpoint) runs.
The data version is the weights' digest, so the asset's history in the UI is the
history of versions. Materialising with the config ``rollback_to: <digest>`` makes an
older version current instead (recorded as a materialisation of that version). The asset
follows its training runs by itself (:func:`assets._automation.follow_upstream`), and the
check ``weights_intact`` (run by the ``reconcile`` job) reads the current version's stored
files back and proves they still hash to its digest (a change made behind the store's back,
which its checksums would not show, included).

An external model (``source: external``) is an observable source asset: observing it
reads the store's current version where one was put there, and otherwise reports the
base model's id; nothing is downloaded.
"""

import hashlib
import warnings
from collections.abc import Mapping
from typing import Any

import dagster as dg

from assets._automation import follow_upstream
from assets._keys import model_weights_key, training_run_key
from assets._stack import provenance
from homelab_dagster.checks import Verdict
from homelab_dagster.errors import WeightsError
from homelab_dagster.inventory import Model, TrainingRun
from homelab_dagster.weights import (
    ROLLBACK_VERDICT,
    WeightsVersion,
    decide_promotion,
    registration_from_run,
    rollback_metadata,
    version_metadata,
)
from resources.weights import WeightsStore

__all__ = ["CHECK_NAME", "INTACT_CHECK", "WeightsConfig", "build_model_weights_defs"]

CHECK_NAME = "eval_loss_regression"
INTACT_CHECK = "weights_intact"


class WeightsConfig(dg.Config):
    """Run configuration of ``model_weights/<model>``.

    ``rollback_to``: instead of registering the newest training run's weights, make this
    registered version current (a digest, or a unique prefix of at least 8 characters).
    """

    rollback_to: str | None = None


def _result(
    context: dg.AssetExecutionContext,
    version: WeightsVersion,
    metadata: Mapping[str, Any],
    verdict: Verdict,
) -> dg.MaterializeResult:
    """The materialisation of ``version``: its metadata (with the run's provenance) and the
    gate's outcome."""
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version.digest),
        metadata={
            **metadata,
            "versions": dg.MetadataValue.md(metadata["versions"]),
            **provenance(context),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=CHECK_NAME,
                passed=verdict.passed,
                description=verdict.description,
                metadata=dict(verdict.metadata),
            )
        ],
    )


def _rollback(
    context: dg.AssetExecutionContext, store: WeightsStore, name: str, digest: str
) -> dg.MaterializeResult:
    """Make version ``digest`` of ``name`` current, recorded as a materialisation."""
    before = store.current(name)
    version = store.rollback(name, digest)
    context.log.info(
        f"{name}: rolled back from {before.digest[:12] if before else 'none'} "
        f"to {version.digest[:12]}"
    )
    metadata = rollback_metadata(version, before=before, versions=store.versions(name))
    return _result(context, version, metadata, ROLLBACK_VERDICT)


def _newest_run(
    context: dg.AssetExecutionContext, name: str, run_keys: Mapping[str, dg.AssetKey]
) -> tuple[str, dict[str, object]]:
    """The training run of ``name`` materialised last, and the metadata values it recorded."""
    events = {
        run: context.instance.get_latest_materialization_event(run_key)
        for run, run_key in run_keys.items()
    }
    latest = [(event.timestamp, run, event) for run, event in events.items() if event]
    if not latest:
        raise dg.Failure(
            description=f"{model_weights_key(name).to_user_string()}: no training run of "
            f"{name} has been materialised yet "
            f"({', '.join(k.to_user_string() for k in run_keys.values())})",
            allow_retries=False,
        )
    _, run, event = max(latest, key=lambda item: item[0])
    materialization = event.asset_materialization
    recorded = materialization.metadata if materialization else {}
    return run, {label: entry.value for label, entry in recorded.items()}


def _register(
    context: dg.AssetExecutionContext,
    store: WeightsStore,
    name: str,
    run: str,
    margin: float,
    recorded: Mapping[str, object],
) -> dg.MaterializeResult:
    """Register the weights training run ``run`` recorded, then make them current or hold
    them back (``margin``: the run's max_eval_loss_regression)."""
    registration = registration_from_run(run, recorded)
    version, new = store.register(
        name, registration.uri, expected_digest=registration.digest, **registration.version_fields()
    )
    promotion = decide_promotion(version, new=new, current=store.current(name), margin=margin)
    if promotion.promote:
        store.set_current(name, version.digest, f"trained by {run}")
    metadata = version_metadata(
        version,
        source_run=run,
        metrics=registration.metrics,
        new=new,
        promoted=promotion.promote,
        current=promotion.current,
        versions=store.versions(name),
    )
    context.log.info(promotion.summary(name))
    return _result(context, version, metadata, promotion.verdict)


def _external_defs(name: str, model: Model) -> dg.Definitions:
    key = model_weights_key(name)

    def _observe(context: dg.OpExecutionContext) -> dg.ObserveResult:
        store: WeightsStore = context.resources.weights_store
        current = store.current(name)
        if current is not None:
            return dg.ObserveResult(
                data_version=dg.DataVersion(current.digest),
                metadata={"digest": current.digest, "weights_uri": current.uri},
            )
        identity = f"external:{model.base_model}"
        return dg.ObserveResult(
            data_version=dg.DataVersion(hashlib.sha256(identity.encode()).hexdigest()),
            metadata={
                "base_model": model.base_model or "",
                "hub_url": dg.MetadataValue.url(f"https://huggingface.co/{model.base_model}"),
                "stored": False,
            },
        )

    # observable_source_asset is beta; that is known here and not worth a warning per load.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        observable = dg.observable_source_asset(
            key=key,
            group_name="ml",
            description=f"Weights of {name}: {model.base_model}, not trained here.",
            required_resource_keys={"weights_store"},
            metadata={"source": "external", "base_model": model.base_model or ""},
        )(_observe)
    return dg.Definitions(assets=[observable])


def build_model_weights_defs(
    name: str, model: Model, runs: dict[str, TrainingRun]
) -> dg.Definitions:
    """The asset of model ``name``'s weights, fed by the training runs ``runs``."""
    if model.source == "external":
        return _external_defs(name, model)
    key = model_weights_key(name)
    run_keys = {run: training_run_key(run) for run in runs}

    @dg.asset(
        key=key,
        deps=list(run_keys.values()),
        automation_condition=follow_upstream(wait_for_all=False),
        group_name="ml",
        kinds={"safetensors"},
        description=f"Versions of {name}'s weights, trained by {', '.join(runs) or 'no run'}.",
        check_specs=[
            dg.AssetCheckSpec(
                CHECK_NAME,
                asset=key,
                blocking=True,
                description="The new version's held-out loss is no worse than the current "
                "version's by more than the run's max_eval_loss_regression (relative).",
            )
        ],
    )
    def _weights(
        context: dg.AssetExecutionContext, config: WeightsConfig, weights_store: WeightsStore
    ) -> dg.MaterializeResult:
        if config.rollback_to:
            try:
                return _rollback(context, weights_store, name, config.rollback_to)
            except WeightsError as exc:
                raise dg.Failure(description=f"{key.to_user_string()}: {exc}") from exc
        run, recorded = _newest_run(context, name, run_keys)
        margin = runs[run].max_eval_loss_regression
        try:
            return _register(context, weights_store, name, run, margin, recorded)
        except WeightsError as exc:
            raise dg.Failure(
                description=f"{key.to_user_string()}: {exc}", allow_retries=False
            ) from exc

    @dg.asset_check(
        asset=key,
        name=INTACT_CHECK,
        description="Every byte of the current version's stored files still hashes to its "
        "digest (read back from the store).",
    )
    def _intact(weights_store: WeightsStore) -> dg.AssetCheckResult:
        try:
            current = weights_store.current(name)
            if current is not None:
                weights_store.refuse_if_corrupt(current, deep=True)
        except WeightsError as exc:
            return dg.AssetCheckResult(passed=False, description=str(exc))
        if current is None:
            return dg.AssetCheckResult(passed=True, description=f"{name}: no current version yet")
        return dg.AssetCheckResult(
            passed=True,
            description=f"{name}: version {current.digest[:12]} matches its digest",
            metadata={"digest": current.digest, "files": len(current.files)},
        )

    return dg.Definitions(assets=[_weights], asset_checks=[_intact])

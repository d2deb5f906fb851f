"""``homelab_inventory``: the inventory file as committed, and the check that it is valid.

Every other asset depends on it; its blocking check stops them when the file is invalid.
"""

import hashlib
from pathlib import Path

import dagster as dg

from assets._keys import INVENTORY_KEY
from homelab_dagster.errors import InventoryError
from homelab_dagster.loader import load_inventory

__all__ = ["build_inventory_defs"]


def build_inventory_defs(path: Path) -> dg.Definitions:
    """The inventory asset and its validity check, for the file at ``path``."""

    @dg.asset(
        key=INVENTORY_KEY,
        group_name="inventory",
        kinds={"yaml"},
        description=f"The homelab's declarative inventory ({path.name}).",
    )
    def homelab_inventory(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise dg.Failure(f"{path}: cannot read the inventory: {exc.strerror}") from exc
        metadata: dict[str, dg.RawMetadataValue] = {
            "path": dg.MetadataValue.path(str(path)),
            "digest": hashlib.sha256(data).hexdigest(),
            "size_bytes": len(data),
        }
        try:
            metadata |= {
                f"count_{k}": v for k, v in load_inventory(path).inventory.counts().items()
            }
            metadata["valid"] = True
        except InventoryError as exc:
            metadata |= {"valid": False, "problems": len(exc.problems)}
            context.log.error(str(exc))
        return dg.MaterializeResult(
            metadata=metadata, data_version=dg.DataVersion(metadata["digest"])
        )

    @dg.asset_check(
        asset=INVENTORY_KEY,
        name="valid",
        blocking=True,
        description="The inventory parses and breaks none of the rules (docs/inventory.md).",
    )
    def inventory_valid() -> dg.AssetCheckResult:
        try:
            loaded = load_inventory(path)
        except InventoryError as exc:
            return dg.AssetCheckResult(
                passed=False,
                description=str(exc),
                metadata={
                    "problems": len(exc.problems),
                    "messages": dg.MetadataValue.md("\n".join(f"- `{p}`" for p in exc.problems)),
                },
            )
        return dg.AssetCheckResult(
            passed=True, metadata={"digest": loaded.digest, **loaded.inventory.counts()}
        )

    return dg.Definitions(assets=[homelab_inventory], asset_checks=[inventory_valid])

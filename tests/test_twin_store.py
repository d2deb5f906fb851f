"""The twin's object store (versitygw, built by the toolchain) and the weights store on it:
its life beside the twin (keys, restart, down, purge), and the one code path the twin and the
homelab share, with only the endpoint, the bucket and the keys' source differing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import dagster as dg

from homelab_dagster.settings import Settings, Target
from homelab_dagster.twin import STORE_PORT_INDEX, Twin, service_port
from homelab_dagster.twin_host import loopback_address, read_pid
from infra.endpoint import ExternalKeys, ServedWeights, ServerRuntime, StoreKeys, pod_spec
from resources.deployment import build_deployment
from resources.vllm import VllmServers
from resources.weights import WeightsStore

DIGEST = "cd" * 32


def test_the_store_keeps_its_data_across_down_and_up_restarts_when_killed_and_purges(
    tmp_path: Path, toolchain, shipped_inventory, twin_port_base
) -> None:
    base = twin_port_base + 300  # a twin of its own: `down` stops its store
    twin = Twin(shipped_inventory, tmp_path / "state", toolchain, api_port_base=base)
    store = twin.store
    assert store.address == f"127.0.0.1:{service_port(shipped_inventory, base, STORE_PORT_INDEX)}"
    assert "started on" in store.up(for_pods=False)
    assert store.credentials.stat().st_mode & 0o777 == 0o600
    keys = store.credentials.read_text()
    weights = WeightsStore(
        bucket="ml-models",
        endpoint_url=f"http://{store.address}",
        credentials_file=str(store.credentials),
    )
    source = tmp_path / "w"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"\x00" * 1024)
    version, _ = weights.register("m", str(source))
    status = twin.store_status()
    assert status.answering and status.buckets == ("ml-models",)
    assert keys.split()[-1] not in repr(status)  # the status never carries a key

    # Killed: the next `up` starts it again, with the same keys and data.
    os.kill(read_pid(store.root / "store.pid") or 0, signal.SIGKILL)
    assert not twin.store_status().answering
    assert "started on" in store.up(for_pods=False)
    assert store.up(for_pods=False) == "running"
    assert store.credentials.read_text() == keys
    assert [v.digest for v in weights.versions("m")] == [version.digest]

    # `twin down` (every cluster): stopped, data kept; up again: every version is there.
    twin.down()
    assert not twin.store_status().running
    store.up(for_pods=False)
    assert weights.verify("m", version.digest, deep=True)
    twin.down(purge=True)
    assert not store.root.exists()


def test_the_weights_store_and_serving_take_one_code_path_on_both_targets(
    project_root, shipped_inventory, tmp_path: Path, monkeypatch
) -> None:
    """The twin's and the homelab's deployments: the same classes, the same bucket and the
    same copy step; only the endpoint, and where the keys come from, differ."""

    def deployment(target: Target):
        settings = Settings(project_root / "homelab.yaml", target, tmp_path, twin_port_base=20443)
        return build_deployment(settings, shipped_inventory).resources

    twin, homelab = deployment(Target.TWIN), deployment(Target.HOMELAB)
    bucket = shipped_inventory.ml.weights_bucket
    stores = {name: r["weights_store"] for name, r in (("twin", twin), ("homelab", homelab))}
    assert all(type(s) is WeightsStore and s.bucket == bucket for s in stores.values())
    differ = {
        field
        for field in WeightsStore.model_fields
        if getattr(stores["twin"], field) != getattr(stores["homelab"], field)
    }
    assert differ == {"endpoint_url", "credentials_file"}
    port = service_port(shipped_inventory, 20443, STORE_PORT_INDEX)
    assert stores["twin"].endpoint_url == f"http://127.0.0.1:{port}"
    assert stores["twin"].credentials_file == str(tmp_path / "twin" / "store" / "credentials")
    assert stores["homelab"].credentials_file is None  # boto3's chain: AWS_* variables

    # Serving: the same copy step, in the same image, from the same bucket.
    keys = tmp_path / "twin" / "store" / "credentials"
    keys.parent.mkdir(parents=True)
    keys.write_text("[default]\naws_access_key_id = AKIATWIN\naws_secret_access_key = s3cr3t\n")
    monkeypatch.setenv("HOMELAB_WEIGHTS_S3_ENDPOINT", "http://minio.ml-data:9000")
    runtimes = {"twin": _runtime(twin), "homelab": _runtime(homelab)}
    endpoint = shipped_inventory.endpoints["sre-agent"]
    weights = ServedWeights(DIGEST, f"sre-agent/versions/{DIGEST}")
    forge = shipped_inventory.clusters["forge"]
    inits = {}
    for name, runtime in runtimes.items():
        spec = pod_spec("sre-agent", endpoint, forge, weights, runtime)
        (inits[name],) = spec["initContainers"]
        assert not any("hostPath" in v for v in spec["volumes"])
    endpoint_arg = inits["twin"]["command"].index("--endpoint-url") + 1
    assert inits["twin"]["command"][endpoint_arg] == f"http://{loopback_address(port)}:{port}"
    assert inits["homelab"]["command"][endpoint_arg] == "http://minio.ml-data:9000"
    for init in inits.values():
        del init["command"][endpoint_arg]
    assert inits["twin"] == inits["homelab"]
    assert runtimes["twin"].weights.keys == StoreKeys("AKIATWIN", "s3cr3t")
    assert runtimes["homelab"].weights.keys == ExternalKeys("homelab", "weights-store")
    # Training: both deployments' runs put their weights through the same weights store
    # (assets/training.py: WeightsStore.stage); the launcher is the one remaining difference
    # (the local process here, Flyte on Forge: docs/deploy.md).


def _runtime(resources) -> ServerRuntime:
    """What a deployment's ``vllm`` resource hands the endpoint program (EnvVars resolved)."""
    with dg.build_resources({"vllm": resources["vllm"]}) as built:
        vllm = built.vllm
        assert isinstance(vllm, VllmServers)
        return vllm.runtime()

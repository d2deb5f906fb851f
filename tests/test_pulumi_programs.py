"""The Pulumi programs of infra/, run against Pulumi's mocks (no engine, no cluster).

Fast checks of what each program declares for an inventory entry. They complement, never
replace, the twin tests (tests/test_clusters_twin.py), which run the same programs for real.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pulumi
import pytest
import yaml

from homelab_dagster.inventory import Inventory
from homelab_dagster.settings import Settings, Target
from infra.cluster import GPU_PRIORITY_CLASS, cluster_program, component_plan
from infra.mesh import ExportedService, LinkEnds, mesh_link_program
from resources.deployment import build_deployment
from resources.pulumi import PulumiStacks

TOKEN = "mock-token"
# How Pulumi marks a secret value on the wire (the mocks receive inputs as the engine would).
SECRET_SIG, SECRET_VALUE_SIG = (
    "4dabf18193072939515e22adb298388d",
    "1b47061264138c4ac30d75fd1eb44270",
)
CA = base64.b64encode(b"mock-ca").decode()


class Recorder(pulumi.runtime.Mocks):
    """Records every resource; plays the token controller for service-account tokens."""

    def __init__(self) -> None:
        self.resources: list[pulumi.runtime.MockResourceArgs] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(args)
        outputs = dict(args.inputs)
        if args.inputs.get("type") == "kubernetes.io/service-account-token":
            outputs["data"] = {"token": base64.b64encode(TOKEN.encode()).decode(), "ca.crt": CA}
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {}

    def of_type(self, typ: str) -> list[pulumi.runtime.MockResourceArgs]:
        return [r for r in self.resources if r.typ == typ]


def run(program, stack: str = "twin.test") -> Recorder:
    # Pulumi's mocks run on the thread's current event loop; a test before this one may
    # have left none (``asyncio.run`` unsets it when it ends).
    asyncio.set_event_loop(asyncio.new_event_loop())
    mocks = Recorder()
    pulumi.runtime.set_mocks(mocks, project="homelab", stack=stack, preview=False)

    @pulumi.runtime.test
    def go() -> None:
        program()

    go()
    return mocks


def pulumi_of(target: str) -> PulumiStacks:
    """The Pulumi resource the configuration root builds for ``target``: what its programs
    may declare there."""
    settings = Settings(Path("homelab.yaml"), Target(target), Path("/nonexistent"))
    resource = build_deployment(settings, None).resources["pulumi"]
    assert isinstance(resource, PulumiStacks)
    return resource


def forge_program(inventory: Inventory, target: str = "twin"):
    pulumi = pulumi_of(target)
    return cluster_program(
        "forge",
        inventory.clusters["forge"],
        inventory.components,
        cluster_identifier=f"{target}.forge",
        install_charts=pulumi.install_charts,
        charts_note=pulumi.charts_note,
        kubeconfig="/tmp/kubeconfig",
        context="twin-forge",
    )


def test_cluster_declares_namespaces_node_patches_priority_and_quota(shipped_inventory):
    forge = shipped_inventory.clusters["forge"]
    mocks = run(forge_program(shipped_inventory))

    (provider,) = mocks.of_type("pulumi:providers:kubernetes")
    assert provider.inputs["context"] == "twin-forge"
    assert provider.inputs["kubeconfig"] == "/tmp/kubeconfig"
    names = {r.inputs["metadata"]["name"] for r in mocks.of_type("kubernetes:core/v1:Namespace")}
    assert names == set(forge.namespaces)
    patches = {
        r.inputs["metadata"]["name"]: r for r in mocks.of_type("kubernetes:core/v1:NodePatch")
    }
    assert set(patches) == {n.name for n in forge.expanded_nodes()}
    primary = patches["forge-training-primary"].inputs
    assert primary["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"
    assert primary["metadata"]["labels"]["role"] == "training"
    assert primary["metadata"]["annotations"]["pulumi.com/patchForce"] == "true"
    assert "spec" not in primary  # no declared taints: the node's taint list is not claimed
    (priority,) = mocks.of_type("kubernetes:scheduling.k8s.io/v1:PriorityClass")
    assert priority.inputs["metadata"]["name"] == GPU_PRIORITY_CLASS
    (quota,) = mocks.of_type("kubernetes:core/v1:ResourceQuota")
    assert quota.inputs["metadata"]["namespace"] == "ml-training"
    assert quota.inputs["spec"]["hard"] == {"requests.nvidia.com/gpu": "4"}
    objects = [r for r in mocks.resources if r.typ.startswith("kubernetes:")]
    assert all(
        r.inputs["metadata"]["annotations"]["pulumi.com/patchForce"] == "true" for r in objects
    ), [r.name for r in objects]


def test_twin_skips_every_component_with_the_reason(shipped_inventory):
    mocks = run(forge_program(shipped_inventory))
    assert mocks.of_type("kubernetes:helm.sh/v3:Release") == []
    twin = pulumi_of("twin")
    plans = component_plan(
        shipped_inventory.clusters["forge"],
        shipped_inventory.components,
        install=twin.install_charts,
        note=twin.charts_note,
    )
    assert [p.name for p in plans] == shipped_inventory.clusters["forge"].components
    assert not any(p.install for p in plans)
    linkerd = next(p for p in plans if p.name == "linkerd-crds")
    assert linkerd.reason == (
        "the twin cannot reach chart repositories; installed on the homelab target "
        "(chart repository https://helm.linkerd.io/stable)"
    )


def test_homelab_installs_components_as_helm_releases(shipped_inventory):
    mocks = run(forge_program(shipped_inventory, target="homelab"), stack="homelab.test")
    releases = {r.inputs["name"]: r.inputs for r in mocks.of_type("kubernetes:helm.sh/v3:Release")}
    assert set(releases) == set(shipped_inventory.clusters["forge"].components)
    cert_manager = releases["cert-manager"]
    assert cert_manager["chart"] == "cert-manager"
    assert cert_manager["version"] == "v1.16.2"
    assert cert_manager["repositoryOpts"]["repo"] == "https://charts.jetstack.io"
    assert cert_manager["values"] == {"crds": {"enabled": True}}


def test_taints_are_patched_only_where_declared(shipped_inventory):
    program = cluster_program(
        "air",
        shipped_inventory.clusters["air"],
        shipped_inventory.components,
        cluster_identifier="twin.air",
        install_charts=False,
        kubeconfig="/k",
        context="twin-air",
    )
    mocks = run(program)
    patches = {
        r.inputs["metadata"]["name"]: r.inputs
        for r in mocks.of_type("kubernetes:core/v1:NodePatch")
    }
    assert patches["air-control-plane"]["spec"]["taints"] == [
        {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}
    ]
    assert "spec" not in patches["air-platform"]
    assert mocks.of_type("kubernetes:scheduling.k8s.io/v1:PriorityClass") == []  # no GPUs


def link_program(inventory: Inventory, target: str = "twin"):
    link = next(lk for lk in inventory.mesh.links if lk.key == "studio__forge")
    ends = LinkEnds(
        from_access=("/k", "twin-studio"),
        to_access=("/k", "twin-forge"),
        to_server="https://127.0.0.1:16447",
        identity_prefix=target,
    )
    return mesh_link_program(
        link,
        ends,
        export_label=inventory.mesh.export_label,
        exported=[
            ExportedService("ml-inference", "vllm", ({"name": "http", "port": 8000},)),
            ExportedService("observability", "grafana", ({"port": 3000},)),
        ],
        from_namespaces=inventory.clusters["studio"].namespaces,
        linkerd_link=pulumi_of(target).linkerd_link,
    )


@pytest.mark.parametrize("target", ["twin", "homelab"])
def test_mesh_link_declares_access_on_to_and_mirrors_on_from(shipped_inventory, target):
    mocks = run(link_program(shipped_inventory, target), stack=f"{target}.mesh_link.studio__forge")
    providers = {r.name: r.inputs["context"] for r in mocks.of_type("pulumi:providers:kubernetes")}
    assert providers == {"forge": "twin-forge", "studio": "twin-studio"}
    (account,) = mocks.of_type("kubernetes:core/v1:ServiceAccount")
    assert account.inputs["metadata"] == {
        "name": "mesh-link-studio",
        "namespace": "linkerd-multicluster",
        "labels": {"app.kubernetes.io/managed-by": "homelab-dagster"},
        "annotations": {"pulumi.com/patchForce": "true"},
    }
    # Every object takes back its fields on a repair (no server-side apply conflict).
    objects = [r for r in mocks.resources if r.typ.startswith("kubernetes:")]
    assert objects and all(
        r.inputs["metadata"]["annotations"]["pulumi.com/patchForce"] == "true" for r in objects
    ), [r.name for r in objects]
    (role,) = mocks.of_type("kubernetes:rbac.authorization.k8s.io/v1:ClusterRole")
    resources = {r for rule in role.inputs["rules"] for r in rule["resources"]}
    assert resources == {"services", "endpoints", "endpointslices"}
    assert all(set(rule["verbs"]) == {"get", "list", "watch"} for rule in role.inputs["rules"])
    secrets = {r.inputs["metadata"]["name"]: r for r in mocks.of_type("kubernetes:core/v1:Secret")}
    token = secrets["mesh-link-studio-token"]
    assert token.inputs["type"] == "kubernetes.io/service-account-token"
    assert token.inputs["metadata"]["annotations"]["pulumi.com/waitFor"] == "jsonpath={.data.token}"
    assert token.provider.endswith("::forge::" + token.provider.rsplit("::", 1)[-1])
    credentials = secrets["cluster-credentials-forge"]
    assert credentials.provider.split("::")[-2] == "studio"
    string_data = credentials.inputs["stringData"]
    assert string_data[SECRET_SIG] == SECRET_VALUE_SIG  # a secret: masked in state and logs
    kubeconfig = yaml.safe_load(string_data["value"]["kubeconfig"])
    assert kubeconfig["clusters"][0]["cluster"] == {
        "server": "https://127.0.0.1:16447",
        "certificate-authority-data": CA,
    }
    assert kubeconfig["users"][0]["user"] == {"token": TOKEN}
    mirrors = {
        (r.inputs["metadata"]["namespace"], r.inputs["metadata"]["name"])
        for r in mocks.of_type("kubernetes:core/v1:Service")
    }
    assert mirrors == {("ml-inference", "vllm-forge"), ("observability", "grafana-forge")}
    # studio does not declare ml-inference: the link creates it; observability it declares.
    created = {r.inputs["metadata"]["name"] for r in mocks.of_type("kubernetes:core/v1:Namespace")}
    assert created == {"ml-inference"}
    links = mocks.of_type("kubernetes:multicluster.linkerd.io/v1alpha2:Link")
    assert len(links) == (0 if target == "twin" else 1)
    if links:
        assert links[0].inputs["spec"]["clusterCredentialsSecret"] == "cluster-credentials-forge"
        assert links[0].inputs["spec"]["selector"] == {
            "matchLabels": {"mirror.linkerd.io/exported": "true"}
        }


@pytest.mark.parametrize("target", ["twin", "homelab"])
def test_an_endpoints_copy_step_gets_its_keys_from_a_secret_its_stack_manages(
    shipped_inventory, target
):
    """The twin: a Secret of the generated keys, as Pulumi secrets (ciphertext in the state).
    The homelab: an ExternalSecret of the same name from the ClusterSecretStore."""
    from infra.endpoint import (
        ExternalKeys,
        ServedWeights,
        ServerRuntime,
        StoreKeys,
        WeightsSource,
        endpoint_program,
    )

    keys = StoreKeys("AKIATWIN", "s3cr3t") if target == "twin" else ExternalKeys()
    runtime = ServerRuntime(weights=WeightsSource(bucket_url="s3://ml-models", keys=keys))
    digest = "ab" * 32
    program = endpoint_program(
        "sre-agent",
        shipped_inventory.endpoints["sre-agent"],
        shipped_inventory.clusters["forge"],
        ServedWeights(digest, f"sre-agent/versions/{digest}"),
        runtime,
        kubeconfig="/tmp/kubeconfig",
        context="twin-forge",
        cluster_identifier=f"{target}.forge",
        export_label="mirror.linkerd.io/exported",
    )
    mocks = run(program)
    (deployment,) = mocks.of_type("kubernetes:apps/v1:Deployment")
    (copy,) = deployment.inputs["spec"]["template"]["spec"]["initContainers"]
    assert copy["envFrom"] == [{"secretRef": {"name": "sre-agent-weights-store"}}]
    if target == "twin":
        (secret,) = mocks.of_type("kubernetes:core/v1:Secret")
        assert secret.inputs["metadata"]["name"] == "sre-agent-weights-store"
        string_data = secret.inputs["stringData"]
        assert string_data[SECRET_SIG] == SECRET_VALUE_SIG  # masked in state and logs
        assert string_data["value"] == {
            "AWS_ACCESS_KEY_ID": "AKIATWIN",
            "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        }
        assert not mocks.of_type("kubernetes:external-secrets.io/v1beta1:ExternalSecret")
    else:
        (external,) = mocks.of_type("kubernetes:external-secrets.io/v1beta1:ExternalSecret")
        assert external.inputs["metadata"]["name"] == "sre-agent-weights-store"
        spec = external.inputs["spec"]
        assert spec["secretStoreRef"] == {"kind": "ClusterSecretStore", "name": "homelab"}
        assert spec["target"] == {"name": "sre-agent-weights-store"}
        assert [(d["secretKey"], d["remoteRef"]["property"]) for d in spec["data"]] == [
            ("AWS_ACCESS_KEY_ID", "access_key"),
            ("AWS_SECRET_ACCESS_KEY", "secret_key"),
        ]
        assert not mocks.of_type("kubernetes:core/v1:Secret")

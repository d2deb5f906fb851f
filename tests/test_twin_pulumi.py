"""The toolchain's Pulumi engine and Kubernetes provider, against the twin, by hand.

This exercises the toolchain alone (the Automation API, an inline program, a local file
backend); resources/pulumi.py's own tests go through the Dagster resource.
"""

from __future__ import annotations

import os
import subprocess

import pytest

pytestmark = pytest.mark.twin


def test_pulumi_version_is_the_pinned_one(toolchain):
    out = subprocess.run(
        [str(toolchain.pulumi), "version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == f"v{toolchain.versions['tools']['pulumi']['version']}"


def test_inline_program_creates_refreshes_and_destroys_a_configmap(twin, tmp_path, monkeypatch):
    import pulumi
    import pulumi_kubernetes as k8s
    from kubernetes import client
    from pulumi import automation as auto

    twin.up(["air"])
    for key, value in twin.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PULUMI_CONFIG_PASSPHRASE", "test-only-passphrase")
    monkeypatch.setenv("PULUMI_HOME", str(tmp_path / "pulumi-home"))
    (tmp_path / "backend").mkdir()

    def program() -> None:
        provider = k8s.Provider("twin-air", kubeconfig=str(twin.kubeconfig), context="twin-air")
        k8s.core.v1.ConfigMap(
            "probe",
            metadata={"name": "pulumi-probe", "namespace": "default", "labels": {"a": "1"}},
            data={"hello": "twin"},
            opts=pulumi.ResourceOptions(provider=provider),
        )

    stack = auto.create_or_select_stack(
        stack_name="twin.test.probe",
        project_name="homelab",
        program=program,
        opts=auto.LocalWorkspaceOptions(
            project_settings=auto.ProjectSettings(
                name="homelab",
                runtime="python",
                backend=auto.ProjectBackend(url=f"file://{tmp_path / 'backend'}"),
            ),
            env_vars={"PATH": os.environ["PATH"]},
        ),
    )
    core = client.CoreV1Api(twin.client("air"))
    try:
        up = stack.up()
        assert up.summary.resource_changes.get("create") == 3  # stack, provider, configmap
        cm = core.read_namespaced_config_map("pulumi-probe", "default")
        assert cm.data == {"hello": "twin"}

        core.patch_namespaced_config_map(
            "pulumi-probe", "default", {"metadata": {"labels": {"a": "2"}}}
        )
        refresh = stack.refresh()
        assert refresh.summary.resource_changes.get("update") == 1  # the drift, seen
        (state,) = [
            r
            for r in stack.export_stack().deployment["resources"]
            if r["type"] == "kubernetes:core/v1:ConfigMap"
        ]
        assert state["outputs"]["metadata"]["labels"] == {"a": "2"}

        stack.destroy()
        with pytest.raises(client.ApiException) as gone:
            core.read_namespaced_config_map("pulumi-probe", "default")
        assert gone.value.status == 404
    finally:
        stack.workspace.remove_stack("twin.test.probe", force=True)

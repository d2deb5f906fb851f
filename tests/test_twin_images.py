"""The twin's images: built from the lock file, pushed to the twin's registry, pulled by a real
node under the homelab's name; the Dockerfile kept in step with the builder.

The build needs root on Linux with mmdebstrap, umoci and skopeo (`make system-deps`) and the
network for Debian's packages the first time (about 2 min cold, then cached); the pod test
needs the real node (tests/test_twin_real.py). Elsewhere they skip with the reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from _twin_support import wait

from homelab_dagster.images import (
    APP_DIR,
    BASE_PACKAGES,
    IMAGES,
    MIRRORED_REGISTRIES,
    UV_SYNC_FLAGS,
    image_reference,
    mirror_hosts_toml,
    registry_path,
)

NODE = "forge-inference"
PROJECT = IMAGES["homelab-dagster"]


# ----------------------------------------------------------------------------- no build


def _dockerfile(project_root: Path) -> str:
    return (project_root / "Dockerfile").read_text()


def test_the_dockerfile_installs_the_same_debian_packages_and_runs_the_same_uv_sync(project_root):
    text = _dockerfile(project_root)
    apt, homelab_only = re.findall(r"apt-get install -y --no-install-recommends ([^\\\n&]+)", text)
    assert tuple(apt.split()) == BASE_PACKAGES
    assert homelab_only.split() == ["git"]  # the Git sensor's, in the homelab's daemon
    assert "FROM debian:bookworm-slim" in text
    # uv's two steps, as infra/images.py runs them: the dependencies, then the project.
    dependencies, project = re.findall(r"uv sync ([^\n]+)", text)
    assert tuple(dependencies.split()) == (*UV_SYNC_FLAGS, "${UV_EXTRAS}", "--no-install-project")
    assert tuple(project.split()) == (*UV_SYNC_FLAGS, "${UV_EXTRAS}")
    assert text.index("COPY pyproject.toml uv.lock ./") < text.index("--no-install-project")
    assert text.index("--no-install-project") < text.index("COPY homelab_dagster")
    # Each image of this project is that build with its extras as UV_EXTRAS.
    for spec in IMAGES.values():
        if spec.project == ".":
            extras = " ".join(spec.sync_flags[len(UV_SYNC_FLAGS) :])
            arg = f"--build-arg UV_EXTRAS={extras} " if extras else ""
            assert f"docker build {arg}-t {spec.reference} ." in text, spec.name
    assert f"UV_PROJECT_ENVIRONMENT={APP_DIR}/.venv" in text
    assert f"WORKDIR {APP_DIR}" in text
    copied = set()
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        copied.update(sources.split())
    assert copied == {"pyproject.toml", "uv.lock", *PROJECT.sources}


def test_the_homelabs_image_holds_the_toolchains_pulumi_and_provider_versions(project_root):
    """The homelab's step pods run Pulumi from the image (the twin's mount the toolchain):
    the CLI and the Kubernetes provider at the versions pinned in infra/tools/versions.toml,
    the provider on PATH."""
    from infra.toolchain import load_versions

    text = _dockerfile(project_root)
    tools = load_versions()["tools"]
    cli, provider = tools["pulumi"]["version"], tools["pulumi-kubernetes"]["version"]
    assert f"FROM pulumi/pulumi-base:{cli} AS pulumi" in text
    (installed,) = re.findall(r"pulumi plugin install resource kubernetes v(\S+)", text)
    assert installed == provider
    assert f"resource-kubernetes-v{provider}/pulumi-resource-kubernetes" in text
    (copied,) = re.findall(r"^COPY --from=pulumi (.+) /usr/local/bin/$", text, flags=re.M)
    assert copied.split() == ["/pulumi/bin/pulumi", "/pulumi/bin/pulumi-resource-kubernetes"]


def test_each_image_is_tagged_with_its_projects_version():
    for spec in IMAGES.values():
        assert spec.tag == spec.version(), spec.name


def test_image_references_are_the_homelabs_names_and_map_into_the_twins_registry():
    assert image_reference("homelab-dagster") == "ghcr.io/homelab/homelab-dagster:0.1.0"
    assert image_reference("vllm-cpu") == "ghcr.io/homelab/vllm-cpu:0.32.0"
    with pytest.raises(KeyError, match="known: homelab-dagster, homelab-training, vllm-cpu"):
        image_reference("nope")
    assert registry_path("ghcr.io/homelab/x:1") == "ghcr.io/homelab/x:1"
    assert registry_path("busybox:1.36") == "docker.io/library/busybox:1.36"
    assert registry_path("docker.io/vllm/vllm-openai:v1") == "docker.io/vllm/vllm-openai:v1"


def test_the_mirror_configuration_sends_a_registry_to_the_twins_registry_and_nowhere_else():
    config = tomllib.loads(mirror_hosts_toml("ghcr.io", "127.0.0.1:5000"))
    # The twin's registry is the host tried first and the server containerd falls through to
    # (a name the twin lacks was asked of ghcr.io, and failed on DNS after its timeouts).
    twins = {"capabilities": ["pull", "resolve"], "override_path": True}
    assert config == {
        "server": "http://127.0.0.1:5000/v2/ghcr.io",
        **twins,
        "host": {"http://127.0.0.1:5000/v2/ghcr.io": twins},
    }


def test_twin_up_puts_in_the_registry_the_images_the_pods_on_its_clusters_pull(
    project_root, shipped_inventory, tmp_path
):
    """What `homelab twin up` pushes, per cluster started; and where a step asks for its
    image (the twin's registry, beside the clusters' ports) or does not (the homelab)."""
    from homelab_dagster.settings import Settings, Target
    from resources.deployment import build_deployment
    from resources.training_pods import PodTrainingLauncher

    def deployment(target: Target):
        settings = Settings(project_root / "homelab.yaml", target, tmp_path, twin_port_base=20443)
        return build_deployment(settings, shipped_inventory)

    twin = deployment(Target.TWIN)
    # Forge's endpoints: vLLM's server, and the copy step (the project's image); its training
    # pods, where they run (real nodes: root on Linux; else a local process, no image).
    pods = isinstance(twin.resources["training"], PodTrainingLauncher)
    assert twin.pulled_images(shipped_inventory, ["forge"]) == [
        image_reference("vllm-cpu"),
        image_reference("homelab-dagster"),
        *([image_reference("homelab-training")] if pods else []),
    ]
    assert twin.pulled_images(shipped_inventory, ["studio"]) == [image_reference("homelab-dagster")]
    assert twin.pulled_images(shipped_inventory, ["pi", "air"]) == []
    assert twin.resources["image_registry"].address == "127.0.0.1:20483"  # 20443 + 8 x 5

    homelab = deployment(Target.HOMELAB)
    assert set(homelab.pulled_images(shipped_inventory, shipped_inventory.clusters)) == {
        *(e.image for e in shipped_inventory.endpoints.values()),
        image_reference("homelab-dagster"),
        image_reference("homelab-training"),
    }
    assert homelab.resources["image_registry"].address == ""
    assert homelab.resources["image_registry"].require("ghcr.io/homelab/absent:1") is None


# ----------------------------------------------------------------------------- built


@pytest.fixture(scope="module")
def project_image():
    """The project's image, built (or found in the cache) from the lock file."""
    from infra.images import ImageBuilder, missing_tools

    why = missing_tools()
    if why:
        pytest.skip(why)
    builder = ImageBuilder()
    return builder, builder.build(PROJECT)


def _uv_export(project_root: Path) -> dict[str, str]:
    """``uv export --frozen --no-dev`` of the lock: name -> version, for this platform."""
    from packaging.markers import Marker

    uv = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    out = subprocess.run(
        [uv, "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project"],
        cwd=project_root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    wanted = {}
    for line in out.splitlines():
        if not line or line.startswith(("#", " ", "-")):
            continue
        requirement, _, marker = line.partition(" ; ")
        if marker and not Marker(marker).evaluate({"python_full_version": "3.11.2"}):
            continue
        name, _, version = requirement.partition("==")
        wanted[re.sub(r"[-_.]+", "-", name).lower()] = version
    return wanted


def _pod_on_node(name: str, container: dict) -> dict:
    """A pod of one container ``main`` on the real node, run once."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "containers": [{"name": "main", **container}],
        },
    }


# A build may wait for another one holding the cache's lock (the vLLM image: minutes).
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_image_installs_exactly_the_lock_file(project_image, project_root):
    _builder, image = project_image
    installed = {re.sub(r"[-_.]+", "-", k): v for k, v in image.distributions.items()}
    assert installed.pop("homelab-dagster") == "0.1.0"  # the project itself, as a wheel
    assert installed == _uv_export(project_root)


@pytest.mark.slow
@pytest.mark.twin
@pytest.mark.timeout(1800)
def test_a_pod_pulls_the_project_image_by_its_homelab_name_and_runs_it(real_forge, project_image):
    from kubernetes import client

    builder, image = project_image
    builder.push(image, real_forge.registry)
    repository, _, tag = registry_path(PROJECT.reference).rpartition(":")
    assert real_forge.registry.manifest_digest(repository, tag) == image.digest
    (spec,) = [s for s in real_forge.real_nodes("forge") if s.name == NODE]
    for host in MIRRORED_REGISTRIES:
        assert real_forge.registry.address in spec.path("certs.d", host, "hosts.toml").read_text()

    core = client.CoreV1Api(real_forge.client("forge"))
    code = (
        "import homelab_dagster.images as i, importlib.metadata as m; "
        "print('homelab-dagster', m.version('homelab-dagster'), i.image_reference('vllm-cpu'))"
    )
    pod = _pod_on_node(
        "project-image",
        {
            "image": PROJECT.reference,
            "imagePullPolicy": "Always",  # through the mirror, every time
            # From /: the installed wheel is imported, not the sources in /app.
            "workingDir": "/",
            "command": ["python", "-c", code],
        },
    )
    core.create_namespaced_pod("default", pod)
    try:
        done = wait(
            lambda: (
                core.read_namespaced_pod("project-image", "default").status.phase
                in ("Succeeded", "Failed")
            ),
            timeout=180,
        )
        status = core.read_namespaced_pod("project-image", "default").status
        logs = core.read_namespaced_pod_log(
            "project-image", "default", _preload_content=False
        ).data.decode()
        assert done and status.phase == "Succeeded", (logs, status)
        assert logs.strip() == "homelab-dagster 0.1.0 ghcr.io/homelab/vllm-cpu:0.32.0"
        assert PROJECT.reference in real_forge.real.images(spec)
    finally:
        core.delete_namespaced_pod("project-image", "default", grace_period_seconds=0)


@pytest.mark.slow
@pytest.mark.twin
@pytest.mark.timeout(1800)
def test_an_unchanged_lock_file_costs_no_build_and_no_push(real_forge, project_image):
    builder, _image = project_image
    # Twice in a row: the second must cost nothing. (The first rebuilds if a source changed
    # since the fixture built; a pair whose sources changed in between is tried again.)
    for _ in range(3):
        first = builder.push(builder.build(PROJECT), real_forge.registry)
        again = builder.push(builder.build(PROJECT), real_forge.registry)
        if again.tag == first.tag:
            break
    assert again.tag == first.tag, "the project's sources kept changing during the test"
    assert (again.built, again.pushed) == (False, False), again
    assert again.digest == first.digest


# ----------------------------------------------------------------------------- missing images


@pytest.mark.twin
def test_a_name_the_twins_registry_lacks_fails_to_pull_at_once_and_never_asks_the_internet(
    real_forge,
):
    """A homelab name the twin's registry lacks fails with the registry's own answer (`not
    found`), not after containerd fell through to the internet (`lookup ghcr.io: no such
    host`, the message a user met after a purge)."""
    from kubernetes import client

    core = client.CoreV1Api(real_forge.client("forge"))
    pod = _pod_on_node("never-built", {"image": "ghcr.io/homelab/never-built:0"})
    core.create_namespaced_pod("default", pod)

    def waiting():
        statuses = core.read_namespaced_pod("never-built", "default").status.container_statuses
        state = statuses[0].state.waiting if statuses else None
        return state if state and "ImagePull" in (state.reason or "") else None

    try:
        state = wait(waiting, timeout=120)
        assert state, "the pod never reported a failed pull"
        message = state.message or ""
        assert "ghcr.io/homelab/never-built:0" in message and "not found" in message, message
        assert "no such host" not in message and "lookup" not in message, message
    finally:
        core.delete_namespaced_pod("never-built", "default", grace_period_seconds=0)


@pytest.mark.twin
def test_the_registry_names_a_missing_image_with_its_command_and_lists_what_it_holds(
    real_forge, tmp_path
):
    from homelab_dagster.errors import ImageMissingError
    from homelab_dagster.twin_registry import RegistryClient

    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists() or not shutil.which("skopeo"):
        pytest.skip("busybox and skopeo are needed (`make system-deps`)")
    real_forge.registry.up()
    registry = RegistryClient(real_forge.registry.address)

    # An image of the project's: the command that builds it from its lock file.
    with pytest.raises(ImageMissingError) as missing:
        registry.require("ghcr.io/homelab/vllm-cpu:not-a-tag")
    assert "image ghcr.io/homelab/vllm-cpu:not-a-tag is not in the twin's registry" in str(
        missing.value
    )
    assert "skopeo copy" in missing.value.command  # no lock file here builds that tag
    assert "no lock file here builds it; push it there: `skopeo copy" in str(missing.value)
    for name, spec in IMAGES.items():
        if spec.reference not in registry.images():
            with pytest.raises(ImageMissingError) as ours:
                registry.require(spec.reference)
            assert ours.value.command == f"homelab twin images {name}"

    # One pushed by hand is found, with its digest, under the homelab's name.
    from homelab_dagster.images import oci_archive

    archive = tmp_path / "tiny.tar"
    archive.write_bytes(oci_archive("ghcr.io/homelab/tiny:1", {"bin/busybox": Path(busybox)}))
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"oci-archive:{archive}",
            f"docker://{registry.address}/ghcr.io/homelab/tiny:1",
        ],
        check=True,
    )
    digest = registry.require("ghcr.io/homelab/tiny:1")
    assert digest.startswith("sha256:")
    assert registry.images()["ghcr.io/homelab/tiny:1"] == digest

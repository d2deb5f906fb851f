"""The twin's toolchain: Pulumi CLI, Kubernetes control plane, KWOK, the Pulumi Kubernetes
provider plugin, the S3 object store (versitygw) and etcd, pinned in
infra/tools/versions.toml; and, for the twin's real nodes, the kubelet and the pause binary
(optional: without them every twin node is a KWOK node).

Go tools are built from their modules through the Go module proxy (release downloads are not
reachable) into ${XDG_CACHE_HOME:-~/.cache}/homelab-dagster/tools/<name>-<version>/bin/, so a
second run costs nothing. A binary already on PATH at the pinned version is used as it is.
Every binary is verified by running it before it is trusted. See docs/toolchain.md.

    python -m infra.toolchain            # build what is missing, print a table
    python -m infra.toolchain --check    # report only; exit 1 if something is missing
    python -m infra.toolchain --env      # export lines for a shell
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from homelab_dagster.errors import ToolchainError
from infra.tools import build_steps as steps

VERSIONS_FILE = Path(__file__).resolve().parent / "tools" / "versions.toml"
# pulumi first: the provider plugin is verified by `pulumi package get-schema <plugin>`.
# kubelet after kubernetes: it reuses that build's Go cache (the same module).
BUILD_ORDER = (
    "pulumi",
    "kubernetes",
    "kwok",
    "pulumi-kubernetes",
    "versitygw",
    "kubelet",
    "pause",
)
# Cold build minutes measured on the 2-core machine (docs/toolchain.md), for the warning only.
COLD_MINUTES = {
    "pulumi": 6,
    "kubernetes": 7,
    "kwok": 3,
    "pulumi-kubernetes": 10,
    "versitygw": 3,
    "kubelet": 3,
    "pause": 1,
}


def load_versions(path: Path = VERSIONS_FILE) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ToolchainError("versions.toml", f"cannot read {path}: {e}") from e


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "homelab-dagster" / "tools"


@dataclass
class Toolchain:
    pulumi: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    kwok: Path
    kwokctl: Path
    # Debian's etcd, for the twin's control planes; None where it is not installed (a step
    # pod needs Pulumi only): :meth:`kwokctl_create_args` then says how to install it.
    etcd: Path | None
    pulumi_kubernetes: Path  # the plugin binary pulumi-resource-kubernetes
    pulumi_python: Path | None  # pulumi-resource-pulumi-python, for Python dynamic providers
    versitygw: Path  # the twin's S3 object store (homelab_dagster/twin_store.py)
    bin_dirs: list[Path]
    # Real nodes only (optional tools: None when not built, and every twin node is a KWOK node).
    kubelet: Path | None = None
    pause: Path | None = None
    versions: dict[str, Any] = field(repr=False, default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # tool -> "PATH" | "cached" | "built"

    def env(self, pulumi_home: Path | str | None = None) -> dict[str, str]:
        """Variables to add to a child's environment.

        With `pulumi_home`, the Kubernetes provider is installed into its plugin cache
        (install_plugins) and left off PATH: the engine then uses it without a warning, but
        only for the Python SDK at the same version (pulumi-kubernetes==<plugin version>).
        Without it, the plugin is found on PATH ("ambient"): any SDK version gets it, and
        the engine prints "warning: using pulumi-resource-kubernetes from $PATH".
        """
        t = self.versions["tools"]
        dirs = list(self.bin_dirs)
        extra = {}
        if pulumi_home is not None:
            self.install_plugins(pulumi_home)
            others = {self.pulumi, self.kwokctl, self.kubectl, self.pulumi_python}
            if not any(p and p.parent == self.pulumi_kubernetes.parent for p in others):
                dirs.remove(self.pulumi_kubernetes.parent)
            extra["PULUMI_HOME"] = str(pulumi_home)
        return {
            "PATH": os.pathsep.join([*map(str, dirs), os.environ.get("PATH", "")]),
            "PULUMI_SKIP_UPDATE_CHECK": "true",
            "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
            **extra,
            "KWOK_RUNTIME": "binary",
            "KWOK_KUBE_VERSION": f"v{t['kubernetes']['version']}",
            "KWOK_KUBE_APISERVER_BINARY": str(self.kube_apiserver),
            "KWOK_KUBE_CONTROLLER_MANAGER_BINARY": str(self.kube_controller_manager),
            "KWOK_KUBE_SCHEDULER_BINARY": str(self.kube_scheduler),
            "KWOK_KUBECTL_BINARY": str(self.kubectl),
            "KWOK_CONTROLLER_BINARY": str(self.kwok),
            **({"KWOK_ETCD_BINARY": str(self.etcd)} if self.etcd else {}),
            "KWOK_ETCD_VERSION": t["etcd"]["version"],
        }

    def install_plugins(self, pulumi_home: Path | str) -> Path:
        """Link the provider into $PULUMI_HOME/plugins/resource-kubernetes-v<version>/."""
        version = self.versions["tools"]["pulumi-kubernetes"]["version"]
        return steps.link_plugin(Path(pulumi_home), "kubernetes", version, self.pulumi_kubernetes)

    def kwokctl_create_args(self, name: str, kubeconfig: Path | str) -> list[str]:
        """`kwokctl create cluster` with every binary set, so that it never downloads.

        kwokctl has no --kube-version/--etcd-version flags: env() sets KWOK_KUBE_VERSION and
        KWOK_ETCD_VERSION (our kwokctl's default kube version is ours anyway, see ldflags).

        Raises:
            ToolchainError: etcd is not installed.
        """
        if self.etcd is None:
            try:
                steps.find_etcd(self.versions["tools"]["etcd"])
            except steps.StepError as e:
                raise ToolchainError(e.tool, e.reason) from e
        flags = {
            "--name": name,
            "--kubeconfig": str(kubeconfig),
            "--runtime": "binary",
            "--kube-apiserver-binary": str(self.kube_apiserver),
            "--kube-controller-manager-binary": str(self.kube_controller_manager),
            "--kube-scheduler-binary": str(self.kube_scheduler),
            "--kwok-controller-binary": str(self.kwok),
            "--etcd-binary": str(self.etcd),
            "--wait": "120s",
        }
        return [str(self.kwokctl), "create", "cluster", *(x for kv in flags.items() for x in kv)]


# --------------------------------------------------------------------------- resolution


def _stamp_ok(stamp: Path, bins: dict[str, Path], want: str) -> bool:
    try:
        data = json.loads(stamp.read_text())
        for b, p in bins.items():
            st, rec = p.stat(), data["binaries"][b]
            if (st.st_size, st.st_mtime_ns, rec["version"]) != (rec["size"], rec["mtime_ns"], want):
                return False
        return True
    except (OSError, ValueError, KeyError):
        return False


def _verify(name: str, bins: dict[str, Path], want: str, pulumi: Path | None) -> dict:
    """Run each binary; raise StepError unless every one reports `want`."""
    record = {}
    for b, p in bins.items():
        got = steps.binary_version(b, p, pulumi)
        if got != want:
            raise steps.StepError(name, f"{p} reports version {got!r}, expected {want!r}")
        st = p.stat()
        record[b] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": got}
    return record


def _on_path(
    name: str, binaries: list[str], want: str, pulumi: Path | None
) -> dict[str, Path] | None:
    root = str(cache_root())
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not d.startswith(root)]
    found = {b: shutil.which(b, path=os.pathsep.join(dirs)) for b in binaries}
    if not all(found.values()):
        return None
    bins = {b: Path(p) for b, p in found.items() if p}
    try:
        _verify(name, bins, want, pulumi)
    except steps.StepError:
        return None
    return bins


def _build(
    name: str, versions: dict, final: Path, progress: Any, pulumi: Path | None
) -> float | None:
    """Build one tool into `final`; None if another process built it meanwhile."""
    spec = versions["tools"][name]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    task = progress.add_task(f"building {name} {spec['version']}", total=None, pkg="")
    with (root / f".{final.name}.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another ensure_toolchain() builds it: wait, then reuse
            progress.update(task, description=f"waiting for another process building {name}")
            fcntl.flock(lock, fcntl.LOCK_EX)
            bins = {b: final / "bin" / b for b in spec["binaries"]}
            if _stamp_ok(final / "verified.json", bins, spec["version"]):
                progress.remove_task(task)
                return None
            progress.update(task, description=f"building {name} {spec['version']}")
        for stale in root.glob(f".{final.name}.tmp-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        try:
            return _build_locked(name, versions, final, progress, pulumi, task)
        finally:
            progress.remove_task(task)


def _build_locked(
    name: str, versions: dict, final: Path, progress: Any, pulumi: Path | None, task: Any
) -> float:
    spec = versions["tools"][name]
    root = cache_root()
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    (tmp / "bin").mkdir(parents=True)
    count = [0]

    def on_line(line: str) -> None:
        count[0] += 1
        progress.update(task, pkg=f"[dim]{count[0]} packages compiled, last {line[-50:]}")

    start = time.monotonic()
    try:
        steps.go_build(
            name, spec, versions, tmp / "bin", root / "logs" / f"{final.name}.log", on_line
        )
        seconds = time.monotonic() - start
        progress.update(task, description=f"verifying {name} {spec['version']}", pkg="")
        bins = {b: tmp / "bin" / b for b in spec["binaries"]}
        record = _verify(name, bins, spec["version"], pulumi)
        (tmp / "verified.json").write_text(
            json.dumps(
                {"binaries": record, "build_seconds": round(seconds, 1), "built_at": time.time()},
                indent=1,
            )
        )
        if final.exists():  # stale or broken: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return seconds


def ensure_toolchain(
    *, build: bool = True, console: Any = None, python: str | None = None
) -> Toolchain:
    """Find, reuse or build every tool; raise ToolchainError naming the tool that failed."""
    from rich.console import Console

    console = console or Console(stderr=True)
    versions = load_versions()
    tools = versions["tools"]
    found, sources, todo = _find(versions)
    if not build:  # the real nodes' tools are optional: the twin falls back to KWOK nodes
        for name in [n for n in todo if tools[n].get("optional")]:
            todo.remove(name)
            sources[name] = "missing"
        if todo:
            raise ToolchainError(
                ", ".join(todo),
                "not built; run `python -m infra.toolchain` "
                f"(cold build: about {sum(COLD_MINUTES[n] for n in todo)} min on 2 cores)",
            )
    if todo:
        _build_missing(todo, versions, found, sources, console)
    return _assemble(found, sources, versions, python)


def _pulumi_of(found: dict[str, dict[str, Path]]) -> Path | None:
    """The pulumi binary found so far (it verifies the provider plugin), if any."""
    return found["pulumi"]["pulumi"] if "pulumi" in found else None


def _find(versions: dict[str, Any]) -> tuple[dict[str, dict[str, Path]], dict[str, str], list[str]]:
    """Each tool on PATH at its pinned version, or in the cache (verified once): what was found,
    where from, and what is left to build, in build order."""
    tools = versions["tools"]
    root = cache_root()
    found: dict[str, dict[str, Path]] = {}
    sources: dict[str, str] = {}
    todo: list[str] = []
    for name in BUILD_ORDER:
        spec = tools[name]
        bins = _on_path(name, list(spec["binaries"]), spec["version"], _pulumi_of(found))
        if bins:
            found[name], sources[name] = bins, "PATH"
            continue
        final = root / f"{name}-{spec['version']}"
        cached = {b: final / "bin" / b for b in spec["binaries"]}
        if all(p.exists() for p in cached.values()):
            if not _stamp_ok(final / "verified.json", cached, spec["version"]):
                try:
                    record = _verify(name, cached, spec["version"], _pulumi_of(found))
                    (final / "verified.json").write_text(json.dumps({"binaries": record}))
                except steps.StepError:
                    cached = {}
            if cached:
                found[name], sources[name] = cached, "cached"
        if name not in found:
            todo.append(name)
    return found, sources, todo


def _build_missing(
    todo: list[str],
    versions: dict[str, Any],
    found: dict[str, dict[str, Path]],
    sources: dict[str, str],
    console: Any,
) -> None:
    """Build ``todo`` in order, with a progress display, adding each to ``found``."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    tools = versions["tools"]
    root = cache_root()
    minutes = sum(COLD_MINUTES[n] for n in todo)
    console.print(
        f"[bold]Building {', '.join(todo)} from Go modules[/] into {root}.\n"
        f"A cold build takes about {minutes} minutes on 2 cores (later runs reuse the "
        "cache and cost nothing). Logs: " + str(root / "logs")
    )
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(
        *columns, TextColumn("{task.fields[pkg]}"), console=console, transient=True
    ) as progress:
        for name in todo:
            spec = tools[name]
            final = root / f"{name}-{spec['version']}"
            try:
                seconds = _build(name, versions, final, progress, _pulumi_of(found))
            except steps.StepError as e:
                raise ToolchainError(e.tool, e.reason) from e
            found[name] = {b: final / "bin" / b for b in spec["binaries"]}
            if seconds is None:
                sources[name] = "cached"
                console.print(f"  {name} {spec['version']}: built by another process")
            else:
                sources[name] = f"built in {seconds / 60:.1f} min"
                console.print(f"  built {name} {spec['version']} in {seconds:.0f} s")


def _assemble(
    found: dict[str, dict[str, Path]],
    sources: dict[str, str],
    versions: dict[str, Any],
    python: str | None,
) -> Toolchain:
    """The toolchain from what was found or built, with etcd and the Python plugin."""
    tools = versions["tools"]
    try:
        plugin = steps.write_python_plugin(cache_root(), python or sys.executable)
    except steps.StepError as e:
        raise ToolchainError(e.tool, e.reason) from e
    try:
        etcd: Path | None = steps.find_etcd(tools["etcd"])
        sources["etcd"] = "PATH"
    except steps.StepError:
        etcd, sources["etcd"] = None, "missing"  # only the control planes need it
    bin_dirs = list(
        dict.fromkeys(
            p.parent
            for name, bins in found.items()
            if not tools[name].get("optional")  # the twin runs them by path, never from PATH
            for p in bins.values()
        )
    )
    bin_dirs.append(plugin.parent)
    k = found["kubernetes"]
    optional = {b: p for n in ("kubelet", "pause") for b, p in found.get(n, {}).items()}
    return Toolchain(
        pulumi=found["pulumi"]["pulumi"],
        kube_apiserver=k["kube-apiserver"],
        kube_controller_manager=k["kube-controller-manager"],
        kube_scheduler=k["kube-scheduler"],
        kubectl=k["kubectl"],
        kwok=found["kwok"]["kwok"],
        kwokctl=found["kwok"]["kwokctl"],
        etcd=etcd,
        pulumi_kubernetes=found["pulumi-kubernetes"]["pulumi-resource-kubernetes"],
        pulumi_python=plugin,
        versitygw=found["versitygw"]["versitygw"],
        bin_dirs=bin_dirs,
        kubelet=optional.get("kubelet"),
        pause=optional.get("pause"),
        versions=versions,
        sources=sources,
    )


# --------------------------------------------------------------------------- CLI


def _report(console: Any, versions: dict, tc: Toolchain | None, error: Exception | None) -> None:
    from rich.table import Table

    table = Table(title="homelab-dagster toolchain")
    for col in ("tool", "version", "source"):
        table.add_column(col, no_wrap=True)
    table.add_column("path", overflow="fold")
    for name, spec in versions["tools"].items():
        for b in spec["binaries"]:
            path = getattr(tc, b.replace("-", "_"), None) if tc else None
            if b == "pulumi-resource-kubernetes" and tc:
                path = tc.pulumi_kubernetes
            src = tc.sources.get(name, "") if tc else "[red]missing"
            if src == "missing":
                src = "[yellow]missing: real nodes fall back to KWOK nodes"
            table.add_row(b, spec["version"], src, str(path or ""))
    if tc and tc.pulumi_python:
        table.add_row("pulumi-resource-pulumi-python", "-", "written", str(tc.pulumi_python))
    console.print(table)
    for name, spec in versions["tools"].items():
        if "tools_module" in spec:
            for problem in steps.check_tools_module(name, spec):
                console.print(f"[yellow]warning:[/] {problem}")
    if error:
        console.print(f"[red bold]error:[/] {error}")


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    parser = argparse.ArgumentParser(
        prog="python -m infra.toolchain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--check", action="store_true", help="only report; build nothing")
    parser.add_argument("--env", action="store_true", help="print `export` lines for a shell")
    args = parser.parse_args(argv)
    console = Console(stderr=args.env)
    versions = load_versions()
    try:
        tc: Toolchain | None = ensure_toolchain(build=not args.check, console=console)
        error = None
        if tc is not None and tc.etcd is None:  # the twin's control planes need it
            try:
                steps.find_etcd(versions["tools"]["etcd"])
            except steps.StepError as missing:
                error = ToolchainError(missing.tool, missing.reason)
    except ToolchainError as e:
        tc, error = None, e
    if args.env and tc:
        for key, val in tc.env().items():
            print(f"export {key}='{val}'")
    else:
        _report(console, versions, tc, error)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())

"""How each tool of the twin is built from its Go module and how a binary is verified.

Stdlib only. Used by infra/toolchain.py, which owns the cache, the PATH look-up and the display.
Every function that fails raises StepError(tool, reason); toolchain.py turns it into
ToolchainError. docs/toolchain.md explains the routes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent


class StepError(Exception):
    def __init__(self, tool: str, reason: str) -> None:
        super().__init__(f"{tool}: {reason}")
        self.tool = tool
        self.reason = reason


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# --------------------------------------------------------------------------- go


def go_env(versions: dict) -> dict[str, str]:
    """Environment for every `go` command: the pinned GOTOOLCHAIN, modules from the proxy."""
    env = dict(os.environ)
    env.setdefault("CGO_ENABLED", "0")
    gotoolchain = versions.get("go", {}).get("gotoolchain", "")
    env["GOTOOLCHAIN"] = gotoolchain or "local"
    return env


def find_go(versions: dict) -> str:
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None
    )
    if not go:
        raise StepError(
            "go",
            "no `go` on PATH (nor /usr/local/go/bin/go); install Go >= "
            + versions.get("go", {}).get("go_min", "1.26"),
        )
    if not versions.get("go", {}).get("gotoolchain"):
        out = subprocess.run(
            [go, "env", "GOVERSION"], capture_output=True, text=True
        ).stdout.strip()
        have = _vtuple(out.removeprefix("go"))
        need = _vtuple(versions.get("go", {}).get("go_min", "0"))
        if have < need:
            raise StepError(
                "go",
                f"{out} is older than go{'.'.join(map(str, need))}, which the "
                "tools modules need; set [go] gotoolchain in infra/tools/versions.toml",
            )
    return go


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def module_info(go: str, env: dict, module: str, version: str) -> dict:
    """`go mod download -json` of one module version (also puts it in the module cache)."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "go.mod").write_text("module probe\n\ngo 1.24\n")
        res = subprocess.run(
            [go, "mod", "download", "-json", f"{module}@{version}"],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
        )
    if res.returncode != 0:
        raise StepError(
            module, f"go mod download {module}@{version} failed:\n{tail(res.stderr + res.stdout)}"
        )
    return json.loads(res.stdout)


def check_tools_module(name: str, spec: dict) -> list[str]:
    """Differences between versions.toml and infra/tools/<tools_module>/go.mod (empty = in sync)."""
    gomod = TOOLS_DIR / spec["tools_module"] / "go.mod"
    if not gomod.exists():
        return [f"{gomod} is missing"]
    text = gomod.read_text()
    problems = []
    want = {spec["module"]: spec["module_version"]}
    for m in spec.get("also_requires", []):
        want[m] = spec["module_version"]
    for mod, ver in want.items():
        if not re.search(rf"^\s*(require\s+)?{re.escape(mod)}\s+{re.escape(ver)}\b", text, re.M):
            problems.append(
                f"{gomod.relative_to(TOOLS_DIR.parent.parent)} does not require {mod} {ver}"
            )
    if "staging_version" in spec:
        found = set(re.findall(r"=>\s*k8s\.io/\S+\s+(v\S+)", text))
        if found != {spec["staging_version"]}:
            problems.append(
                f"{gomod.name}: staging replaces are at {sorted(found)}, "
                f"not {spec['staging_version']}"
            )
    return problems


def ldflags(name: str, versions: dict, info: dict | None) -> str:
    spec = versions["tools"][name]
    v = spec["version"]
    name = spec.get("ldflags_as", name)  # the kubelet: the control plane's flags
    flags = ["-s", "-w"]
    if name == "pulumi":
        flags.append(f"-X github.com/pulumi/pulumi/sdk/v3/go/common/version.Version=v{v}")
    elif name == "kubernetes":
        major, minor = v.split(".")[:2]
        date = (info or {}).get("Time", "1970-01-01T00:00:00Z").replace(".000", "")
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
            for key, val in (
                ("gitVersion", f"v{v}"),
                ("gitMajor", major),
                ("gitMinor", minor),
                ("gitCommit", ""),
                ("gitTreeState", "clean"),
                ("buildDate", date),
            ):
                flags.append(f"-X {pkg}.{key}={val}")
    elif name == "kwok":
        # kwokctl's default --kube-version: ours, not the one kwok was released with.
        k8s = versions["tools"]["kubernetes"]["version"]
        flags.append(f"-X sigs.k8s.io/kwok/pkg/consts.Version=v{v}")
        flags.append(f"-X sigs.k8s.io/kwok/pkg/consts.KubeVersion={k8s}")
    elif name == "pulumi-kubernetes":
        flags.append(f"-X github.com/pulumi/pulumi-kubernetes/provider/v4/pkg/version.Version={v}")
    elif name == "versitygw":  # what its Makefile sets; `versitygw --version` prints it
        flags.append(f"-X main.Version=v{v}")
    return " ".join(flags)


def go_build(
    name: str,
    spec: dict,
    versions: dict,
    out_bin: Path,
    log: Path,
    on_line: Callable[[str], None] | None = None,
) -> None:
    """Build every binary of one tool into out_bin (a fresh temporary directory)."""
    go = find_go(versions)
    env = go_env(versions)
    if spec.get("builder") == "cc":
        cc_build(
            name, spec, module_info(go, env, spec["module"], spec["module_version"]), out_bin, log
        )
        return
    problems = check_tools_module(name, spec)
    if problems:
        raise StepError(name, "tools module out of sync with versions.toml: " + "; ".join(problems))
    src = TOOLS_DIR / spec["tools_module"]
    info = None
    with tempfile.TemporaryDirectory(prefix=f"build-{name}-") as tmp:
        workdir = src
        if name == "pulumi-kubernetes":
            info = module_info(go, env, spec["module"], spec["module_version"])
            workdir = Path(tmp, "src")
            shutil.copytree(src, workdir)
            _write_provider_schema(Path(info["Dir"]), workdir, spec["version"])
        elif spec.get("ldflags_as", name) == "kubernetes":
            info = module_info(go, env, spec["module"], spec["module_version"])
        packages = list(spec["binaries"].values())
        # One package: -o names the file; several: -o DIR/ writes one binary per package.
        out = (
            str(out_bin / next(iter(spec["binaries"])))
            if len(packages) == 1
            else f"{out_bin}{os.sep}"
        )
        cmd = [
            go,
            "build",
            "-v",
            "-trimpath",
            "-ldflags",
            ldflags(name, versions, info),
            "-o",
            out,
            *packages,
        ]
        _run_logged(name, cmd, workdir, env, log, on_line)


def cc_build(name: str, spec: dict, info: dict, out_bin: Path, log: Path) -> None:
    """Compile a C source of a Go module (the pause binary) with the C compiler, statically.

    The version is baked in as upstream's Makefile does (-DVERSION=v<tag>), so that
    `<binary> -v` reports it and the verification can check it.
    """
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise StepError(name, "no C compiler (`cc`); install Debian's gcc and libc6-dev")
    source = Path(info["Dir"]) / spec["source"]
    if not source.is_file():
        raise StepError(name, f"{spec['source']} is not in {spec['module']}@{info['Version']}")
    (binary,) = spec["binaries"]
    cmd = [
        cc,
        *spec.get("cflags", []),
        f"-DVERSION=v{spec['version']}",
        "-o",
        str(out_bin / binary),
        str(source),
    ]
    _run_logged(name, cmd, out_bin, dict(os.environ, GOTOOLCHAIN="local"), log, None)


def _write_provider_schema(module_dir: Path, workdir: Path, version: str) -> None:
    """What upstream's cmd/pulumi-resource-kubernetes/generate.go does at release time."""
    cmd_dir = module_dir / "cmd" / "pulumi-resource-kubernetes"
    try:
        schema = json.loads((cmd_dir / "schema.json").read_text())
        mapping = json.loads((cmd_dir / "terraform-mapping.json").read_text())
    except (OSError, ValueError) as e:
        raise StepError("pulumi-kubernetes", f"cannot read the schema from the module: {e}") from e
    schema["version"] = version
    for fname, data in (("schema-embed.json", schema), ("terraform-mapping-embed.json", mapping)):
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        (workdir / fname).write_text(text, encoding="utf-8")


def _run_logged(
    name: str,
    cmd: list[str],
    cwd: Path,
    env: dict,
    log: Path,
    on_line: Callable[[str], None] | None,
) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        fh.write("$ " + " ".join(cmd) + f"\n# cwd={cwd} GOTOOLCHAIN={env['GOTOOLCHAIN']}\n")
        fh.flush()
        proc = subprocess.Popen(
            ["nice", "-n", "10", *cmd] if shutil.which("nice") else cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            if on_line:
                on_line(line.strip())
        rc = proc.wait()
    if rc != 0:
        what = "go build" if Path(cmd[0]).name == "go" else Path(cmd[0]).name
        raise StepError(name, f"{what} failed (exit {rc}); log {log}:\n{tail(log.read_text())}")


# --------------------------------------------------------------------------- verification


def _out(cmd: list[str], env: dict | None = None, timeout: float = 60) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"<{e}>"
    return res.stdout + res.stderr


def binary_version(binary: str, path: Path, pulumi: Path | None = None) -> str | None:
    """The version a binary reports when run, without a leading 'v'; None if it says none."""
    p = str(path)
    if binary == "pulumi":
        m = re.search(r"v?(\d+\.\d+\.\d+\S*)", _out([p, "version"]))
    elif binary == "kubectl":
        m = re.search(
            r'"gitVersion":\s*"v(\d+\.\d+\.\d+[^"]*)"',
            _out([p, "version", "--client", "-o", "json"]),
        )
    elif binary.startswith("kube-") or binary == "kubelet":
        m = re.search(r"Kubernetes v(\d+\.\d+\.\d+\S*)", _out([p, "--version"]))
    elif binary in ("kwok", "kwokctl"):
        m = re.search(r"v(\d+\.\d+\.\d+\S*)", _out([p, "--version"]))
    elif binary == "versitygw":  # "Version  : v1.8.0"
        m = re.search(r"Version\s*:\s*v(\d+\.\d+\.\d+\S*)", _out([p, "--version"]))
    elif binary == "etcd":
        m = re.search(r"etcd Version: (\d+\.\d+\.\d+\S*)", _out([p, "--version"]))
    elif binary == "pause":  # pause.c: "-v" prints "pause.c v<VERSION>"
        m = re.search(r"pause\.c v(\d+\.\d+\.\d+\S*)", _out([p, "-v"]))
    elif binary == "pulumi-resource-kubernetes":
        return provider_version(path, pulumi)
    else:
        return None
    return m.group(1) if m else None


def provider_version(path: Path, pulumi: Path | None) -> str | None:
    """Run the plugin through `pulumi package get-schema <binary>`: its schema's version."""
    if pulumi is None:
        return None
    with tempfile.TemporaryDirectory(prefix="pulumi-home-") as home:
        env = dict(
            os.environ,
            PULUMI_HOME=home,
            PULUMI_SKIP_UPDATE_CHECK="true",
            PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION="true",
        )
        try:
            res = subprocess.run(
                [str(pulumi), "package", "get-schema", str(path)],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
            return json.loads(res.stdout).get("version")
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None


def python_plugin_script(python: str) -> str:
    return (
        "#!/bin/sh\n"
        "# Written by infra/toolchain.py: the Pulumi engine runs this to host Python dynamic\n"
        "# providers (the wheel does not ship it). Interpreter: the project's.\n"
        f'exec "{python}" -u -m pulumi.dynamic "$@"\n'
    )


# --------------------------------------------------------------------------- non-Go tools


def find_etcd(spec: dict) -> Path:
    """Debian's etcd (not built): on PATH or at its package path, at >= min_version."""
    path = shutil.which("etcd") or next(
        (p for p in spec["binaries"].values() if Path(p).exists()), None
    )
    hint = f"install Debian's package: apt-get update && apt-get install -y {spec['apt_package']}"
    if not path:
        raise StepError("etcd", f"no etcd on PATH; {hint}")
    got = binary_version("etcd", Path(path)) or "?"
    if got == "?" or _vtuple(got) < _vtuple(spec["min_version"]):
        raise StepError("etcd", f"{path} is version {got}, need >= {spec['min_version']}; {hint}")
    return Path(path)


def write_python_plugin(root: Path, python: str) -> Path:
    """pulumi-resource-pulumi-python for one interpreter, in a directory of its own.

    `python` is used as given, not resolved: a venv's python is a symlink, and resolving it
    would leave the venv (and its pulumi package) behind.
    """
    d = root / f"pulumi-python-{hashlib.sha256(python.encode()).hexdigest()[:12]}" / "bin"
    script = d / "pulumi-resource-pulumi-python"
    text = python_plugin_script(python)
    if not script.exists() or script.read_text() != text:
        d.mkdir(parents=True, exist_ok=True)
        tmp = script.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, script)
    return script


def link_plugin(pulumi_home: Path, name: str, version: str, binary: Path) -> Path:
    """Put a resource plugin into Pulumi's plugin cache, as `pulumi plugin install` would."""
    d = pulumi_home / "plugins" / f"resource-{name}-v{version}"
    link = d / f"pulumi-resource-{name}"
    d.mkdir(parents=True, exist_ok=True)
    if not (link.is_symlink() and os.readlink(link) == str(binary)):
        tmp = d / f".{link.name}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(binary)
        os.replace(tmp, link)
    return link

"""What the twin does to the machine it runs on: processes, mounts, cgroups, host records.

The twin's real nodes (:mod:`homelab_dagster.twin_real`) and its registry
(:mod:`homelab_dagster.twin_registry`) run as processes of their own, started detached with a
pid file and a log under the twin's state, and recognised later by their command line (a pid
file alone could name a recycled pid). The real nodes also change the host (iptables chains,
sysctls, a few directories): :func:`record_host` takes a record of it before the first real
node starts and :func:`undo_host` puts it back when the last one stops.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from homelab_dagster.errors import TwinHostError

__all__ = [
    "TWIN_ADDRESSES",
    "add_loopback_address",
    "alive",
    "cgroup_mounts",
    "cgroup_pids",
    "host_snapshot",
    "iptables_state",
    "loopback_address",
    "mounts_under",
    "pids_with_argument",
    "read_pid",
    "record_host",
    "remove_cgroup",
    "remove_log_links",
    "remove_loopback_address",
    "run",
    "start_process",
    "tail",
    "terminate",
    "undo_host",
    "unmount_under",
    "which",
]

# Sysctls the kubelet sets (protectKernelDefaults: false) or the bridge plugin turns on.
_SYSCTLS = (
    "net.ipv4.ip_forward",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)
# Made on the host whatever the configuration says: the kubelet's symlinks to pod logs, its
# device-plugin socket and checkpoint (a fixed path), containerd's shim sockets, the CNI
# library's result cache, util-linux's mount table. Removed with the last real node if they
# did not exist before the first; the last three hold only the twin's files by then, unless
# another kubelet or containerd runs on the machine.
_HOST_DIRS = (
    "/var/log/containers",
    "/run/mount",
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/run/containerd",
)
_HOST_DIRS_OWNED = ("/var/lib/kubelet", "/var/lib/cni", "/run/containerd")
_STOP_TIMEOUT_S = 10
_SEARCH_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin")

# A real node's address, and the object store's address for pods, on `lo`: one per port in
# 198.18.0.0/15 (the benchmarking range, never routed), named by the twin's port that owns it.
TWIN_ADDRESSES = ipaddress.IPv4Network("198.18.0.0/15")


def loopback_address(port: int) -> str:
    """The address on ``lo`` that the twin's ``port`` names (a real node's, the store's):
    a pod on a real node reaches the host there (through its bridge, to a local address)."""
    return str(TWIN_ADDRESSES[port])


def add_loopback_address(address: str) -> bool:
    """Put ``address`` on ``lo`` (root); whether it was added (False: it was there)."""
    ip = which("ip")
    if f" {address}/" in run([ip, "-o", "addr", "show", "dev", "lo"]).stdout:
        return False
    run([ip, "addr", "add", f"{address}/32", "dev", "lo"], check=True)
    return True


def remove_loopback_address(address: str) -> None:
    """Take ``address`` off ``lo`` where it is there."""
    ip = which("ip")
    if f" {address}/" in run([ip, "-o", "addr", "show", "dev", "lo"]).stdout:
        run([ip, "addr", "del", f"{address}/32", "dev", "lo"])


# --------------------------------------------------------------------------- host record


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def iptables_state(binary: str) -> dict[str, dict[str, list[str]]]:
    """``{table: {"chains": [...], "rules": [...]}}`` from ``<binary>-save`` (no counters)."""
    save = shutil.which(f"{binary}-save", path="/usr/sbin:/sbin:/usr/bin")
    if not save:
        return {}
    text = run([save]).stdout
    tables: dict[str, dict[str, list[str]]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            tables[table] = {"chains": [], "rules": []}
        elif line.startswith(":") and table:
            tables[table]["chains"].append(line[1:].split()[0])
        elif line.startswith("-A") and table:
            tables[table]["rules"].append(line)
    return tables


def host_snapshot() -> dict[str, Any]:
    """What real nodes may change on the host: iptables, sysctls, a few directories."""
    return {
        "sysctls": {
            s: _sysctl_path(s).read_text().strip() for s in _SYSCTLS if _sysctl_path(s).exists()
        },
        "iptables": {b: iptables_state(b) for b in ("iptables", "ip6tables")},
        "dirs": {d: Path(d).exists() for d in _HOST_DIRS},
    }


def record_host(path: Path) -> None:
    """Take the host-wide record once, before the first real node of the twin starts."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(host_snapshot(), indent=1))
    os.replace(tmp, path)


def undo_host(path: Path) -> None:
    """Put back what the record says: iptables chains and rules, sysctls, directories."""
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    for binary, tables_before in before.get("iptables", {}).items():
        exe = shutil.which(binary, path="/usr/sbin:/sbin:/usr/bin")
        if not exe:
            continue
        now = iptables_state(binary)
        for table, state in now.items():
            old = tables_before.get(table, {"chains": [], "rules": []})
            new_chains = [c for c in state["chains"] if c not in old["chains"]]
            for rule in state["rules"]:
                if rule in old["rules"]:
                    continue
                args = shlex.split(rule)
                if args[1] in new_chains:
                    continue  # flushed with its chain below
                run([exe, "-w", "-t", table, "-D", *args[1:]])
            for chain in new_chains:
                run([exe, "-w", "-t", table, "-F", chain])
            for chain in new_chains:
                run([exe, "-w", "-t", table, "-X", chain])
    for name, value in before.get("sysctls", {}).items():
        with contextlib.suppress(OSError):
            if _sysctl_path(name).read_text().strip() != value:
                _sysctl_path(name).write_text(value)
    others = _other_runtimes()
    for d, existed in before.get("dirs", {}).items():
        if existed:
            continue
        if d in _HOST_DIRS_OWNED and not others:
            shutil.rmtree(d, ignore_errors=True)
        else:
            _remove_empty_tree(Path(d))
    path.unlink(missing_ok=True)


def _other_runtimes() -> list[int]:
    """Kubelets and containerds running on the machine (this twin's are stopped by now)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                name, rest = (entry / "stat").read_text().split(" (", 1)[1].rsplit(") ", 1)
                if name in ("kubelet", "containerd") and rest.split()[0] != "Z":  # not zombies
                    pids.append(int(entry.name))
    return pids


def _remove_empty_tree(path: Path) -> None:
    if not path.is_dir() or path.is_symlink():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            _remove_empty_tree(child)
    with contextlib.suppress(OSError):
        path.rmdir()


def remove_log_links(owner: Path) -> None:
    """The kubelet's symlinks in /var/log/containers that point into ``owner``."""
    logs = Path("/var/log/containers")
    if not logs.is_dir():
        return
    for link in logs.iterdir():
        with contextlib.suppress(OSError):
            if link.is_symlink() and os.readlink(link).startswith(str(owner) + "/"):
                link.unlink()


# --------------------------------------------------------------------------- processes


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int | None, owner: Path) -> bool:
    """Whether ``pid`` runs and is one of ``owner``'s processes (its command line says so)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    # A process exec'd a moment ago may show an empty command line for a few milliseconds.
    return state != "Z" and (not cmdline or str(owner) in cmdline)


def terminate(pid: int | None, owner: Path) -> None:
    if not alive(pid, owner):
        return
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while alive(pid, owner) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.1)
    if alive(pid, owner):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while alive(pid, owner):
            _reap(pid)
            time.sleep(0.05)
    _reap(pid)


def _reap(pid: int) -> None:
    """Collect ``pid`` if this process started it (a child left as a zombie otherwise)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pids_with_argument(arg: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arg.encode() in argv:
            pids.append(int(entry.name))
    return pids


# --------------------------------------------------------------------------- mounts, cgroups


def cgroup_mounts() -> list[Path]:
    """Every cgroup hierarchy's mount point (v1 controllers, and the v2 tree if mounted)."""
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[2] in ("cgroup", "cgroup2"):
                mounts.append(Path(fields[1]))
    return mounts


def cgroup_pids(root: str) -> list[int]:
    pids: set[int] = set()
    for mount in cgroup_mounts():
        base = mount / root.lstrip("/")
        if not base.is_dir():
            continue
        for procs in base.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in procs.read_text().split())
    return sorted(pids)


def remove_cgroup(root: str) -> None:
    """Remove ``root`` from every hierarchy, deepest first (killed tasks take a moment to go)."""
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while True:
        left = []
        for mount in cgroup_mounts():
            base = mount / root.lstrip("/")
            if not base.is_dir():
                continue
            for d in sorted(
                (p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
            ):
                with contextlib.suppress(OSError):
                    d.rmdir()
            try:
                base.rmdir()
            except OSError:
                left.append(base)
        if not left:
            return
        if time.monotonic() > deadline:
            raise TwinHostError(
                f"cgroups left behind (processes still in them?): {', '.join(map(str, left))}"
            )
        for pid in cgroup_pids(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo, escapes decoded)."""
    prefix = str(path)
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def unmount_under(path: Path) -> None:
    for _ in range(10):
        points = mounts_under(path)
        if not points:
            return
        for point in sorted(set(points), key=lambda p: -p.count("/")):
            if run(["umount", point]).returncode != 0:
                run(["umount", "-l", point])
    left = mounts_under(path)
    if left:
        raise TwinHostError(f"could not unmount {', '.join(left)}")


# --------------------------------------------------------------------------- helpers


def run(cmd: Iterable[str], *, check: bool = False) -> subprocess.CompletedProcess[str]:
    args = list(cmd)
    res = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise TwinHostError(f"{' '.join(args)} failed: {(res.stderr or res.stdout).strip()}")
    return res


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def which(binary: str) -> str:
    """The path of ``binary`` (searched in PATH and the sbin directories), or TwinHostError."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SEARCH_PATH])
    found = shutil.which(binary, path=path)
    if not found:
        raise TwinHostError(f"{binary} is not installed (`make system-deps`)")
    return found


def start_process(
    cmd: list[str],
    *,
    log: Path,
    pid_file: Path,
    cwd: Path,
    env: dict[str, str] | None = None,
) -> int:
    """Start ``cmd`` detached (its own session: it outlives the command that started it, like
    kwokctl's processes), output appended to ``log``; its pid goes to ``pid_file``. ``env``
    adds variables (a secret goes there, never on the command line, which any user can read)."""
    env = {
        **os.environ,
        "PATH": os.pathsep.join([*_SEARCH_PATH[:3], os.environ.get("PATH", "/usr/bin:/bin")]),
        **(env or {}),
    }
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    pid_file.write_text(str(proc.pid))
    return proc.pid

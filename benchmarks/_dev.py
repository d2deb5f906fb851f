"""``homelab dev`` (the webserver, the daemon and the code server, as ``make dev`` starts them)
for a benchmark: started in its own session on a free loopback port, stopped with its tree."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def homelab_dev(env: dict[str, str], log: Path, timeout: float = 300) -> Iterator[str]:
    """Run ``homelab dev`` with ``env`` (its output in ``log``) until the block ends; yields
    its URL once the webserver answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    homelab = str(Path(sys.executable).with_name("homelab"))
    with log.open("w") as out:
        dev = subprocess.Popen(
            [homelab, "dev", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/server_info", timeout=2):
                        break
                except OSError:
                    if dev.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"homelab dev did not start: see {log}") from None
                    time.sleep(0.5)
            yield url
        finally:
            os.killpg(dev.pid, signal.SIGTERM)
            try:
                dev.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(dev.pid, signal.SIGKILL)

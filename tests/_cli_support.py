"""Running the ``homelab`` command line as a user does: a process of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def validate(path: Path) -> tuple[int, str]:
    """``homelab validate <path>``: its exit status and its output, whitespace collapsed."""
    done = subprocess.run(
        [sys.executable, "-m", "homelab_dagster", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, " ".join((done.stdout + done.stderr).split())

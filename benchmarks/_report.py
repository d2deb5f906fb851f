"""Where a benchmark's report goes: ``benchmarks/results/<name>.json`` (not committed), and
the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def save(name: str, report: dict[str, Any]) -> None:
    """Write ``report`` to ``results/<name>.json`` and print it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))

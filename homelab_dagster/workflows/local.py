"""Run a training workflow with flytekit's local execution, in a process of its own.

The twin's Flyte launcher starts ``python -m homelab_dagster.workflows.local REQUEST``
so torch never loads into the Dagster process and terminating the run kills this one.
``REQUEST`` is a JSON file::

    {"run": "<training run>", "spec": {TrainSpec}, "options": {TrainOptions},
     "corpus_dir": "<staged corpus>", "output_dir": "<where the weights go>",
     "result": "<where to write the result>"}

Progress goes to stdout, a line at a time. The result file holds ``digest``,
``size_bytes``, ``weights_dir``, ``train`` and ``evaluation`` on success, or ``error`` (the
training error's message) on failure, when the process exits with status 1. flytekit's
scratch files go to ``$TMPDIR``, which the launcher points into the execution's directory.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from homelab_dagster.errors import HomelabError
from homelab_dagster.ml.spec import TrainOptions, TrainSpec, from_dict

__all__ = ["main"]


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost error, or the first of ours on the way (flytekit wraps task errors)."""
    seen = exc
    while True:
        if isinstance(seen, HomelabError):
            return seen
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            return seen
        seen = nxt


def main(argv: list[str] | None = None) -> int:
    """Run the request named by ``argv[0]``; return the process' exit status."""
    args = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(args[0]).read_text())
    result_path = Path(request["result"])
    started = time.monotonic()
    try:
        from flytekit.types.directory import FlyteDirectory

        from homelab_dagster.workflows.training import TaskResources, build_training_workflow

        spec = from_dict(TrainSpec, request["spec"])
        options = from_dict(TrainOptions, request["options"])
        workflow = build_training_workflow(request["run"], TaskResources(gpus=0, memory="0"))
        out = workflow(corpus=FlyteDirectory(request["corpus_dir"]), spec=spec, options=options)
        weights = Path(request["output_dir"])
        shutil.copytree(out.weights.path, weights)
        result = {
            "digest": out.digest,
            "size_bytes": out.size_bytes,
            "weights_dir": str(weights),
            "train": asdict(out.train),
            "evaluation": asdict(out.evaluation),
            "seconds": time.monotonic() - started,
        }
    except Exception as exc:
        cause = _root_cause(exc)
        traceback.print_exc(file=sys.stdout)
        result_path.write_text(json.dumps({"error": f"{type(cause).__name__}: {cause}"}))
        print(f"training failed: {type(cause).__name__}: {cause}", flush=True)
        return 1
    result_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

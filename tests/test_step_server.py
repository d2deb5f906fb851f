"""The steps' fork server: what it preloads, and how it ends (homelab_dagster/step_server.py)."""

from __future__ import annotations

import subprocess
import sys

from homelab_dagster import step_server


def _python(code: str, cwd) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


def test_every_preloaded_module_imports(project_root):
    # The server skips a name that fails to import, silently: then every step imports it.
    code = "import importlib\n" + "".join(
        f"importlib.import_module({name!r})\n" for name in step_server.PRELOAD
    )
    result = _python(code, project_root)
    assert result.returncode == 0, result.stderr


def test_the_server_ends_without_the_interpreters_teardown(project_root):
    # Exit hooks run last-registered first: the server's hook (imported last of PRELOAD) ends
    # the process, with its output flushed, before any earlier hook or the teardown runs.
    assert step_server.PRELOAD[-1] == "homelab_dagster._preload_end"
    code = (
        "import atexit\n"
        "atexit.register(print, 'teardown ran')\n"
        "import homelab_dagster._preload_end\n"
        "print('preloaded', end='')\n"
    )
    result = _python(code, project_root)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "preloaded"


def test_end_process_flushes_and_keeps_the_code(project_root):
    code = (
        "import sys\n"
        "from homelab_dagster.shutdown import end_process\n"
        "print('said', end='')\n"
        "print('warned', end='', file=sys.stderr)\n"
        "end_process(3)\n"
    )
    result = _python(code, project_root)
    assert (result.returncode, result.stdout, result.stderr) == (3, "said", "warned")

"""Settings: which inventory, which target, where state lives. Read once, from the environment.

| variable              | default                          | meaning                               |
|-----------------------|----------------------------------|---------------------------------------|
| ``HOMELAB_INVENTORY`` | ``<project>/homelab.yaml``       | the inventory file                    |
| ``HOMELAB_TARGET``    | ``twin``                         | ``twin`` or ``homelab``: which world  |
| ``HOMELAB_STATE_DIR`` | ``<project>/.homelab``           | twin clusters, Pulumi state, weights  |
| ``HOMELAB_TWIN_PORT_BASE`` | ``16443``                   | the twin's first API server port      |
| ``HOMELAB_GIT_REPO``  | ``<project>`` (this checkout)    | the Git sensor's repo: path or URL  |
| ``HOMELAB_GIT_BRANCH`` | the repository's ``HEAD`` branch | the branch the Git sensor watches   |
| ``HOMELAB_DAGSTER_POSTGRES_URL`` | unset: SQLite files    | Dagster's storage in PostgreSQL     |
| ``HOMELAB_RECONCILE_CRON`` | ``*/5 * * * *``             | when the ``reconcile`` schedule runs |
| ``HOMELAB_DRIFT_WATCH_S`` | ``30``                       | seconds between two drift watch ticks |
| ``HOMELAB_AUTO_REPAIR`` | twin: ``all``; homelab: ``none`` | families repaired on drift   |
| ``HOMELAB_WEBHOOK_URL`` | unset: no webhook              | failed runs announced (a secret)    |
| ``HOMELAB_IMAGE``     | ``homelab_dagster/images.py``'s | the project's image for Dagster's pods |
| ``HOMELAB_RUNS``      | twin: ``local``; homelab: ``kubernetes`` | steps as processes or pods |

``HOMELAB_AUTO_REPAIR``: comma-separated families (``cluster``, ``mesh_link``,
``model_weights``), ``all`` or ``none``.

``<project>`` is the directory holding ``pyproject.toml`` above the current directory,
or the current directory itself. The target is chosen here and nowhere else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from homelab_dagster.errors import SettingsError

__all__ = [
    "DAGSTER_POSTGRES_URL_VAR",
    "REPAIR_FAMILIES",
    "WEBHOOK_URL_VAR",
    "Settings",
    "Target",
    "project_root",
]

DAGSTER_POSTGRES_URL_VAR = "HOMELAB_DAGSTER_POSTGRES_URL"
"""The variable holding the Dagster instance's PostgreSQL URL (password included)."""
WEBHOOK_URL_VAR = "HOMELAB_WEBHOOK_URL"
"""The variable holding the failure webhook's URL (a secret: receivers put tokens in it)."""
REPAIR_FAMILIES = ("cluster", "mesh_link", "model_weights")
"""The asset families the reconcile can repair (the first part of their keys)."""
_DEFAULT_CRON = "*/5 * * * *"
_CRON_FIELD = re.compile(r"[0-9A-Za-z*/,\-]+")
_PSYCOPG2 = "postgresql+psycopg2://"


class Target(StrEnum):
    """The world the resources talk to."""

    TWIN = "twin"
    HOMELAB = "homelab"


def project_root(start: Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: cwd) with a pyproject.toml."""
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "pyproject.toml").is_file() and (candidate / "homelab.yaml").exists():
            return candidate
    return here


@dataclass(frozen=True)
class Settings:
    """Where the inventory is, which target runs, and where state is kept."""

    inventory_path: Path
    target: Target
    state_dir: Path
    twin_port_base: int = 16443
    git_repo: str | None = None  # None: the project's own checkout
    git_branch: str | None = None  # None: the repository's current (HEAD) branch
    # HOMELAB_DAGSTER_POSTGRES_URL is set: the Dagster instance stores runs, events and
    # schedules in PostgreSQL. Only the switch is kept: the URL (and its password) is read
    # by Dagster itself from the environment when the instance loads (cli/launch.py).
    dagster_postgres: bool = False
    reconcile_cron: str = _DEFAULT_CRON
    drift_watch_s: int = 30  # the drift watch's interval (sensors/reconcile.py)
    # The families whose drifted assets the reconcile re-materialises; None: the target's
    # default (resources/deployment.py: every family on the twin, none on the homelab).
    auto_repair: frozenset[str] | None = None
    # HOMELAB_WEBHOOK_URL is set: failed runs are announced there. Only the switch is kept;
    # the URL is read at launch (dg.EnvVar), never stored or logged.
    webhook: bool = False
    # Where steps run: "local" (processes of the machine that launched the run) or
    # "kubernetes" (pods on the orchestrator's nodes, dagster-k8s); None: the target's default.
    runs: str | None = None
    # HOMELAB_IMAGE: the project's image for Dagster's pods; None: its reference in
    # homelab_dagster/images.py (what `homelab twin images` and the Dockerfile build).
    image: str | None = None
    # HOMELAB_AUTOMATION=off: every schedule and sensor starts stopped (nothing launches by
    # itself; the UI can still start each); on (the default): the target's defaults.
    automation: bool = True

    @property
    def steps_log(self) -> Path:
        """Where the CLI's runs send what their steps print themselves (cli/output.py)."""
        return self.state_dir / "logs" / "steps.log"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``HOMELAB_*`` variables (``os.environ`` by default).

        Raises:
            SettingsError: ``HOMELAB_TARGET`` is neither ``twin`` nor ``homelab``.
        """
        env = os.environ if environ is None else environ
        root = project_root()
        raw_target = env.get("HOMELAB_TARGET", Target.TWIN.value)
        try:
            target = Target(raw_target)
        except ValueError:
            choices = ", ".join(t.value for t in Target)
            raise SettingsError(
                f"HOMELAB_TARGET={raw_target!r} is not a target (choose one of: {choices})"
            ) from None
        inventory = Path(env.get("HOMELAB_INVENTORY") or root / "homelab.yaml")
        state_dir = Path(env.get("HOMELAB_STATE_DIR") or root / ".homelab")
        raw_port = env.get("HOMELAB_TWIN_PORT_BASE", "16443")
        # Below 32768: the kernel hands out ports above it for outgoing connections, and
        # one of those can take a twin process's port between the check and the bind.
        if not raw_port.isdigit() or not 1024 <= int(raw_port) <= 32000:
            raise SettingsError(
                f"HOMELAB_TWIN_PORT_BASE={raw_port!r} is not a port between 1024 and 32000 "
                "(ports above 32768 are the kernel's ephemeral range)"
            )
        postgres_url = env.get(DAGSTER_POSTGRES_URL_VAR, "")
        # dagster-postgres talks through psycopg2; SQLAlchemy 2.1 takes a bare postgresql://
        # for psycopg 3, which is not installed. (The URL is not echoed: it holds a password.)
        if postgres_url and not postgres_url.startswith(_PSYCOPG2):
            raise SettingsError(
                f"{DAGSTER_POSTGRES_URL_VAR} must start with {_PSYCOPG2} "
                f"({_PSYCOPG2}USER:PASSWORD@HOST:PORT/DATABASE)"
            )
        cron = env.get("HOMELAB_RECONCILE_CRON") or _DEFAULT_CRON
        if not _valid_cron(cron):
            raise SettingsError(
                f"HOMELAB_RECONCILE_CRON={cron!r} is not a cron expression (five fields, "
                "e.g. '*/5 * * * *')"
            )
        raw_watch = env.get("HOMELAB_DRIFT_WATCH_S") or "30"
        if not raw_watch.isdigit() or not 5 <= int(raw_watch) <= 86400:
            raise SettingsError(
                f"HOMELAB_DRIFT_WATCH_S={raw_watch!r} is not a number of seconds between 5 "
                "and 86400 (a day)"
            )
        return cls(
            inventory_path=inventory.resolve(),
            target=target,
            state_dir=state_dir.resolve(),
            twin_port_base=int(raw_port),
            git_repo=env.get("HOMELAB_GIT_REPO") or None,
            git_branch=env.get("HOMELAB_GIT_BRANCH") or None,
            dagster_postgres=bool(postgres_url),
            reconcile_cron=cron,
            drift_watch_s=int(raw_watch),
            auto_repair=_repair_families(env.get("HOMELAB_AUTO_REPAIR")),
            webhook=bool(env.get(WEBHOOK_URL_VAR)),
            runs=_runs(env.get("HOMELAB_RUNS")),
            image=env.get("HOMELAB_IMAGE") or None,
            automation=_automation(env.get("HOMELAB_AUTOMATION")),
        )


def _automation(raw: str | None) -> bool:
    """``HOMELAB_AUTOMATION``: ``on`` (or unset) or ``off``.

    Raises:
        SettingsError: anything else.
    """
    value = (raw or "on").strip().lower()
    if value not in ("on", "off"):
        raise SettingsError(
            f"HOMELAB_AUTOMATION={raw!r} is neither on nor off (off: every schedule and sensor "
            "starts stopped)"
        )
    return value == "on"


def _runs(raw: str | None) -> str | None:
    """``HOMELAB_RUNS``: None when unset (the target's default), else ``local`` or
    ``kubernetes``.

    Raises:
        SettingsError: anything else.
    """
    if raw is None or not raw.strip():
        return None
    if raw not in ("local", "kubernetes"):
        raise SettingsError(
            f"HOMELAB_RUNS={raw!r} is not where runs go (choose local or kubernetes)"
        )
    return raw


def _valid_cron(expression: str) -> bool:
    """Five fields of digits, names, ``*``, ``/``, ``,`` and ``-`` (Dagster checks the rest
    when the schedule loads)."""
    fields = expression.split()
    return len(fields) == 5 and all(_CRON_FIELD.fullmatch(f) for f in fields)


def _repair_families(raw: str | None) -> frozenset[str] | None:
    """``HOMELAB_AUTO_REPAIR``: None when unset (the target's default), else its families.

    Raises:
        SettingsError: a name that is not a family, ``all`` or ``none``.
    """
    if raw is None or not raw.strip():
        return None
    names = {n.strip() for n in raw.split(",") if n.strip()}
    if names == {"all"}:
        return frozenset(REPAIR_FAMILIES)
    if names == {"none"}:
        return frozenset()
    unknown = sorted(names - set(REPAIR_FAMILIES))
    if unknown:
        raise SettingsError(
            f"HOMELAB_AUTO_REPAIR={raw!r}: {', '.join(unknown)} is not a family (choose from "
            f"{', '.join(REPAIR_FAMILIES)}, or all, or none)"
        )
    return frozenset(names)

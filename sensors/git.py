"""The Git sensor: each new commit on the watched branch materialises exactly what it changed.

Each tick fetches the mirror (:class:`resources.git.GitRepository`), diffs the branch's head
against the last commit handled (the sensor's cursor) with :func:`homelab_dagster.changes.affected`,
logs which path or inventory entry selected which asset, and requests those assets in one run,
tagged with the head commit. What must follow downstream is left to the asset graph.

- First tick (no cursor): the head is recorded as handled; nothing is requested.
- Many commits since the cursor: one diff, one run (tagged with the head and the count).
- History rewritten (the cursor is not an ancestor of the head): a full diff against the
  inventory at the cursor commit while the mirror has it, else against the last applied
  inventory (kept by digest), with every code path counted as changed; logged as a warning.
- The inventory at the head does not validate: the tick fails with the validator's problems
  and the cursor stays, so the commit is diffed again once a later one fixes it.
- The repository cannot be fetched or read: the tick fails (:class:`GitError`), cursor kept.
- A selected asset the code location does not define (its inventory is older than the
  commit's): the tick fails (:class:`StaleCodeLocationError`) until it is reloaded.

The cursor is JSON, ``{"sha": <commit>, "inventory": <sha256 of its homelab.yaml>}``, stored
by the Dagster instance with the sensor's state, so a daemon restart resumes from it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import dagster as dg

from assets._keys import (
    ORCHESTRATOR_KEY,
    cluster_key,
    endpoint_key,
    mesh_link_key,
    model_weights_key,
    training_run_key,
)
from assets._stack import COMMIT_TAG
from homelab_dagster.changes import AssetRef, Impact, affected
from homelab_dagster.errors import GitError, InventoryError, StaleCodeLocationError
from homelab_dagster.inventory import Inventory
from homelab_dagster.loader import MAX_BYTES, decode_inventory, parse_inventory
from resources.git import Blob, Commit, GitRepository

__all__ = [
    "SENSOR_NAME",
    "TAG_AUTHOR",
    "TAG_BASE",
    "TAG_COMMIT",
    "TAG_COMMITS",
    "TAG_REWRITTEN",
    "TAG_SUBJECT",
    "GitCursor",
    "asset_key",
    "build_git_sensor",
]

SENSOR_NAME = "git_changes"
MINIMUM_INTERVAL_S = 60
TAG_COMMIT = COMMIT_TAG  # the head commit's full SHA (what materialisations record)
TAG_AUTHOR = "homelab/commit-author"  # "Name <email>"
TAG_SUBJECT = "homelab/commit-subject"  # its subject line
TAG_BASE = "homelab/commit-base"  # the last commit handled before (the diff's other side)
TAG_COMMITS = "homelab/commits"  # how many commits the run covers ("unknown" after a rewrite)
TAG_REWRITTEN = "homelab/history-rewritten"  # "true" when the cursor was not an ancestor
_TAG_TEXT_LIMIT = 200

_KEYS: dict[str, Callable[..., dg.AssetKey]] = {
    "cluster": cluster_key,
    "mesh_link": mesh_link_key,
    "training_run": training_run_key,
    "model_weights": model_weights_key,
    "vllm_endpoint": endpoint_key,
    "orchestrator": lambda: ORCHESTRATOR_KEY,
}


def asset_key(asset: AssetRef) -> dg.AssetKey:
    """The Dagster key of ``asset`` (built by ``assets/_keys.py``)."""
    return _KEYS[asset.family](*asset.args)


@dataclass(frozen=True)
class GitCursor:
    """The last commit handled and the digest of the inventory applied with it."""

    sha: str
    inventory: str

    def dump(self) -> str:
        """The cursor as the sensor stores it (JSON)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def load(cls, raw: str | None) -> GitCursor | None:
        """The cursor stored as ``raw`` (None: no tick recorded yet).

        Raises:
            GitError: ``raw`` is not a cursor this sensor wrote.
        """
        if not raw:
            return None
        try:
            data = json.loads(raw)
            return cls(sha=str(data["sha"]), inventory=str(data["inventory"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise GitError(
                f"the sensor's cursor {raw[:80]!r} is not a Git cursor (reset it in the UI)"
            ) from exc


def build_git_sensor(*, running: bool) -> dg.Definitions:
    """The Git sensor, running from the start if ``running`` (the UI can toggle it)."""
    status = dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED

    @dg.sensor(
        name=SENSOR_NAME,
        target=dg.AssetSelection.all(),
        minimum_interval_seconds=MINIMUM_INTERVAL_S,
        default_status=status,
        description="Materialises the assets each new commit on the watched branch changes "
        "(homelab.yaml entry by entry, and the code paths mapped to assets).",
    )
    def git_changes(
        context: dg.SensorEvaluationContext, git: GitRepository
    ) -> dg.SensorResult | dg.SkipReason:
        return _tick(context, git)

    return dg.Definitions(sensors=[git_changes])


def _tick(context: dg.SensorEvaluationContext, git: GitRepository) -> dg.SensorResult:
    cursor = GitCursor.load(context.cursor)
    head = git.fetch()
    file = git.inventory_file
    if cursor is None:
        (blob,) = git.read((head, file), max_bytes=MAX_BYTES)
        text = _present(blob, file, head)
        _parse(text, file, head)  # an invalid inventory is not recorded as handled
        return _handled(
            context,
            git,
            head,
            text,
            f"first tick: recorded {head[:12]} ({git.watched}) as "
            "handled; nothing requested (later commits are diffed against it)",
        )
    if cursor.sha == head:
        return dg.SensorResult(skip_reason=f"no new commit on {git.watched} ({head[:12]})")

    in_mirror = git.has_commit(cursor.sha)
    rewritten = not in_mirror or not git.is_ancestor(cursor.sha, head)
    paths: list[str] | None
    if in_mirror:
        new_blob, old = git.read((head, file), (cursor.sha, file), max_bytes=MAX_BYTES)
        paths = git.changed_paths(cursor.sha, head)
    else:
        (new_blob,) = git.read((head, file), max_bytes=MAX_BYTES)
        old, paths = git.saved_inventory(cursor.inventory), None
    new_text = _present(new_blob, file, head)
    new = _parse(new_text, file, head)  # invalid: the tick fails, the cursor stays
    if rewritten:
        against = (
            f"the inventory at {cursor.sha[:12]} (still in the mirror)"
            if in_mirror
            else f"the last applied inventory (sha256 {cursor.inventory[:12]}), every code "
            "path counted as changed"
        )
        context.log.warning(
            f"history rewritten on {git.watched}: {cursor.sha[:12]} is not an ancestor of "
            f"{head[:12]}; full diff against {against}"
        )
    impact = affected(_parse_old(context, old, file, cursor.sha), new, paths, inventory_file=file)
    _log(context, impact, head)
    keys = _runnable(context, impact.assets)
    count = str(git.count(cursor.sha, head)) if in_mirror else "unknown"
    if not keys:
        return _handled(
            context,
            git,
            head,
            new_text,
            f"{count} new commit(s) up to {head[:12]}: nothing to materialise",
        )
    commit = git.commit(head)
    request = dg.RunRequest(
        run_key=f"{cursor.sha[:12]}..{head}",
        asset_selection=keys,
        tags=_tags(commit, cursor.sha, count, rewritten),
    )
    return _handled(context, git, head, new_text, None, request)


def _handled(
    context: dg.SensorEvaluationContext,
    git: GitRepository,
    head: str,
    text: str,
    skip: str | None,
    request: dg.RunRequest | None = None,
) -> dg.SensorResult:
    """The tick's result, with the cursor moved to ``head`` (and the inventory kept)."""
    digest = git.save_inventory(text)
    git.keep(head)
    if skip:
        context.log.info(skip)
    return dg.SensorResult(
        run_requests=[request] if request else None,
        skip_reason=skip,
        cursor=GitCursor(head, digest).dump(),
    )


def _present(blob: Blob | None, file: str, sha: str) -> str:
    """The inventory's text in commit ``sha`` (``blob``), through the loader's limits.

    Raises:
        GitError: the commit has no inventory file (None).
        InventoryError: it is larger than the loader's limit (not read) or not UTF-8 text.
    """
    if blob is None:
        raise GitError(f"{file} is not in commit {sha[:12]}")
    return decode_inventory(blob.data or b"", f"{file}@{sha[:12]}", size=blob.size)


def _parse(text: str, file: str, sha: str) -> Inventory:
    """The inventory ``text`` of commit ``sha``.

    Raises:
        InventoryError: it does not validate (every problem listed).
    """
    return parse_inventory(text, f"{file}@{sha[:12]}")


def _parse_old(
    context: dg.SensorEvaluationContext, old: str | Blob | None, file: str, sha: str
) -> Inventory | None:
    """The inventory before (the applied text kept, or the cursor commit's blob), or None
    (then every entry counts as added), said in the log."""
    if old is None:
        context.log.warning(f"no inventory known for {sha[:12]}: every entry counts as added")
        return None
    try:
        text = old if isinstance(old, str) else _present(old, file, sha)
        return parse_inventory(text, f"{file}@{sha[:12]}")
    except InventoryError as exc:
        context.log.warning(f"{exc}\nso every entry of the new inventory counts as added")
        return None


def _log(context: dg.SensorEvaluationContext, impact: Impact, head: str) -> None:
    for asset, reasons in impact.reasons().items():
        context.log.info(f"{head[:12]}: {asset} selected by {'; '.join(reasons)}")
    for note in impact.notes:
        context.log.info(f"{head[:12]}: {note}")


def _runnable(context: dg.SensorEvaluationContext, assets: Sequence[AssetRef]) -> list[dg.AssetKey]:
    """The keys of ``assets`` to materialise: those the code location can materialise.

    Raises:
        StaleCodeLocationError: the code location does not define some of them.
    """
    keys = [asset_key(a) for a in assets]
    repository = context.repository_def
    if repository is None:
        return keys
    graph = repository.asset_graph
    missing = [k.to_user_string() for k in keys if not graph.has(k)]
    if missing:
        raise StaleCodeLocationError(
            f"the commit selects {', '.join(missing)}, which the loaded code location does "
            "not define: reload it (its inventory is older than the commit's)"
        )
    observed = [k for k in keys if not graph.get(k).is_materializable]
    for key in observed:
        context.log.info(f"{key.to_user_string()} is observed, not materialised: left out")
    return [k for k in keys if k not in observed]


def _tags(commit: Commit, base: str, count: str, rewritten: bool) -> dict[str, str]:
    tags = {
        TAG_COMMIT: commit.sha,
        TAG_AUTHOR: _tag_text(commit.author),
        TAG_SUBJECT: _tag_text(commit.subject),
        TAG_BASE: base,
        TAG_COMMITS: count,
    }
    if rewritten:
        tags[TAG_REWRITTEN] = "true"
    return tags


def _tag_text(text: str) -> str:
    """One printable line of at most 200 characters (``…`` where cut)."""
    line = "".join(c if c.isprintable() else " " for c in text).strip()
    return line if len(line) <= _TAG_TEXT_LIMIT else line[: _TAG_TEXT_LIMIT - 1] + "…"

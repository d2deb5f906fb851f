"""``homelab preview`` and ``homelab down``: the stacks' plan, and their teardown.

Both run a job of the code location (``preview``, ``teardown``) like ``homelab up`` runs
``up``: in this process's Dagster instance, one step per stack, with progress. ``--env``
selects the stacks of one cluster and of the mesh links that touch it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from homelab_dagster.cli.output import (
    console,
    error_exit,
    exit_if_failed,
    load_for,
    print_preview,
)
from homelab_dagster.errors import HomelabError

if TYPE_CHECKING:  # Dagster is imported when a command runs a job
    import dagster as dg

__all__ = ["down", "preview"]

EnvOption = Annotated[
    str | None,
    typer.Option("--env", "-e", help="One cluster (and its mesh links); default: all."),
]


def _stack_ops(job: dg.JobDefinition, cluster: str | None) -> list[str] | None:
    """The job's ops touching ``cluster`` (all when None)."""
    from assets import CLUSTERS_TAG

    if cluster is None:
        return None
    return [
        node.name
        for node in job.graph.nodes
        if cluster in node.definition.tags.get(CLUSTERS_TAG, "").split(",")
    ]


def _run(env: str | None, job_name: str, verb: str) -> str:
    """Run the ops of job ``job_name`` (``preview``, ``teardown``) for ``env``; exit 1 on
    failure. Returns the run id."""
    from homelab_dagster.cli import launch
    from homelab_dagster.definitions import defs

    settings, inventory = load_for(env)
    ops = _stack_ops(defs.resolve_job_def(job_name), env)
    console.print(f"target [bold]{settings.target.value}[/], {verb} {env or 'every stack'}")
    clusters = None if env is None else launch.plan_selection(inventory, env).clusters
    try:
        launch.start_world(settings, inventory, clusters)
    except HomelabError as exc:
        raise error_exit(exc) from exc
    outcome = launch.materialize(
        None, settings=settings, console=console, job=job_name, op_selection=ops, title=verb
    )
    exit_if_failed(outcome, settings)
    return outcome.run_id


def _observations(run_id: str) -> list[dg.AssetObservation]:
    import dagster as dg

    from homelab_dagster.cli import launch

    with launch.open_instance() as instance:
        records = instance.get_records_for_run(
            run_id, of_type=dg.DagsterEventType.ASSET_OBSERVATION
        )
        return [
            r.event_log_entry.dagster_event.event_specific_data.asset_observation  # type: ignore[union-attr]
            for r in records.records
            if r.event_log_entry.dagster_event is not None
        ]


def preview(env: EnvOption = None) -> None:
    """What materialising would change, stack by stack and resource by resource."""
    run_id = _run(env, "preview", "previewing")
    for observation in sorted(_observations(run_id), key=lambda o: o.asset_key.to_user_string()):
        print_preview(observation)
    console.print(f"[green]✓[/] preview done (run {run_id}); nothing was changed")


def down(
    env: EnvOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Destroy the stacks (mesh links, endpoints and the orchestrator first, then the
    clusters): what Pulumi made is deleted."""
    what = f"the stacks of {env}, its mesh links and what runs on it" if env else "every stack"
    if not yes and not typer.confirm(f"Destroy {what}?"):
        raise typer.Exit(code=1)
    run_id = _run(env, "teardown", "destroying")
    console.print(f"[green]✓[/] destroyed {what} (run {run_id})")

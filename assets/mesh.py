"""``mesh_link/<from>__<to>``: ``from`` reaches the services ``to`` exports (Linkerd).

Materialising reads the services ``to`` exports, then runs ``pulumi up`` on the stack
``<target>.mesh_link.<from>__<to>`` with the program of :mod:`infra.mesh` (the account and
token on ``to``, the credentials and the mirrors on ``from``). The blocking check
``link_works`` proves the link the way Linkerd's service mirror would use it: with the
credentials stored on ``from``, it lists ``to``'s exported services over the network and
compares them with the mirrors on ``from`` (the rule: :func:`homelab_dagster.checks.link_mirrored`);
``no_drift`` (not blocking) compares the stack's state with both clusters. A link follows
its clusters by itself (:func:`assets._automation.follow_upstream`).
"""

from collections.abc import Iterator, Mapping, Sequence

import dagster as dg

from assets._automation import follow_upstream
from assets._keys import cluster_key, mesh_link_key
from assets._stack import (
    DRIFT_CHECK,
    STACK_STEP_TAGS,
    StackConfig,
    StackSpec,
    check_result,
    drift_check,
    drift_check_spec,
    live_record,
    provenance,
    step_failure,
)
from homelab_dagster import checks
from homelab_dagster.errors import HomelabError, KubernetesError
from homelab_dagster.inventory import Mesh, MeshLink
from infra.mesh import (
    CREDENTIALS_KEY,
    LINK_NAMESPACE,
    MIRROR_CLUSTER_LABEL,
    MIRRORED_LABEL,
    ExportedService,
    LinkEnds,
    LinkNames,
    mesh_link_program,
)
from resources.kubernetes import KubernetesClusters
from resources.pulumi import Program, PulumiStacks

__all__ = ["build_mesh_link_defs", "link_works", "mesh_link_stack"]


def _export_selector(mesh: Mesh) -> str:
    return f"{mesh.export_label}=true"


def mesh_link_stack(
    link: MeshLink, mesh: Mesh | None = None, source_namespaces: tuple[str, ...] = ()
) -> StackSpec:
    """The stack of ``link``; ``source_namespaces``: what ``from``'s own stack creates."""
    mesh = mesh or Mesh()

    def program(pulumi: PulumiStacks, kubernetes: KubernetesClusters) -> Program:
        exported = [
            ExportedService(s.namespace, s.name, tuple(_mirror_ports(s.ports)))
            for s in kubernetes.services(link.target, _export_selector(mesh))
        ]
        source, target = kubernetes.access(link.source), kubernetes.access(link.target)
        ends = LinkEnds(
            from_access=(source.kubeconfig, source.context),
            to_access=(target.kubeconfig, target.context),
            to_server=kubernetes.link_server(link.target),
            identity_prefix=pulumi.target,
        )
        return mesh_link_program(
            link,
            ends,
            export_label=mesh.export_label,
            exported=exported,
            from_namespaces=source_namespaces,
            linkerd_link=pulumi.linkerd_link,
        )

    return StackSpec(
        key=mesh_link_key(link.source, link.target),
        clusters=(link.source, link.target),
        program=program,
    )


def _mirror_ports(ports: tuple[dict[str, object], ...]) -> list[dict[str, object]]:
    """A mirror's ports: the exported service's names, ports and protocols."""
    return [{k: p[k] for k in ("name", "port", "protocol") if k in p} for p in ports]


def build_mesh_link_defs(
    link: MeshLink,
    mesh: Mesh | None = None,
    source_namespaces: tuple[str, ...] = (),
    exported: Sequence[dg.AssetKey] = (),
) -> dg.Definitions:
    """The asset of one mesh link and its check. It depends on both clusters and on
    ``exported``, the endpoints whose Services its target exports to the mesh: the link
    mirrors what is exported when it runs (on the twin, its stack makes the mirrors), so it
    follows them."""
    mesh = mesh or Mesh()
    spec = mesh_link_stack(link, mesh, source_namespaces)
    key = spec.key
    latency = {"latency_ms": list(link.latency_ms)} if link.latency_ms else {}

    @dg.multi_asset(
        name=key.to_python_identifier(),
        specs=[
            dg.AssetSpec(
                key,
                deps=[cluster_key(link.source), cluster_key(link.target), *exported],
                group_name="mesh",
                kinds={"pulumi", "kubernetes"},
                description=f"{link.source} reaches the services {link.target} exports.",
                metadata={"from": link.source, "to": link.target, **latency},
                automation_condition=follow_upstream(optional=exported),
                skippable=True,
            )
        ],
        check_specs=[
            dg.AssetCheckSpec(
                "link_works",
                asset=key,
                blocking=True,
                description=f"With the credentials stored on {link.source}, {link.target}'s "
                f"exported services can be listed, and each has its mirror on {link.source}.",
            ),
            drift_check_spec(key),
        ],
        can_subset=True,  # the check also runs alone
        op_tags=STACK_STEP_TAGS,
    )
    def _mesh_link(
        context: dg.AssetExecutionContext,
        config: StackConfig,
        pulumi: PulumiStacks,
        kubernetes: KubernetesClusters,
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        if key in context.selected_asset_keys:
            try:
                yield _provision(
                    context.log, spec, link, config, pulumi, kubernetes, provenance(context)
                )
            except HomelabError as exc:
                raise step_failure(exc) from exc
        selected = {k.name for k in context.selected_asset_check_keys}
        if "link_works" in selected:
            yield link_works(link, mesh, kubernetes)
        if DRIFT_CHECK in selected:
            yield drift_check(spec, pulumi, kubernetes, context.log)

    return dg.Definitions(assets=[_mesh_link])


def _provision(
    log: dg.DagsterLogManager,
    spec: StackSpec,
    link: MeshLink,
    config: StackConfig,
    pulumi: PulumiStacks,
    kubernetes: KubernetesClusters,
    origin: Mapping[str, str],
) -> dg.MaterializeResult:
    """``pulumi up`` of the link's stack, and what it records (``origin``: the run's
    provenance metadata)."""
    stack = pulumi.stack_name(spec.key.path)
    result = pulumi.up(stack, spec.program(pulumi, kubernetes), log, refresh=config.refresh)
    return dg.MaterializeResult(
        asset_key=spec.key,
        metadata={
            **result.metadata(),
            "api_server": dg.MetadataValue.url(kubernetes.link_server(link.target)),
            "exported_services": result.outputs.get("exported", []),
            "mirrored_services": result.outputs.get("mirrors", []),
            "credentials_secret": result.outputs.get("credentials_secret", ""),
            **live_record(stack, pulumi, kubernetes, log),
            **origin,
        },
    )


def link_works(link: MeshLink, mesh: Mesh, kubernetes: KubernetesClusters) -> dg.AssetCheckResult:
    """With the credentials stored on ``from``, list ``to``'s exported services over the
    network, and compare them with the mirrors on ``from``."""
    names = LinkNames(link)
    key = mesh_link_key(link.source, link.target)
    where = f"{link.source}'s Secret {LINK_NAMESPACE}/{names.credentials_secret}"
    broken = f"the mesh link {link.source} -> {link.target} is broken"
    try:
        credentials = kubernetes.secret_value(
            link.source, LINK_NAMESPACE, names.credentials_secret, CREDENTIALS_KEY
        )
        if credentials is None:
            why = f"{where} is missing (materialise {key.to_user_string()})"
            return check_result(key, "link_works", checks.Verdict(False, f"{broken}: {why}"))
        remote = kubernetes.services_with_credentials(
            link.target, credentials, _export_selector(mesh)
        )
        mirrors = kubernetes.services(
            link.source, f"{MIRROR_CLUSTER_LABEL}={link.target},{MIRRORED_LABEL}=true"
        )
    except KubernetesError as exc:
        return check_result(
            key, "link_works", checks.Verdict(False, f"{broken}: {exc} (using {where})")
        )
    verdict = checks.link_mirrored(
        exported=[s.ref for s in remote],
        expected=[f"{s.namespace}/{names.mirror(s.name)}" for s in remote],
        observed=[s.ref for s in mirrors],
    )
    if not verdict.passed:
        description = f"{broken}: {verdict.description} (materialise {key.to_user_string()})"
        verdict = checks.Verdict(False, description, verdict.metadata)
    return check_result(key, "link_works", verdict)

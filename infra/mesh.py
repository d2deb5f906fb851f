"""The Pulumi program of a mesh link stack (``<target>.mesh_link.<from>__<to>``).

What ``linkerd multicluster link`` creates, declared with Pulumi. ``from`` reaches the
services ``to`` exports:

- on ``to`` (the exporting cluster): a ServiceAccount allowed to read services, endpoints
  and endpointslices, and a token Secret for it (filled in by ``to``'s token controller);
- on ``from``: a Secret holding a kubeconfig for ``to`` built from that token (a secret
  output: it never appears in logs or metadata), and for each service ``to`` exports (label
  ``mirror.linkerd.io/exported: "true"``) a mirrored Service ``<service>-<to>`` in the same
  namespace (created by this stack when ``from`` does not declare it);
- where the deployment has Linkerd's multicluster extension (the homelab; the twin installs
  no charts), also Linkerd's ``Link`` resource, which makes Linkerd's service mirror follow
  the exports from then on.

The exported services are read from ``to`` by the caller when the stack runs and passed in,
so the program stays a plain function of its inputs.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import yaml

from homelab_dagster.inventory import MeshLink
from infra.cluster import MANAGED_BY, TAKE_BACK

__all__ = [
    "CREDENTIALS_KEY",
    "LINK_NAMESPACE",
    "MIRRORED_LABEL",
    "MIRROR_CLUSTER_LABEL",
    "ExportedService",
    "LinkEnds",
    "LinkNames",
    "link_kubeconfig",
    "mesh_link_program",
]

LINK_NAMESPACE = "linkerd-multicluster"
CREDENTIALS_KEY = "kubeconfig"
MIRRORED_LABEL = "mirror.linkerd.io/mirrored-service"
MIRROR_CLUSTER_LABEL = "mirror.linkerd.io/cluster-name"
# Linkerd's defaults for a link's gateway (linkerd multicluster link writes the same).
_GATEWAY_IDENTITY = (
    "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.cluster.local"
)


@dataclass(frozen=True)
class ExportedService:
    """A service ``to`` exports: where it is and its ports (name, port, protocol)."""

    namespace: str
    name: str
    ports: tuple[Mapping[str, object], ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class LinkNames:
    """The names of what a link creates, from the link alone."""

    link: MeshLink

    @property
    def service_account(self) -> str:
        """On ``to``: the account ``from`` reads as."""
        return f"mesh-link-{self.link.source}"

    @property
    def token_secret(self) -> str:
        """On ``to``: the account's token."""
        return f"mesh-link-{self.link.source}-token"

    @property
    def reader_role(self) -> str:
        """On ``to``: the ClusterRole (and its binding) that lets the account read services."""
        return f"mesh-link-{self.link.source}-reader"

    @property
    def credentials_secret(self) -> str:
        """On ``from``: the kubeconfig for ``to`` (Linkerd's ``cluster-credentials-<to>``)."""
        return f"cluster-credentials-{self.link.target}"

    def mirror(self, service: str) -> str:
        """On ``from``: the mirror of ``service``."""
        return f"{service}-{self.link.target}"


def link_kubeconfig(cluster: str, server: str, ca_data: str, token: str) -> str:
    """A kubeconfig for ``cluster`` at ``server`` (``ca_data``: base64 PEM) with ``token``."""
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": cluster,
                    "cluster": {"server": server, "certificate-authority-data": ca_data},
                }
            ],
            "users": [{"name": f"mesh-link-{cluster}", "user": {"token": token}}],
            "contexts": [
                {"name": cluster, "context": {"cluster": cluster, "user": f"mesh-link-{cluster}"}}
            ],
            "current-context": cluster,
        }
    )


@dataclass(frozen=True)
class LinkEnds:
    """How the program reaches both ends of a link.

    ``from_access``/``to_access``: (kubeconfig path, context) of each cluster; ``to_server``:
    ``to``'s API server as ``from`` reaches it (on the twin, the same loopback address);
    ``identity_prefix``: the first part of each provider's cluster identity
    (``<prefix>.<cluster>``, the same as the cluster stacks').
    """

    from_access: tuple[str, str]
    to_access: tuple[str, str]
    to_server: str
    identity_prefix: str


def mesh_link_program(
    link: MeshLink,
    ends: LinkEnds,
    *,
    export_label: str,
    exported: Iterable[ExportedService],
    from_namespaces: Iterable[str],
    linkerd_link: bool,
) -> Callable[[], None]:
    """The inline program of ``link``.

    ``exported``: the services ``to`` exports now; ``from_namespaces``: the namespaces
    ``from``'s own stack creates; ``linkerd_link``: declare Linkerd's ``Link`` resource
    (where Linkerd's multicluster extension is installed).
    """
    names = LinkNames(link)
    services = sorted(exported, key=lambda s: (s.namespace, s.name))
    declared = set(from_namespaces)

    def program() -> None:
        import pulumi

        on_to = _on(link.target, ends.to_access, ends.identity_prefix)
        on_from = _on(link.source, ends.from_access, ends.identity_prefix)
        token = _remote_access(names, on_to)
        credentials = _credentials(link, names, token, ends.to_server, on_from)
        _mirrors(link, names, services, declared, on_from)
        if linkerd_link:
            _linkerd_link(link, names, ends.to_server, export_label, credentials, on_from)
        pulumi.export("server", ends.to_server)
        pulumi.export("token_secret", f"{LINK_NAMESPACE}/{names.token_secret}")
        pulumi.export("credentials_secret", f"{LINK_NAMESPACE}/{names.credentials_secret}")
        pulumi.export("exported", [f"{s.namespace}/{s.name}" for s in services])
        pulumi.export("mirrors", [f"{s.namespace}/{names.mirror(s.name)}" for s in services])

    return program


_META = {"namespace": LINK_NAMESPACE, "labels": MANAGED_BY, "annotations": TAKE_BACK}


def _on(cluster: str, access: tuple[str, str], identity_prefix: str) -> Any:
    """Resource options placing a resource on ``cluster`` (through its own provider)."""
    import pulumi
    import pulumi_kubernetes as k8s

    provider = k8s.Provider(
        cluster,
        kubeconfig=access[0],
        context=access[1],
        cluster_identifier=f"{identity_prefix}.{cluster}",
        enable_server_side_apply=True,
    )
    return pulumi.ResourceOptions(provider=provider)


def _remote_access(names: LinkNames, on_to: Any) -> Any:
    """On ``to``: the account ``from`` reads as, allowed to read services, and its token."""
    import pulumi
    import pulumi_kubernetes as k8s

    account = k8s.core.v1.ServiceAccount(
        "remote-access", metadata={"name": names.service_account, **_META}, opts=on_to
    )
    read = ["get", "list", "watch"]
    role = k8s.rbac.v1.ClusterRole(
        "remote-access-reader",
        metadata={"name": names.reader_role, "labels": MANAGED_BY, "annotations": TAKE_BACK},
        rules=[
            {"api_groups": [""], "resources": ["services", "endpoints"], "verbs": read},
            {"api_groups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
        ],
        opts=on_to,
    )
    binding = k8s.rbac.v1.ClusterRoleBinding(
        "remote-access-reader",
        metadata={"name": names.reader_role, "labels": MANAGED_BY, "annotations": TAKE_BACK},
        role_ref={
            "api_group": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": role.metadata.name,
        },
        subjects=[
            {"kind": "ServiceAccount", "name": account.metadata.name, "namespace": LINK_NAMESPACE}
        ],
        opts=on_to,
    )
    return k8s.core.v1.Secret(
        "remote-access-token",
        metadata={
            "name": names.token_secret,
            **_META,
            "annotations": {
                **TAKE_BACK,
                "kubernetes.io/service-account.name": names.service_account,
                # Wait for the token controller to fill the token in before reading it.
                "pulumi.com/waitFor": "jsonpath={.data.token}",
            },
        },
        type="kubernetes.io/service-account-token",
        opts=pulumi.ResourceOptions.merge(
            on_to, pulumi.ResourceOptions(depends_on=[account, binding])
        ),
    )


def _credentials(link: MeshLink, names: LinkNames, token: Any, to_server: str, on_from: Any) -> Any:
    """On ``from``: a kubeconfig for ``to`` built from the token (a secret output)."""
    import pulumi
    import pulumi_kubernetes as k8s

    def kubeconfig(data: Mapping[str, str]) -> str:
        secret = base64.b64decode(data["token"]).decode()
        return link_kubeconfig(link.target, to_server, data["ca.crt"], secret)

    return k8s.core.v1.Secret(
        "credentials",
        metadata={"name": names.credentials_secret, **_META},
        type="mirror.linkerd.io/remote-kubeconfig",
        string_data={CREDENTIALS_KEY: pulumi.Output.secret(token.data.apply(kubeconfig))},
        opts=on_from,
    )


def _mirrors(
    link: MeshLink,
    names: LinkNames,
    services: list[ExportedService],
    declared: set[str],
    on_from: Any,
) -> None:
    """On ``from``: a mirror of each exported service (and the namespaces ``from``'s own
    stack does not declare)."""
    import pulumi
    import pulumi_kubernetes as k8s

    created = {
        ns: k8s.core.v1.Namespace(
            f"namespace-{ns}",
            metadata={"name": ns, "labels": MANAGED_BY, "annotations": TAKE_BACK},
            opts=on_from,
        )
        for ns in sorted({s.namespace for s in services} - declared)
    }
    for svc in services:
        k8s.core.v1.Service(
            f"mirror-{svc.namespace}-{svc.name}",
            metadata={
                "name": names.mirror(svc.name),
                "namespace": svc.namespace,
                "labels": {
                    MIRRORED_LABEL: "true",
                    MIRROR_CLUSTER_LABEL: link.target,
                    **MANAGED_BY,
                },
                "annotations": {
                    **TAKE_BACK,
                    "mirror.linkerd.io/remote-svc-fq-name": (
                        f"{svc.name}.{svc.namespace}.svc.cluster.local"
                    ),
                },
            },
            spec={"type": "ClusterIP", "ports": [dict(p) for p in svc.ports]},
            opts=pulumi.ResourceOptions.merge(
                on_from,
                pulumi.ResourceOptions(
                    depends_on=[created[svc.namespace]] if svc.namespace in created else []
                ),
            ),
        )


def _linkerd_link(
    link: MeshLink,
    names: LinkNames,
    to_server: str,
    export_label: str,
    credentials: Any,
    on_from: Any,
) -> None:
    """On ``from``: Linkerd's ``Link``, so that its service mirror follows the exports."""
    import pulumi
    import pulumi_kubernetes as k8s

    k8s.apiextensions.CustomResource(
        "link",
        api_version="multicluster.linkerd.io/v1alpha2",
        kind="Link",
        metadata={"name": link.target, **_META},
        spec={
            "targetClusterName": link.target,
            "targetClusterDomain": "cluster.local",
            "clusterCredentialsSecret": names.credentials_secret,
            "gatewayAddress": urlparse(to_server).hostname,
            "gatewayPort": "4143",
            "gatewayIdentity": _GATEWAY_IDENTITY,
            "probeSpec": {"path": "/ready", "port": "4191", "period": "3s"},
            "selector": {"matchLabels": {export_label: "true"}},
        },
        opts=pulumi.ResourceOptions.merge(
            on_from, pulumi.ResourceOptions(depends_on=[credentials])
        ),
    )

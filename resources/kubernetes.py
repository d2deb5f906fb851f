"""Kubernetes API access to each cluster of the homelab, by kubeconfig context.

One resource, two configurations: on the twin, the twin's own kubeconfig with a context
``twin-<cluster>`` per cluster; on the homelab, the user's kubeconfig with a configurable
cluster-to-context mapping. Clients are built when asked for, never at import or load.

Besides clients, it reads what the asset checks compare with the inventory (nodes,
namespaces) and what a mesh link mirrors (exported services, mirrors, the link's stored
credentials). Kubernetes client errors are translated into
:class:`~homelab_dagster.errors.KubernetesError` where they enter.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from pydantic import Field

from homelab_dagster.errors import KubernetesError
from homelab_dagster.reconcile import LiveRef, fingerprint
from homelab_dagster.serving import ObservedPod, observed_pod
from homelab_dagster.twin_nodes import ObservedNode, observed_node

__all__ = ["ClusterAccess", "KubernetesClusters", "ObservedNode", "ServiceRef"]

# What an API status means for a caller holding a token (a mesh link, a check).
_STATUS_MEANS = {
    401: "the API server rejects the credentials: the token was deleted, revoked or expired",
    403: "the credentials are valid but not allowed to do this (RBAC)",
}


@dataclass(frozen=True)
class ClusterAccess:
    """What a Pulumi provider needs to reach a cluster: a kubeconfig file and a context."""

    cluster: str
    kubeconfig: str
    context: str
    server: str


@dataclass(frozen=True)
class ServiceRef:
    """A Service: where it is, its labels and ports (as the API returns them)."""

    namespace: str
    name: str
    labels: dict[str, str]
    ports: tuple[dict[str, Any], ...]

    @property
    def ref(self) -> str:
        """``namespace/name``."""
        return f"{self.namespace}/{self.name}"


class KubernetesClusters(dg.ConfigurableResource):
    """Kubeconfig contexts of the homelab's clusters."""

    kubeconfig: str = Field(description="The kubeconfig file (the twin's own, or the user's).")
    context_prefix: str = Field(
        default="", description="Context of a cluster without a mapping: <prefix><cluster>."
    )
    contexts: dict[str, str] = Field(
        default_factory=dict, description="Cluster name to kubeconfig context, where it differs."
    )
    link_servers: dict[str, str] = Field(
        default_factory=dict,
        description="API server URL of a cluster as other clusters reach it (mesh links), "
        "where it differs from the kubeconfig's (e.g. a Kind cluster's 127.0.0.1).",
    )
    request_timeout_s: float = Field(default=10.0, gt=0, description="Per API request.")

    # ------------------------------------------------------------------ access

    def context(self, cluster: str) -> str:
        """The kubeconfig context of ``cluster``."""
        return self.contexts.get(cluster, f"{self.context_prefix}{cluster}")

    def access(self, cluster: str) -> ClusterAccess:
        """Kubeconfig path, context and API server of ``cluster`` (for a Pulumi provider)."""
        return ClusterAccess(
            cluster,
            str(Path(self.kubeconfig).expanduser()),
            self.context(cluster),
            self.server(cluster),
        )

    def server(self, cluster: str) -> str:
        """The API server URL of ``cluster``'s context."""
        config = self._config()
        context = self.context(cluster)
        try:
            entry = next(c for c in config.get("contexts", []) if c["name"] == context)
            cluster_name = entry["context"]["cluster"]
            spec = next(c for c in config.get("clusters", []) if c["name"] == cluster_name)
            return str(spec["cluster"]["server"])
        except (StopIteration, KeyError, TypeError) as exc:
            raise KubernetesError(
                f"cluster {cluster}: no context {context!r} in {self.kubeconfig}"
            ) from exc

    def link_server(self, cluster: str) -> str:
        """The API server URL other clusters use to reach ``cluster``."""
        return self.link_servers.get(cluster) or self.server(cluster)

    def api_client(self, cluster: str) -> Any:
        """A Kubernetes API client for ``cluster``."""
        return self._context_client(self.context(cluster), f"cluster {cluster}")

    def _context_client(self, context: str, who: str) -> Any:
        """A Kubernetes API client for the kubeconfig's ``context`` (``who`` names it in errors)."""
        from kubernetes import config

        try:
            return config.new_client_from_config(
                config_file=str(Path(self.kubeconfig).expanduser()), context=context
            )
        except (config.ConfigException, OSError) as exc:
            raise KubernetesError(f"{who}: cannot load its kubeconfig: {exc}") from exc

    # ------------------------------------------------------------------ observations

    def nodes(self, cluster: str) -> list[ObservedNode]:
        """Every node of ``cluster``."""
        from kubernetes import client

        items = self._call(
            cluster, "list nodes", client.CoreV1Api(self.api_client(cluster)).list_node
        )
        return [observed_node(n) for n in items.items]

    def namespaces(self, cluster: str) -> set[str]:
        """Names of the namespaces of ``cluster``."""
        from kubernetes import client

        api = client.CoreV1Api(self.api_client(cluster))
        return {
            n.metadata.name
            for n in self._call(cluster, "list namespaces", api.list_namespace).items
        }

    def services(self, cluster: str, selector: str) -> list[ServiceRef]:
        """Services of every namespace of ``cluster`` matching the label ``selector``."""
        from kubernetes import client

        api = client.CoreV1Api(self.api_client(cluster))
        found = self._call(
            cluster,
            f"list services ({selector})",
            api.list_service_for_all_namespaces,
            label_selector=selector,
        )
        return sorted((service_ref(s) for s in found.items), key=lambda s: s.ref)

    def secret_value(self, cluster: str, namespace: str, name: str, key: str) -> str | None:
        """One value of a Secret, decoded; None when the Secret or the key is missing.

        The value is a secret: keep it in memory, never log or record it.
        """
        import base64

        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api = client.CoreV1Api(self.api_client(cluster))
        try:
            secret = api.read_namespaced_secret(
                name, namespace, _request_timeout=self.request_timeout_s
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise KubernetesError(
                f"cluster {cluster}: cannot read secret {namespace}/{name}: "
                f"{exc.status} {exc.reason}"
            ) from exc
        raw = (secret.data or {}).get(key)
        return base64.b64decode(raw).decode() if raw is not None else None

    def fingerprints(self, refs: list[LiveRef]) -> dict[LiveRef, str]:
        """The fingerprint of each object of ``refs`` as its API server has it now
        (:func:`homelab_dagster.reconcile.fingerprint`; ``absent`` for one that is gone),
        read through each context's API discovery (the kubernetes library's dynamic client).

        Raises:
            KubernetesError: a context is missing, or its API server unreachable or refusing.
        """
        from kubernetes.dynamic import DynamicClient
        from kubernetes.dynamic.exceptions import (
            DynamicApiError,
            NotFoundError,
            ResourceNotFoundError,
        )
        from urllib3.exceptions import HTTPError

        found: dict[LiveRef, str] = {}
        for context in sorted({r.context for r in refs}):
            client = self._context_client(context, f"context {context}")
            try:
                dynamic = DynamicClient(client)
            except (DynamicApiError, HTTPError) as exc:
                raise KubernetesError(f"context {context}: cannot reach its API: {exc}") from exc
            for ref in (r for r in refs if r.context == context):
                try:
                    api = dynamic.resources.get(api_version=ref.api_version, kind=ref.kind)
                    obj = api.get(
                        name=ref.name,
                        namespace=ref.namespace or None,
                        _request_timeout=self.request_timeout_s,
                    ).to_dict()
                except (NotFoundError, ResourceNotFoundError):  # the object, or its kind, gone
                    obj = None
                except (DynamicApiError, HTTPError) as exc:
                    raise KubernetesError(f"context {context}: cannot read {ref}: {exc}") from exc
                found[ref] = fingerprint(obj)
        return found

    def services_with_credentials(
        self, cluster: str, kubeconfig: str, selector: str
    ) -> list[ServiceRef]:
        """Services of ``cluster`` matching ``selector``, listed with the credentials in
        ``kubeconfig`` (a kubeconfig's text, e.g. a mesh link's), not this resource's.

        Raises:
            KubernetesError: the credentials are unusable or rejected, or the server is
                unreachable; the message says which (401: the token is gone or revoked).
        """
        from kubernetes import client, config

        try:
            parsed = yaml.safe_load(kubeconfig)
            api_client = config.new_client_from_config_dict(parsed)
        except (yaml.YAMLError, config.ConfigException, TypeError, KeyError) as exc:
            raise KubernetesError(
                f"the stored kubeconfig for {cluster} is unusable ({exc})"
            ) from exc
        server = api_client.configuration.host
        api = client.CoreV1Api(api_client)
        try:
            found = self._call(
                cluster,
                f"list services at {server}",
                api.list_service_for_all_namespaces,
                label_selector=selector,
            )
        finally:
            api_client.close()
        return sorted((service_ref(s) for s in found.items), key=lambda s: s.ref)

    def pods(self, cluster: str, namespace: str, selector: str) -> list[ObservedPod]:
        """The pods of ``namespace`` matching the label ``selector``, as a rollout sees them."""
        return [pod for _, pod in self.labelled_pods(cluster, namespace, selector)]

    def labelled_pods(
        self, cluster: str, namespace: str, selector: str
    ) -> list[tuple[dict[str, str], ObservedPod]]:
        """:meth:`pods`, each with its labels (e.g. a Dagster step pod's ``dagster/op``)."""
        from kubernetes import client

        api = client.CoreV1Api(self.api_client(cluster))
        found = self._call(
            cluster,
            f"list pods ({namespace}, {selector})",
            api.list_namespaced_pod,
            namespace=namespace,
            label_selector=selector,
        )
        return [(dict(p.metadata.labels or {}), observed_pod(p)) for p in found.items]

    def delete_job(self, cluster: str, namespace: str, name: str) -> None:
        """Delete Job ``name`` and its pods (foreground: the pods go first)."""
        from kubernetes import client

        api = client.BatchV1Api(self.api_client(cluster))
        self._call(
            cluster,
            f"delete job {namespace}/{name}",
            api.delete_namespaced_job,
            name=name,
            namespace=namespace,
            propagation_policy="Foreground",
        )

    def pod_log(self, cluster: str, namespace: str, pod: str, *, tail: int = 20) -> str:
        """The last ``tail`` lines of ``pod``'s log (its previous container's, if it restarted)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api = client.CoreV1Api(self.api_client(cluster))
        for previous in (True, False):
            try:
                # The raw response: deserialised, the client returns the repr of the bytes.
                response = api.read_namespaced_pod_log(
                    pod,
                    namespace,
                    tail_lines=tail,
                    previous=previous,
                    _request_timeout=self.request_timeout_s,
                    _preload_content=False,
                )
            except ApiException:
                continue  # no previous container: the current one's log
            return str(response.data.decode(errors="replace"))
        return ""

    # ------------------------------------------------------------------ port-forward

    @contextlib.contextmanager
    def port_forward(self, cluster: str, namespace: str, pod: str, port: int) -> Iterator[int]:
        """Forward a local port to ``pod``'s ``port`` through the API server (what ``kubectl
        port-forward`` does), for as long as the context lasts; yields the local port.

        Each connection to ``127.0.0.1:<local port>`` opens its own port-forward stream
        through the API server and the pod's kubelet, with this resource's credentials: it
        works wherever the API server does, whatever the cluster's network allows.
        """
        from kubernetes import client

        api = client.CoreV1Api(self.api_client(cluster))
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        stop = threading.Event()

        def relay(conn: socket.socket) -> None:
            from kubernetes.client.exceptions import ApiException
            from kubernetes.stream import portforward
            from websocket import WebSocketException

            try:
                forward = portforward(
                    api.connect_get_namespaced_pod_portforward, pod, namespace, ports=str(port)
                )
            except (ApiException, WebSocketException, OSError):
                conn.close()  # the client sees the connection closed: its error to report
                return
            remote = forward.socket(port)
            try:
                _pump(conn, remote, stop)
            finally:
                conn.close()
                forward.close()

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                threading.Thread(target=relay, args=(conn,), daemon=True).start()

        server = threading.Thread(target=serve, name=f"port-forward {pod}:{port}", daemon=True)
        server.start()
        try:
            yield listener.getsockname()[1]
        finally:
            stop.set()
            listener.close()
            server.join(timeout=2)

    # ------------------------------------------------------------------ helpers

    def _config(self) -> dict[str, Any]:
        path = Path(self.kubeconfig).expanduser()
        try:
            return yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise KubernetesError(f"cannot read the kubeconfig {path}: {exc}") from exc

    def _call(self, cluster: str, what: str, fn: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(_request_timeout=self.request_timeout_s, **kwargs)
        except ApiException as exc:
            why = _STATUS_MEANS.get(exc.status or 0, "")
            raise KubernetesError(
                f"cluster {cluster}: {what}: {exc.status} {exc.reason}{f' ({why})' if why else ''}"
            ) from exc
        except HTTPError as exc:
            raise KubernetesError(f"cluster {cluster}: {what}: unreachable ({exc})") from exc


def _pump(local: socket.socket, remote: Any, stop: threading.Event) -> None:
    """Copy bytes both ways between ``local`` and ``remote`` until either side closes."""
    import select

    while not stop.is_set():
        readable, _, _ = select.select([local, remote], [], [], 0.2)
        for source in readable:
            try:
                data = source.recv(65536)
                if not data:
                    return
                (remote if source is local else local).sendall(data)
            except OSError:  # either side reset the connection: it is over
                return


def service_ref(service: Any) -> ServiceRef:
    """A :class:`ServiceRef` of a client ``V1Service``."""
    ports = tuple(
        {
            k: v
            for k, v in (
                ("name", p.name),
                ("port", p.port),
                ("protocol", p.protocol),
                ("targetPort", p.target_port),
            )
            if v is not None
        }
        for p in (service.spec.ports or [])
    )
    return ServiceRef(
        service.metadata.namespace,
        service.metadata.name,
        dict(service.metadata.labels or {}),
        ports,
    )

"""vLLM servers: how this deployment runs them, and the OpenAI client that checks them.

One resource, two configurations. :class:`VllmServers` says what the endpoint program needs
besides the inventory (on the twin: the image of vLLM's CPU build from the twin's registry,
``--enforce-eager --dtype float32``, ``VLLM_CPU_KVCACHE_SPACE``; on the homelab: the
inventory's pinned CUDA image), where the pods' copy step finds the weights store (its
bucket, endpoint and keys: the only differences there), and opens :class:`ServerClient`\\ s,
which talk to a server with the ``openai`` package.

**How a check reaches the server: the Kubernetes API's port-forward, on both targets.** The
twin's clusters have no kube-proxy (a NodePort answers nowhere), and on the homelab the step
that checks runs on Studio, where Forge's NodePort is reachable only through the mesh, which
the twin does not carry. The API server's port-forward (:meth:`KubernetesClusters.port_forward
<resources.kubernetes.KubernetesClusters.port_forward>`) reaches the pod itself with the
credentials the asset already uses, so a check proves that pod, not whatever a Service or a
mirror routes to.

**Retries**: on connection errors only (the port-forward or the server not accepting yet),
``connect_retries`` times with exponential backoff from ``backoff_s``. An HTTP error, or a
request that times out after connecting, is an answer: it is never retried. The client's own
retries are off (``max_retries=0``): it would retry 5xx and 429 as well. Errors of the
``openai`` package become :class:`~homelab_dagster.errors.EndpointError` here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import dagster as dg
from pydantic import Field

from homelab_dagster.errors import EndpointError
from homelab_dagster.inventory import Endpoint
from infra.endpoint import SERVER_PORT, ExternalKeys, ServerRuntime, StoreKeys, WeightsSource
from resources._s3 import file_keys
from resources.kubernetes import KubernetesClusters

__all__ = ["Completion", "ServerClient", "VllmServers"]

T = TypeVar("T")


@dataclass(frozen=True)
class Completion:
    """One answer: its text, how long it took, to the first token and in all, and its tokens."""

    text: str
    latency_s: float
    first_token_s: float
    completion_tokens: int

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second after the first token (decode speed)."""
        decode = self.latency_s - self.first_token_s
        return (
            (self.completion_tokens - 1) / decode
            if decode > 0 and self.completion_tokens > 1
            else 0.0
        )


class VllmServers(dg.ConfigurableResource):
    """How this deployment runs vLLM servers, and how checks talk to them."""

    image: str | None = Field(
        default=None, description="The server image (None: each endpoint's inventory image)."
    )
    runtime_args: list[str] = Field(
        default_factory=list, description="Server arguments this runtime needs (CPU build)."
    )
    runtime_env: dict[str, str] = Field(
        default_factory=dict, description="Server environment this runtime needs."
    )
    memory: str | None = Field(default=None, description="Memory each server pod requests.")
    weights_bucket_url: str = Field(default="", description="s3://bucket of the weights store.")
    weights_endpoint_url: str = Field(
        default="", description="The store's S3 endpoint as the serving pods reach it."
    )
    weights_copy_image: str = Field(
        default="", description="The image of the pods' copy step (the project's own)."
    )
    weights_credentials_file: str | None = Field(
        default=None,
        description="An AWS shared-credentials file whose keys the endpoint's stack puts in "
        "the copy step's Secret (the twin's generated keys). None: an ExternalSecret makes "
        "that Secret from weights_secret_store (the homelab).",
    )
    weights_secret_store: str = Field(
        default="homelab", description="The ClusterSecretStore holding the store's keys."
    )
    weights_secret_key: str = Field(
        default="weights-store",
        description="Its remote key (properties access_key and secret_key).",
    )
    serves_unstored: bool = Field(
        default=True,
        description="Whether a model whose weights are not in the store is served from its "
        "hub id (the homelab). False (the twin, offline): its endpoint is deployed until "
        "the scheduler places its pod, then scaled to zero, and its serving checks skip.",
    )
    ready_timeout_s: float = Field(
        default=900.0, gt=0, description="How long a rollout may take to serve."
    )
    unschedulable_grace_s: float = Field(
        default=120.0,
        ge=0,
        description="How long the scheduler's refusal must last to fail a rollout (GPUs "
        "another pod is giving back free up in seconds).",
    )
    request_timeout_s: float = Field(default=60.0, gt=0, description="Per request.")
    connect_retries: int = Field(default=5, ge=0, description="Retries on connection errors.")
    backoff_s: float = Field(default=0.5, gt=0, description="First retry's wait (doubled each).")

    def pulled_images(self, endpoint: Endpoint) -> list[str]:
        """The images ``endpoint``'s pods pull: its server's, and its copy step's."""
        server = ServerRuntime(image=self.image).image_of(endpoint)
        return [server, self.weights_copy_image] if self.weights_copy_image else [server]

    def runtime(self) -> ServerRuntime:
        """What the endpoint program takes from this deployment."""
        return ServerRuntime(
            image=self.image,
            args=tuple(self.runtime_args),
            env=dict(self.runtime_env),
            memory=self.memory,
            weights=WeightsSource(
                bucket_url=self.weights_bucket_url,
                endpoint_url=self.weights_endpoint_url,
                copy_image=self.weights_copy_image,
                keys=(
                    StoreKeys(*file_keys(self.weights_credentials_file))
                    if self.weights_credentials_file
                    else ExternalKeys(self.weights_secret_store, self.weights_secret_key)
                ),
            ),
        )

    @contextmanager
    def connect(
        self, kubernetes: KubernetesClusters, cluster: str, namespace: str, pod: str
    ) -> Iterator[ServerClient]:
        """A client of the server in ``pod``, through the API server's port-forward."""
        with kubernetes.port_forward(cluster, namespace, pod, SERVER_PORT) as port:
            yield self.client(f"http://127.0.0.1:{port}/v1")

    def client(self, base_url: str) -> ServerClient:
        """A client of the server at ``base_url`` (``http://host:port/v1``)."""
        return ServerClient(
            base_url,
            timeout_s=self.request_timeout_s,
            retries=self.connect_retries,
            backoff_s=self.backoff_s,
        )


class ServerClient:
    """An OpenAI-compatible server at ``base_url``: its models, completions and chats."""

    def __init__(
        self, base_url: str, *, timeout_s: float = 60.0, retries: int = 5, backoff_s: float = 0.5
    ) -> None:
        import openai

        self.base_url = base_url
        self.retries = retries
        self.backoff_s = backoff_s
        # vLLM asks for no key unless started with --api-key; the package insists on one.
        self._client = openai.OpenAI(
            base_url=base_url, api_key="unused", timeout=timeout_s, max_retries=0
        )

    def models(self) -> list[str]:
        """The names ``/v1/models`` lists."""
        return self._call("list models", lambda: [m.id for m in self._client.models.list()])

    def complete(self, model: str, prompt: str, max_tokens: int = 16) -> Completion:
        """A completion of ``prompt``, streamed (to time the first token), greedy."""

        def call() -> Completion:
            start = time.perf_counter()
            first: float | None = None
            parts: list[str] = []
            tokens = 0
            stream = self._client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.text and first is None:
                        first = time.perf_counter() - start
                    parts.append(choice.text or "")
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            total = time.perf_counter() - start
            return Completion("".join(parts), total, first if first is not None else total, tokens)

        return self._call(f"complete with {model}", call)

    def chat(self, model: str, message: str, max_tokens: int = 16) -> Completion:
        """A chat completion of one user ``message`` (the server applies the chat template)."""

        def call() -> Completion:
            start = time.perf_counter()
            answer = self._client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": message}],
                max_tokens=max_tokens,
                temperature=0.0,
            )
            total = time.perf_counter() - start
            text = answer.choices[0].message.content or "" if answer.choices else ""
            tokens = answer.usage.completion_tokens if answer.usage else 0
            return Completion(text, total, total, tokens)

        return self._call(f"chat with {model}", call)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried on connection errors only; ``openai`` errors become EndpointError."""
        import openai

        wait = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except openai.APITimeoutError as exc:  # connected, then no answer in time
                raise EndpointError(f"{self.base_url}: {what}: timed out ({exc})") from exc
            except openai.APIConnectionError as exc:
                if attempt == self.retries:
                    raise EndpointError(
                        f"{self.base_url}: {what}: cannot connect after {attempt + 1} "
                        f"attempt(s): {_cause(exc)}"
                    ) from exc
                time.sleep(wait)
                wait *= 2
            except openai.APIStatusError as exc:
                raise EndpointError(
                    f"{self.base_url}: {what}: HTTP {exc.status_code}: {_body(exc)}"
                ) from exc
            except openai.APIError as exc:  # e.g. an error event in the middle of a stream
                raise EndpointError(f"{self.base_url}: {what}: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover


def _cause(exc: BaseException) -> str:
    return str(exc.__cause__ or exc)


def _body(exc: Any) -> str:
    """The server's error message (vLLM answers ``{"error": {"message": ...}}``)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])
        if "message" in body:
            return str(body["message"])
    return str(exc)

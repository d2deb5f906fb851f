"""The OpenAI client of resources/vllm.py: retries on connection errors only, errors mapped.

Real sockets on loopback: a listener that drops every connection (a connection error, each
one counted), and an HTTP server that answers 500 or a model list (an answer: never retried).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from homelab_dagster.errors import EndpointError
from resources.vllm import VllmServers


@contextlib.contextmanager
def _dropping_listener() -> Iterator[tuple[int, list[int]]]:
    """A port whose every connection is closed at once; yields it and the accept count."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    accepted: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join(timeout=2)
        server.close()


@contextlib.contextmanager
def _http(status: int, body: dict) -> Iterator[tuple[int, list[str]]]:
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], requests
    finally:
        server.shutdown()
        server.server_close()


def test_connection_errors_are_retried_with_backoff_then_named():
    servers = VllmServers(connect_retries=2, backoff_s=0.01)
    with _dropping_listener() as (port, accepted):
        client = servers.client(f"http://127.0.0.1:{port}/v1")
        with pytest.raises(EndpointError) as info:
            client.models()
    assert len(accepted) == 3  # the first try and two retries
    assert "cannot connect after 3 attempt(s)" in str(info.value)


def test_an_http_error_is_an_answer_never_retried():
    body = {"error": {"message": "The model `x` does not exist."}}
    with _http(500, body) as (port, requests):
        client = VllmServers(connect_retries=3, backoff_s=0.01).client(
            f"http://127.0.0.1:{port}/v1"
        )
        with pytest.raises(EndpointError) as info:
            client.models()
    assert requests == ["/v1/models"]
    assert "HTTP 500: The model `x` does not exist." in str(info.value)


def test_models_lists_the_served_names():
    body = {"object": "list", "data": [{"id": "sre-agent", "object": "model"}]}
    with _http(200, body) as (port, _):
        client = VllmServers().client(f"http://127.0.0.1:{port}/v1")
        assert client.models() == ["sre-agent"]

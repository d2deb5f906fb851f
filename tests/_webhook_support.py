"""A real webhook receiver on loopback, and the failure sensor evaluated as the daemon does,
shared by the webhook's tests and the secrets fault."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg

from sensors.failures import FAILURE_SENSOR, build_failure_sensor


class Receiver:
    """An HTTP server on 127.0.0.1 recording each POST's path and JSON body; its URL carries
    ``token`` in its path, as Slack's and PagerDuty's do."""

    def __init__(self, token: str, delay_s: float = 0.0, status: int = 200) -> None:
        received: list[tuple[str, dict]] = []
        self.received = received
        gate = threading.Event()
        self.release = gate.set

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.path, json.loads(body)))
                if delay_s:
                    gate.wait(delay_s)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/{token}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


def evaluate_failure_sensor(
    instance: dg.DagsterInstance, run_id: str, resources: Mapping[str, object]
) -> object:
    """The failure sensor's evaluation of failed run ``run_id`` (its RUN_FAILURE event), with
    ``resources``, against the real ``instance``."""
    sensor = build_failure_sensor(running=True).resolve_sensor_def(FAILURE_SENSOR)
    run = instance.get_run_by_id(run_id)
    assert run is not None
    (failure,) = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.RUN_FAILURE
    ).records
    event = failure.event_log_entry.dagster_event
    assert event is not None
    context = dg.build_run_status_sensor_context(
        sensor_name=FAILURE_SENSOR,
        dagster_event=event,
        dagster_instance=instance,
        dagster_run=run,
        resources=dict(resources),
    )
    return sensor(context.for_run_failure())

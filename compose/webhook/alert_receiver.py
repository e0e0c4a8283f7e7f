"""A stand-in for a pager: prints every alert Alertmanager's webhook sends, one JSON line each.

`python alert_receiver.py [--port 8000]` serves POST /alerts (Alertmanager's webhook payload,
version 4) and GET /healthz. Watch it with `docker compose logs -f alert-webhook`; point
Alertmanager's receiver at your real pager instead when you copy the stack.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO


def alert_lines(payload: dict[str, Any]) -> list[str]:
    """One line per alert: what a person on call reads first."""
    lines = []
    for alert in payload.get("alerts", []):
        labels = alert.get("labels", {})
        annotations = alert.get("annotations", {})
        record = {
            "status": alert.get("status", payload.get("status")),
            "alertname": labels.get("alertname"),
            "summary": annotations.get("summary"),
            "labels": labels,
            "startsAt": alert.get("startsAt"),
            "receiver": payload.get("receiver"),
        }
        lines.append(json.dumps(record, sort_keys=True))
    return lines


class Handler(BaseHTTPRequestHandler):
    out: TextIO = sys.stdout

    def do_GET(self) -> None:
        self._reply(200 if self.path == "/healthz" else 404)

    def do_POST(self) -> None:
        if self.path != "/alerts":
            self._reply(404)
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            payload = json.loads(self.rfile.read(length))
            lines = alert_lines(payload)
        except (ValueError, AttributeError) as exc:
            # A 400 makes Alertmanager log the failure instead of believing it was delivered.
            self._reply(400, f"bad payload: {exc}\n")
            return
        for line in lines:
            print(line, file=self.out, flush=True)
        self._reply(200)

    def _reply(self, status: int, body: str = "") -> None:
        data = (body or f"{status}\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        # The access log would bury the alerts under a health check line every few seconds.
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"alert receiver: POST alerts to http://{args.host}:{args.port}/alerts", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

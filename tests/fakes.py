"""Small fake servers on 127.0.0.1 for what cannot run here (Elasticsearch, Kibana): they record
every request and answer like the real ones do for the calls we make."""

from __future__ import annotations

import json
import threading
import urllib.parse
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any


class FakeServer:
    """An HTTP server on 127.0.0.1 that records requests and answers from `respond`."""

    def __init__(self) -> None:
        self.requests: list[SimpleNamespace] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = SimpleNamespace(
                    method=self.command,
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=self.rfile.read(length) if length else b"",
                )
                server.requests.append(request)
                status, headers, body = server.respond(request)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                payload = json.dumps(body).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_HEAD = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def respond(self, request: SimpleNamespace) -> tuple[int, dict[str, str], Any]:
        raise NotImplementedError

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeElasticsearch(FakeServer):
    def __init__(self, version: str = "8.13.4", **behaviour: Any) -> None:
        self.version = version
        self.stored: dict[str, Any] = {}
        self.data_streams: list[dict[str, str]] = []
        self.unavailable = behaviour.pop("unavailable", 0)
        self.reject_auth = behaviour.pop("reject_auth", False)
        self.product = behaviour.pop("product", "Elasticsearch")
        super().__init__()

    def respond(self, request: SimpleNamespace) -> tuple[int, dict[str, str], Any]:
        headers = {"X-Elastic-Product": self.product} if self.product else {}
        if self.unavailable:
            self.unavailable -= 1
            return 503, headers, {"error": {"type": "master_not_discovered_exception"}}
        if self.reject_auth:
            error = {"type": "security_exception", "reason": "unable to authenticate user [u]"}
            return 401, headers, {"error": error, "status": 401}
        path = urllib.parse.unquote(request.path)
        if path == "/":
            return 200, headers, {"cluster_name": "fake", "version": {"number": self.version}}
        if path.startswith("/_data_stream/"):
            return 200, headers, {"data_streams": self.data_streams}
        if request.method == "PUT":
            self.stored[path] = json.loads(request.body)
            return 200, headers, {"acknowledged": True}
        if path in self.stored:
            return 200, headers, {"found": self.stored[path]}
        return 404, headers, {"error": {"type": "resource_not_found_exception"}, "status": 404}


class FakeKibana(FakeServer):
    def __init__(self, unavailable: int = 0, fail: bool = False) -> None:
        self.unavailable = unavailable
        self.fail = fail
        self.uploads: list[SimpleNamespace] = []
        super().__init__()

    def respond(self, request: SimpleNamespace) -> tuple[int, dict[str, str], Any]:
        if self.unavailable:
            self.unavailable -= 1
            return 503, {}, {"statusCode": 503, "message": "Kibana server is not ready yet"}
        if request.path.endswith("/api/status"):
            return 200, {}, {"status": {"overall": {"level": "available"}}}
        if "/api/saved_objects/_import" not in request.path:
            return 404, {}, {"statusCode": 404}
        message = BytesParser(policy=email_policy).parsebytes(
            f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode() + request.body
        )
        (part,) = message.iter_parts()
        upload = SimpleNamespace(
            field=part.get_param("name", header="content-disposition"),
            filename=part.get_filename(),
            content=part.get_payload(decode=True),
        )
        self.uploads.append(upload)
        objects = [json.loads(line) for line in upload.content.splitlines()]
        if self.fail:
            error = {"type": "missing_references", "references": [{"type": "x", "id": "y"}]}
            return (
                200,
                {},
                {
                    "success": False,
                    "successCount": len(objects) - 1,
                    "errors": [
                        {"type": "lens", "id": "z", "meta": {"title": "Chart"}, "error": error}
                    ],
                },
            )
        results = [{"type": o["type"], "id": o["id"]} for o in objects]
        return 200, {}, {"success": True, "successCount": len(objects), "successResults": results}

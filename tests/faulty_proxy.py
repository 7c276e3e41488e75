"""An HTTP proxy on 127.0.0.1 in front of a real server (the S3 API server, Label Studio) that
fails requests on purpose, the ways networks and services fail: the client must retry them and
must not repeat work the server already did."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")

Fault = Callable[[str, str, int], "str | None"]


def every(n: int, budget: int) -> Fault:
    """Every n-th request (up to `budget` of them) is refused: S3 throttling (n=0: none)."""
    refused = [0]

    def fault(method: str, path: str, count: int) -> str | None:
        if n and refused[0] < budget and count % n == 0:
            refused[0] += 1
            return "before"
        return None

    return fault


class FaultyProxy:
    """Forwards to `upstream`. `fault(method, path, n)` decides each request (n counts from 1):
    None forwards it; "before" answers 503 with `refusal` without forwarding (throttling);
    "after" forwards it, then answers 502 (the server did the work, the client never hears).

    Records `requests_seen` (method, path, outcome), `injected` (requests failed) and
    `bytes_out` (response bodies sent back: what the client read from the server).
    """

    def __init__(self, upstream: str, fault: Fault | None = None, refusal: bytes = SLOW_DOWN) -> None:
        self.upstream = urlsplit(upstream)
        self.fault = fault or every(0, 0)
        self.requests_seen: list[tuple[str, str, str]] = []
        self.injected = self.bytes_out = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body: bytes, headers=(), length: str | None = None) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", length or str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                    with proxy._lock:
                        proxy.bytes_out += len(body)

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    outcome = proxy.fault(self.command, self.path, len(proxy.requests_seen) + 1)
                    proxy.requests_seen.append((self.command, self.path, outcome or "forwarded"))
                    proxy.injected += outcome is not None
                if outcome == "before":
                    return self._reply(503, refusal, [("Content-Type", "application/xml")])
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if outcome == "after":
                    return self._reply(502, b"Bad Gateway")
                # a HEAD answer has no body but must keep the object's length
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self._reply(resp.status, data, resp.getheaders(), length)

            do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

"""A real Label Studio server on 127.0.0.1 for the tests, and a proxy that makes it flaky.

The server is the `label-studio` package (1.23) from its own virtualenv, .venv-labelstudio
(`make labelstudio` builds it; its pins clash with ours), or the executable named by
BATCHSEG_LABEL_STUDIO. It runs offline: LATEST_VERSION_CHECK=false (the version check
otherwise hangs), its own data dir, a user made by --username/--password/--user-token, and
LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true so that token is accepted as `Token ...`, and
SSRF_PROTECTION_ENABLED=false so it may reach the tests' S3 API server on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import REPO, free_port

LABEL_STUDIO = Path(os.environ.get("BATCHSEG_LABEL_STUDIO", REPO / ".venv-labelstudio" / "bin" / "label-studio"))
TOKEN = "batchseg0test0token000000000000000000001"  # 40 characters: the most Label Studio keeps
START_SECONDS = 300  # the first start migrates a fresh SQLite database: ~20-50 s here


@dataclass
class LabelStudioServer:
    url: str
    token: str
    log: Path


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """A fresh Label Studio with an empty database, for one test module; or the running one at
    BATCHSEG_LABEL_STUDIO_URL (with BATCHSEG_LABEL_STUDIO_TOKEN) while developing."""
    if os.environ.get("BATCHSEG_LABEL_STUDIO_URL"):
        yield LabelStudioServer(os.environ["BATCHSEG_LABEL_STUDIO_URL"], os.environ["BATCHSEG_LABEL_STUDIO_TOKEN"], Path("/dev/null"))
        return
    if not LABEL_STUDIO.exists():
        pytest.skip(f"Label Studio server not installed at {LABEL_STUDIO}: run `make labelstudio`")
    data = tmp_path_factory.mktemp("label_studio")
    port = free_port()
    log = data / "server.log"
    env = {**os.environ, "LATEST_VERSION_CHECK": "false", "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "LABEL_STUDIO_BASE_DATA_DIR": str(data), "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
           # the S3 API server of the tests is on 127.0.0.1, which Label Studio's SSRF guard blocks
           "SSRF_PROTECTION_ENABLED": "false"}
    env.pop("PYTHONPATH", None)  # its own environment, not ours
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(LABEL_STUDIO), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
             "--data-dir", str(data), "--username", "batchseg@example.com", "--password", "batchseg-test-pw",
             "--user-token", TOKEN],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=data, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server, log)
        yield LabelStudioServer(url, TOKEN, log)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and its reloader child
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _wait_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    pytest.fail(f"Label Studio did not start at {url} within {START_SECONDS} s "
                f"(exit code {server.poll()}); its log ends:\n{tail}")


class FlakyProxy:
    """Forwards HTTP to `upstream`; `fault(method, path, n)` -> None (forward), "before" (answer
    503 without forwarding) or "after" (forward, then answer 502: the server did the work but the
    client never hears of it). `n` counts requests from 1. Records (method, path, outcome)."""

    def __init__(self, upstream: str, fault: Callable[[str, str, int], str | None]) -> None:
        self.upstream = urlsplit(upstream)
        self.fault = fault
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    n = len(proxy.log) + 1
                    outcome = proxy.fault(self.command, self.path, n)
                    proxy.log.append((self.command, self.path, outcome or "forwarded"))
                if outcome == "before":
                    return self._reply(503, b"Service Unavailable")
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if outcome == "after":
                    return self._reply(502, b"Bad Gateway")
                self._reply(resp.status, data, resp.getheaders())

            do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FlakyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

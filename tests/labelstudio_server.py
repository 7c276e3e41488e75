"""A real Label Studio server on 127.0.0.1 for the tests (tests.faulty_proxy makes it flaky).

The server is the `label-studio` package (1.23) from its own virtualenv, .venv-labelstudio
(`make labelstudio` builds it; its pins clash with ours), or the executable named by
BATCHSEG_LABEL_STUDIO. It runs offline: LATEST_VERSION_CHECK=false (the version check
otherwise hangs), its own data dir, a user made by --username/--password/--user-token, and
LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true so that token is accepted as `Token ...`, and
SSRF_PROTECTION_ENABLED=false so it may reach the tests' S3 API server on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

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

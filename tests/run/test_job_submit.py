"""`ray start --head` on 127.0.0.1, then `ray job submit` of the jobs/ entrypoint, as users do."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, read_rows, wait_http

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def head_node(tmp_path):
    """A Ray head node of its own (own ports, own process group), torn down with its group:
    `ray stop` would also kill the session's other local cluster.

    Yields (dashboard address, env for Ray CLI calls). Ray >= 2.59 requires token auth on
    local clusters; head and clients share RAY_AUTH_MODE=token and the token.
    """
    env = {
        **os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
        # the entrypoint says `python`: on a cluster node that is the env batchseg is installed in
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    gcs, dashboard = free_port(), free_port()
    ports = {
        "--node-manager-port": free_port(), "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
        "--ray-client-server-port": free_port(),
    }
    cmd = [
        RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
        "--num-cpus", "2", "--disable-usage-stats",
        *[str(x) for kv in ports.items() for x in kv],
    ]
    log = open(tmp_path / "ray_start.log", "w")
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_http(f"{address}/api/version", seconds=120)
        _wait_jobs_api(address, env)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()


def _wait_jobs_api(address: str, env: dict, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while subprocess.run([RAY, "job", "list", "--address", address], capture_output=True, env=env).returncode != 0:
        if time.time() > deadline:
            raise TimeoutError("Ray job API did not come up")
        time.sleep(1)


def test_ray_job_submit_of_the_jobs_entrypoint(head_node, samples, tmp_path):
    address, env = head_node
    out = tmp_path / "out"
    result = subprocess.run(
        [
            RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
            "python", "jobs/annotate.py", "--config", "jobs/configs/local-demo.yaml",
            "--input", str(samples.root / "street"), "--input", str(samples.root / "bad"),
            "--output", str(out), "--min-size", "128", "--max-size", "256",
        ],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    assert "batchseg: 6 images, 2 annotated, 4 failed" in result.stdout
    rows = read_rows(str(out / "annotations"))
    assert len(rows) == 6 and sum(r["error"] is None for r in rows) == 2
    summary = json.loads((out / "run.json").read_text())
    assert summary["images"] == {"in": 6, "annotated": 2, "failed": 4}
    assert summary["config"]["models"]["instance"]["backend"] == "torchvision"

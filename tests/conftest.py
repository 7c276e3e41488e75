"""Shared fixtures: sample images with ground truth, one local Ray cluster, an S3 API server.

Everything is real and local: Ray workers are separate processes, so S3 is a moto server on
127.0.0.1 (an in-process mock would not reach them) and credentials travel as env vars.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Set before Ray starts: workers inherit the environment of the cluster they belong to.
os.environ.update({
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
})


@pytest.fixture(scope="session", autouse=True)
def weights_cache(tmp_path_factory):
    os.environ["BATCHSEG_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def samples(tmp_path_factory):
    from batchseg.samples import write_samples

    dest = tmp_path_factory.mktemp("samples")
    made = write_samples(dest, bad=True)
    return SimpleNamespace(dir=dest, root=dest / "images", gt_path=dest / "ground_truth.json", **made)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def keeping_sessions_ray_client():
    """Around a `ray.cluster_utils.Cluster` made in this process: starting its head points this
    process's internal-KV client at that cluster's GCS (and Cluster.shutdown resets it). Once
    the cluster is gone, the session's own Ray (`ray_cluster`) would call the dead GCS and,
    after 60 s, Ray terminates the whole pytest process (exit 1, no summary). The session's
    client is put back on the way out."""
    from ray.experimental import internal_kv

    sessions = internal_kv.internal_kv_get_gcs_client()
    try:
        yield
    finally:
        if sessions is not None:
            internal_kv._initialize_internal_kv(sessions)
        else:
            internal_kv._internal_kv_reset()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float = 30.0) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # the server answered
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def moto_server(**env: str):
    """A moto S3 API server on 127.0.0.1 in its own process (`env` added to its environment);
    yields its URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 API server on 127.0.0.1 for the whole session; yields its URL."""
    with moto_server() as url:
        yield url


def random_boxes(rng, height: int, width: int, n: int) -> np.ndarray:
    """(n, 4) float x0, y0, x1, y1 inside a height x width image; half of them touch an image
    border (one side moved onto it), the way model boxes clipped to the image do."""
    corners = np.sort(rng.uniform(0, 1, (n, 2, 2)), axis=1) * [width, height]
    boxes = np.concatenate([corners[:, 0], corners[:, 1]], axis=1)
    border = np.array([0, 0, width, height], float)
    for i, side in enumerate(rng.integers(0, 4, n // 2)):
        boxes[i, side] = border[side]
    return boxes


@pytest.fixture(scope="session")
def tv_weights(tmp_path_factory) -> Path:
    """A randomly initialised 91-class torchvision Mask R-CNN saved as a plain state dict."""
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path_factory.mktemp("weights") / "maskrcnn_random.pth"
    torch.save(model.state_dict(), path)
    return path


def run_job(**config):
    """Validate like the CLI does, then run on the already-connected Ray cluster."""
    from batchseg.run import job
    from batchseg.config import load_config

    cfg = load_config(None, [([key], value) for key, value in config.items()])
    job.preflight(cfg)
    return cfg, job.run(cfg)


def read_rows(annotations: str, **storage_options) -> list[dict]:
    """All rows of an output dataset (local path or s3://), sorted by URI."""
    import pyarrow.dataset as pads
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(annotations, **storage_options)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    return sorted(table.to_pylist(), key=lambda r: r["image_uri"])


def relative_name(uri: str, root: Path) -> str:
    """Output image_uri -> the sample name under `root` (tar members as SHARD/member)."""
    if uri.startswith("tar://"):
        member, shard = uri[len("tar://"):].split("::", 1)
        return f"{relative_name(shard, root)}/{member}"
    path = uri.split("://", 1)[1] if "://" in uri else uri
    return str(Path(path).relative_to(root.resolve())) if path.startswith("/") else path.split("/images/", 1)[1]

"""`batchseg train` on Ray Train, end to end, with real parts: a local Ray cluster (3 CPUs: two
for the workers, one for Ray Data's decode tasks) the commands attach to, CPU workers on gloo, Ray Data decoding, checkpoints on disk, real
process kills (SIGKILL of a RayTrainWorker process; Ctrl-C of the command itself), pycocotools
for held-out AP, and `batchseg run --model-dir` loading the result.

Sizes are small (64-128 px images, a ResNet-18 FPN, tens of iterations) so that a test takes a
minute or two on a quiet 2-core machine; the AP bound is loose (trained > base, where the
base is a random initialisation whose AP is 0 or nearly) and the seeds are fixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, keeping_sessions_ray_client

ARCH = "maskrcnn_resnet18_fpn"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from batchseg.samples import write_samples

    dest = tmp_path_factory.mktemp("scenes")
    write_samples(dest, scenes=60, seed=11)
    return dest


@pytest.fixture(scope="module")
def cluster():
    """One head node for the module's commands (`--ray-address`): started once, not per command."""
    from ray.cluster_utils import Cluster

    with keeping_sessions_ray_client():
        head = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
        yield head.address
        head.shutdown()


def raylet_of(address: str) -> int:
    """The pid of the raylet of the cluster at `address` (the parent of its worker processes)."""
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.name.isdigit() and cmd[0].endswith(b"/raylet") and f"--gcs-address={address}".encode() in cmd:
            return int(entry.name)
    raise AssertionError(f"no raylet of {address}")


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory):
    """A random initialisation saved to a file: torchvision weights cannot be downloaded here."""
    from batchseg.train.recipe import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "random_init.pt"
    torch.save(build_model(ARCH, 2).state_dict(), path)  # another head: the recipe replaces it
    return path


def batchseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchseg", *args]


def train_args(scenes: Path, out: Path, base: Path, address: str, *extra: str) -> list[str]:
    return batchseg("train", "--data", str(scenes / "ground_truth.json"), "--images", str(scenes / "images"),
                    "--output", str(out), "--arch", ARCH, "--base-weights", str(base), "--min-images", "8",
                    "--ray-address", address, *extra)


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd[2:4])} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def history(model: Path) -> list[dict]:
    return [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(1800)
def test_training_beats_the_base_model_and_batchseg_run_loads_the_result(scenes, base_weights, cluster, tmp_path):
    model = tmp_path / "model"
    done = run(train_args(scenes, model, base_weights, cluster, "--iterations", "60", "--checkpoint-every", "30",
                          "--min-size", "96", "--max-size", "160", "--lr", "0.01"), timeout=800)
    card = json.loads((model / "model_card.json").read_text())
    assert "held-out segm AP/AP50" in done.stdout.splitlines()[-1]

    weights = (model / "weights.pt").read_bytes()
    assert card["weights"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert (model / "weights.pt.sha256").read_text().split()[0] == card["weights"]["sha256"]
    state = torch.load(model / "weights.pt", weights_only=True)
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 5  # 4 categories + background
    assert json.loads((model / "label_map.json").read_text())["1"] == {"id": 1, "name": "person"}
    assert (model / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["iteration"] for r in history(model)] == [0, 30, 60]
    assert card["base_weights"]["sha256"] == hashlib.sha256(base_weights.read_bytes()).hexdigest()
    assert card["data"]["kind"] == "coco" and card["data"]["images"]["train"] + card["data"]["images"]["heldout"] == 71
    assert card["iterations"] == 60 and card["hyper"]["lr"] == 0.01

    base, trained = card["heldout"]["base"], card["heldout"]["trained"]
    assert trained["segm_AP"] > base["segm_AP"], card["heldout"]

    lake = tmp_path / "lake"
    lake.mkdir()
    for image in sorted((scenes / "images" / "shapes").iterdir())[:8]:
        shutil.copy(image, lake)
    out = tmp_path / "run"
    run(batchseg("run", "--input", str(lake), "--output", str(out), "--model-dir", str(model),
                 "--device", "cpu", "--score-threshold", "0.3", "--ray-address", cluster), timeout=600)
    from batchseg.store.results import open_results

    rows = list(open_results(str(out)).rows())
    assert len(rows) == 8 and all(r["error"] is None for r in rows)
    assert sum(len(r["instances"]) for r in rows) > 0
    assert {i["category_id"] for r in rows for i in r["instances"]} <= {1, 3, 18, 44}
    report = json.loads((out / "run.json").read_text())
    task = report["provenance"]["tasks"]["instance"]
    assert task["model_card"] == f"{model}/model_card.json"
    assert task["weights_sha256"] == card["weights"]["sha256"]

    again = run(train_args(scenes, model, base_weights, cluster, "--iterations", "60", "--checkpoint-every", "30",
                           "--min-size", "96", "--max-size", "160", "--lr", "0.01"), timeout=120)
    assert "nothing to train" in again.stdout


@pytest.mark.timeout(1800)
def test_a_killed_worker_and_a_stopped_command_resume_from_the_checkpoint(scenes, base_weights, cluster, tmp_path):
    model = tmp_path / "model"
    cmd = train_args(scenes, model, base_weights, cluster, "--workers", "2", "--iterations", "12", "--checkpoint-every", "2",
                     "--min-size", "64", "--max-size", "96")
    log = tmp_path / "first.log"  # a file, not a pipe: Ray's forwarded worker logs would fill an unread pipe and block the command
    with log.open("w") as out:
        first = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_checkpoint(model, 2, first, log)
        killed_at = newest_checkpoint(model)
        os.kill(train_worker(raylet_of(cluster)), signal.SIGKILL)
        wait_for_checkpoint(model, killed_at + 2, first, log)  # resumed, and on
        first.send_signal(signal.SIGINT)  # Ctrl-C: the command stops, and Ray its training with it
        assert first.wait(120) == 130, log.read_text()[-3000:]
        said = [line for line in log.read_text().splitlines() if line.startswith("batchseg: ")]
        assert said == ["batchseg: interrupted: training stopped; the same command resumes from its newest checkpoint"]
    finally:
        if first.poll() is None:
            first.kill()
    stopped_at = newest_checkpoint(model)
    assert stopped_at < 12, "the first command finished before it could be killed; give it more iterations"

    again = run(cmd, timeout=600)
    records = history(model)
    resumed = [r["iteration"] for r in records if r.get("resumed")]
    assert len(resumed) == 2 and resumed[0] >= killed_at and resumed[1] == stopped_at, records
    assert f"batchseg train: resumed from the checkpoint of iteration {stopped_at}" in again.stdout
    steps = [r["iteration"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # the count went on, nothing twice
    assert json.loads((model / "model_card.json").read_text())["workers"] == 2


def newest_checkpoint(model: Path) -> int:
    """The iteration of the checkpoint Ray Train would resume from: the newest one its controller
    registered in the run's snapshot. A folder `iteration-NNNNNNN` appears before that, and a
    worker killed in between resumes from the one before."""
    newest = 0
    for snapshot in (model / "checkpoints").glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        except (OSError, ValueError, KeyError, TypeError):  # being written
            continue
        if latest:
            newest = max(newest, int(latest["checkpoint_dir_name"].split("-")[1]))
    return newest


def wait_for_checkpoint(model: Path, iteration: int, process: subprocess.Popen, log: Path, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while newest_checkpoint(model) < iteration:
        if process.poll() is not None:
            raise AssertionError(f"training exited {process.returncode} before iteration {iteration}:\n"
                                 f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint of iteration {iteration} in {seconds} s")
        time.sleep(0.5)


def train_worker(raylet: int) -> int:
    """The pid of a RayTrainWorker process under `raylet` (Ray sets it as the process title)."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == raylet and (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    raise AssertionError(f"no RayTrainWorker process under raylet {raylet}")

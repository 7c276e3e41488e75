"""Runs over one output: kill and re-run, incremental runs, two runs at once (issue 5)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchseg.store.results import open_results
from tests.conftest import relative_name

SLOW = ["--backend", "tests.oracle:SlowBackend", "--set", "models.instance.score_threshold=0",
        "--set", "models.instance.options={seconds: 0.4}", "--set", "rows_per_file=2", "--set", "read_rows_per_block=2",
        "--batch-size", "1"]


def _cli(images: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "batchseg", "run", "--input", str(images), "--output", str(out), *extra]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _figures(out: Path, root: Path, expected: list[str]) -> dict:
    rows = list(open_results(str(out)).rows(["image_uri"]))
    names = [relative_name(r["image_uri"], root) for r in rows]
    return {"images in": len(expected), "rows out": len(rows), "duplicates": len(names) - len(set(names)),
            "missing": len(set(expected) - set(names))}


def _all_files_readable(out: Path) -> int:
    files = list((out / "annotations").rglob("*.parquet"))
    for f in files:
        pq.read_metadata(f)  # a torn file would fail here
    return len(files)


def test_kill_the_driver_then_rerun_finishes_the_rest_exactly_once(samples, tmp_path):
    out = tmp_path / "out"
    driver = subprocess.Popen(_cli(samples.root, out, *SLOW), env=_env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(list((out / "annotations").rglob("*.parquet"))) < 2:  # some blocks committed
        assert driver.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(1)
    before = _figures(out, samples.root, samples.images)
    assert 0 < before["rows out"] < len(samples.images) and before["duplicates"] == 0
    assert _all_files_readable(out) > 0  # no torn file is visible to readers

    rerun = subprocess.run(_cli(samples.root, out, *SLOW[:-2]), env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = _figures(out, samples.root, samples.images)
    print(f"\nkilled after {before['rows out']} rows; after re-run: {after}")
    assert after == {"images in": len(samples.images), "rows out": len(samples.images), "duplicates": 0, "missing": 0}
    summary = json.loads((out / "run.json").read_text())
    assert summary["images"]["in"] == len(samples.images) - before["rows out"]  # only the rest
    assert _all_files_readable(out) >= 2


@pytest.mark.parametrize("how, code", [
    ("ctrl-c", 130),  # a terminal sends SIGINT to the whole foreground process group
    ("sigterm", 15),  # `ray job stop`, kill, a scheduler's timeout: ray.init's handler exits with 15
])
def test_an_interrupted_run_marks_its_report_and_releases_its_lease(how, code, samples, tmp_path):
    out = tmp_path / "out"
    driver = subprocess.Popen(_cli(samples.root, out, *SLOW), env=_env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              # a process started in the background inherits SIGINT ignored (CI does)
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not list((out / "annotations").rglob("*.parquet")):
        assert driver.poll() is None and time.time() < deadline, "run ended before it could be interrupted"
        time.sleep(0.2)
    if how == "ctrl-c":
        os.killpg(driver.pid, signal.SIGINT)
    else:
        driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=120) == code, driver.stderr.read()[-2000:]
    (report,) = (out / "runs").glob("*.json")
    assert json.loads(report.read_text())["status"] == "interrupted"
    assert not (out / "_lease.json").exists()  # released for the next run


def test_incremental_runs_annotate_only_new_or_changed_images(samples, tmp_path):
    images = tmp_path / "lake"
    shutil.copytree(samples.root / "street", images / "street")
    shutil.copytree(samples.root / "park", images / "park")
    out = tmp_path / "out"
    oracle = ["--backend", "tests.oracle:ColorKeyBackend"]
    first = subprocess.run(_cli(images, out, *oracle), env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "batchseg: 5 images" in first.stdout, first.stderr[-2000:]

    again = subprocess.run(_cli(images, out, *oracle), env=_env(), capture_output=True, text=True, timeout=300)
    assert "batchseg: 0 images" in again.stdout  # nothing new

    Image.new("RGB", (40, 30), (255, 0, 0)).save(images / "street" / "new.png")  # a new image
    changed = images / "park" / "scene_c.bmp"
    Image.new("RGB", (50, 20), (0, 0, 255)).save(changed)  # same name, new content
    os.utime(changed, (time.time() + 5, time.time() + 5))
    third = subprocess.run(_cli(images, out, *oracle), env=_env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "batchseg: 2 images, 2 annotated" in third.stdout, third.stdout + third.stderr[-2000:]

    results = open_results(str(out))
    rows = {relative_name(r["image_uri"], images): r for r in results.rows()}
    assert sorted(rows) == sorted(["street/scene_a.png", "street/scene_b.PNG", "street/new.png", "park/scene_c.bmp",
                                   "park/scene_d.tiff", "park/nested/scene_e.webp"])
    assert (rows["park/scene_c.bmp"]["width"], rows["park/scene_c.bmp"]["height"]) == (50, 20)  # newest row
    assert [i["category_id"] for i in rows["park/scene_c.bmp"]["instances"]] == [18]
    from batchseg.exports.coco import export_coco

    export_coco(results, str(tmp_path / "coco"))  # exports read all runs as one, newest rows
    coco = json.loads((tmp_path / "coco/instances.json").read_text())
    assert len(coco["images"]) == 6
    assert {(i["width"], i["height"]) for i in coco["images"] if i["file_name"] == "park/scene_c.bmp"} == {(50, 20)}
    runs = sorted(p.name for p in (out / "annotations").iterdir())
    assert len(runs) == 2 and all(r.startswith("run=") for r in runs)  # the empty run wrote nothing
    assert len(list((out / "runs").glob("*.json"))) == 3


def test_second_run_on_the_same_output_is_refused(samples, tmp_path):
    out = tmp_path / "out"
    long_run = [a.replace("seconds: 0.4", "seconds: 1.5") for a in SLOW]  # ~30 s: time for a second start
    first = subprocess.Popen(_cli(samples.root, out, *long_run), env=_env(), start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "_lease.json").exists():
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.1)
    second = subprocess.run(_cli(samples.root / "street", out, *SLOW), env=_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 4
    (line,) = second.stderr.strip().splitlines()[-1:]
    assert "is being written by run" in line
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert "batchseg: 21 images, 17 annotated" in stdout and not (out / "_lease.json").exists()

"""render on a crowded image, and the review queue (`batchseg review`, `render --review`).

Results folders are written by hand: a crowded image (60 overlapping instances), and rows
carrying review_priority, including an older run whose files have no such column at all.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFont
from pycocotools import mask as mask_util

from batchseg.evaluation.render import LabelPlacer, render, review_queue
from batchseg.store.results import open_results
from batchseg.rows.schema import ROW, image_id

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 44, "name": "bottle"}]


def rle(mask: np.ndarray) -> dict:
    encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def crowded_instances(h: int, w: int, count: int, seed: int = 0) -> list[dict]:
    """`count` overlapping boxes packed into the image's middle third, scores all different."""
    rng = np.random.default_rng(seed)
    instances = []
    for k in range(count):
        bw, bh = rng.integers(w // 12, w // 5), rng.integers(h // 12, h // 5)
        x, y = rng.integers(w // 3, 2 * w // 3 - bw // 2), rng.integers(h // 3, 2 * h // 3 - bh // 2)
        mask = np.zeros((h, w), bool)
        mask[y:y + bh, x:x + bw] = True
        instances.append({"category_id": CATEGORIES[k % 3]["id"], "bbox": [float(x), float(y), float(bw), float(bh)],
                          "score": round(0.99 - k * 0.008, 3), "area": int(mask.sum()), "segmentation": rle(mask)})
    return instances


def row(uri: str, **values) -> dict:
    base = {name: None for name in ROW.names}
    base.update(image_id=image_id(uri), image_uri=uri, source_size=1, source_version="v")
    base.update(values)
    return base


def write_run(folder: Path, run_id: str, rows: list[dict], schema: pa.Schema = ROW) -> None:
    part = folder / "annotations" / f"run={run_id}"
    part.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    pq.write_table(table, part / "part-00000.parquet")


def write_run_json(folder: Path, threshold: float = 0.5) -> None:
    (folder / "run.json").write_text(json.dumps({"images": {}, "categories": {"instance": {"things": CATEGORIES}}}))
    runs = folder / "runs"
    runs.mkdir(exist_ok=True)
    for path in (folder / "annotations").iterdir():
        run_id = path.name.removeprefix("run=")
        provenance = {"tasks": {"instance": {"score_threshold": threshold}}}
        (runs / f"{run_id}.json").write_text(json.dumps({"run_id": run_id, "provenance": provenance}))


def crowded_folder(folder: Path, count: int = 60, size: tuple[int, int] = (480, 640)) -> Path:
    """One 640x480 image with `count` instances and one plain image with 2."""
    h, w = size
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    image = folder / "crowd.png"
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image)
    plain = folder / "plain.png"
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(plain)
    write_run(folder, "20260101T000000Z-aaaaaa", [
        row(str(image), width=w, height=h, instances=crowded_instances(h, w, count), review_priority=0.9),
        row(str(plain), width=w, height=h, instances=crowded_instances(h, w, 2, seed=3), review_priority=0.1),
    ])
    write_run_json(folder)
    return folder


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchseg", *args], capture_output=True, text=True, timeout=120)


# --- crowded images -----------------------------------------------------------------------

def test_labels_never_overlap_and_stay_inside_the_image():
    font = ImageFont.load_default(size=14)
    placer = LabelPlacer((640, 480), font)
    boxes = crowded_instances(480, 640, 60)
    rects = [placer.place(inst["bbox"], f"person {inst['score']:.2f}") for inst in boxes]
    placed = [r for r in rects if r is not None]
    assert len(placed) >= 15  # a crowded middle third still fits a good number of labels
    for a, b in itertools.combinations(placed, 2):
        assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    assert all(0 <= r[0] and r[2] <= 640 and 0 <= r[1] and r[3] <= 480 for r in placed)
    assert rects[0] is not None  # the best instance always gets its label


def test_crowded_image_draws_the_top_k_and_counts_the_rest(tmp_path):
    results = open_results(str(crowded_folder(tmp_path / "res")))
    assert render(results, str(tmp_path / "out"), labels=15) == 2
    index = (tmp_path / "out" / "index.html").read_text()
    assert "instances: 60 (top 15 drawn)" in index and "instances: 2<" in index
    crowd = Image.open(tmp_path / "out" / f"{image_id(str(tmp_path / 'res' / 'crowd.png'))}_instances.jpg")
    assert crowd.size == (640, 480)
    strip = np.asarray(crowd)[-8:, :100]  # the banner counting the rest: dark strip, light text
    assert strip.mean() < 100 and strip.max() > 200


def test_a_source_image_gone_or_changed_since_the_run_is_one_cell_not_the_page(tmp_path):
    folder = crowded_folder(tmp_path / "res")
    (folder / "crowd.png").unlink()
    (folder / "plain.png").write_bytes(b"no longer an image")
    result = cli("render", str(folder), str(tmp_path / "out"))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    index = (tmp_path / "out" / "index.html").read_text()
    assert index.count("not rendered: the source image cannot be read now") == 2


# --- review queue ---------------------------------------------------------------------------

@pytest.fixture()
def queue_folder(tmp_path):
    """An older run without review_priority, a newer one with it (one failed image among them)."""
    folder = tmp_path / "res"
    folder.mkdir()
    old_schema = pa.schema([f for f in ROW if f.name != "review_priority"])
    write_run(folder, "20250101T000000Z-old000", [row(f"s3://lake/old/{i}.jpg", error=None, instances=[])
                                                  for i in range(3)], schema=old_schema)
    priorities = [0.2, 0.95, None, 0.5, 0.7]
    write_run(folder, "20260101T000000Z-new000", [
        row(f"s3://lake/new/{i}.jpg", review_priority=p, width=64, height=48,
            error="empty file" if p is None else None,
            instances=None if p is None else crowded_instances(48, 64, 3, seed=i))
        for i, p in enumerate(priorities)])
    write_run_json(folder)
    return folder


def test_review_lists_highest_priority_first_older_rows_last(queue_folder):
    result = cli("review", str(queue_folder), "--top", "6")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[1].rsplit("/", 2)[-2:] for line in lines] == [
        ["new", "1.jpg"], ["new", "4.jpg"], ["new", "3.jpg"], ["new", "0.jpg"],  # by priority
        ["new", "2.jpg"], ["old", "0.jpg"]]  # no priority (failed, older run): reading order, newest run first
    assert lines[0].startswith("0.9500  s3://lake/new/1.jpg  instances: 3 instances, lowest score")
    assert "no review_priority (written by an older batchseg)" in lines[-1]


def test_review_json_and_failed_rows(queue_folder):
    result = cli("review", str(queue_folder), "--top", "20", "--json")
    items = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(items) == 8 and [i["review_priority"] for i in items[:4]] == [0.95, 0.7, 0.5, 0.2]
    failed = next(i for i in items if i["image_uri"].endswith("new/2.jpg"))
    assert failed["review_priority"] is None and failed["reason"].startswith("failed: empty file")
    assert {i["run"] for i in items} == {"20250101T000000Z-old000", "20260101T000000Z-new000"}


def test_render_review_draws_the_queue_in_order(tmp_path):
    folder = crowded_folder(tmp_path / "res")
    result = cli("render", str(folder), str(tmp_path / "out"), "--review", "--limit", "1")
    assert result.returncode == 0, result.stderr
    index = (tmp_path / "out" / "index.html").read_text()
    assert "crowd.png" in index and "plain.png" not in index and "review priority 0.9000" in index


@pytest.mark.parametrize("args, message", [
    (["review", "{res}", "--top", "0"], "--top must be at least 1"),
    (["render", "{res}", "{out}", "--labels", "0"], "--labels must be at least 1"),
    (["review", "{out}"], "no batchseg dataset at"),
])
def test_review_and_render_bad_numbers(queue_folder, tmp_path, args, message):
    result = cli(*[a.format(res=queue_folder, out=tmp_path / "out") for a in args])
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"batchseg: {result.stderr.strip()[10:]}"]
    assert message in result.stderr


def test_review_memory_is_flat_in_the_row_count(tmp_path):
    """The heap holds --top entries and batches are bounded: 4x the rows, about the same peak."""
    def peak(rows: int) -> int:
        folder = tmp_path / f"r{rows}"
        part = folder / "annotations" / "run=20260101T000000Z-aaaaaa"
        part.mkdir(parents=True)
        rng = np.random.default_rng(rows)
        pq.write_table(pa.table({"image_id": np.arange(rows, dtype=np.int64),
                                 "image_uri": [f"s3://lake/{i}.jpg" for i in range(rows)],
                                 "error": pa.nulls(rows, pa.string()),
                                 "review_priority": rng.random(rows)}), part / "part-00000.parquet",
                       row_group_size=8192)
        results = open_results(str(folder))
        tracemalloc.start()
        top = review_queue(results, 10)
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(top) == 10 and top[0]["review_priority"] >= top[-1]["review_priority"]
        return used

    small, large = peak(100_000), peak(400_000)
    assert large < small * 1.5 + 2**20, (small, large)


def test_review_takes_each_image_at_its_newest_row(tmp_path):
    """x.jpg was the worst image of the older run; the newer run re-annotated it and it is fine now."""
    folder = tmp_path / "res"
    folder.mkdir()
    write_run(folder, "20250101T000000Z-old000", [row("s3://lake/x.jpg", review_priority=0.99, instances=[]),
                                                  row("s3://lake/z.jpg", review_priority=0.3, instances=[])])
    write_run(folder, "20260101T000000Z-new000", [row("s3://lake/x.jpg", review_priority=0.1, instances=[]),
                                                  row("s3://lake/y.jpg", review_priority=0.5, instances=[])])
    results = open_results(str(folder))
    assert [(i["image_uri"], i["review_priority"]) for i in review_queue(results, 1)] == [("s3://lake/y.jpg", 0.5)]
    assert [(i["image_uri"], i["run"]) for i in review_queue(results, 3)] == [
        ("s3://lake/y.jpg", "20260101T000000Z-new000"), ("s3://lake/z.jpg", "20250101T000000Z-old000"),
        ("s3://lake/x.jpg", "20260101T000000Z-new000")]


def test_review_piped_into_head_stops_quietly(tmp_path):
    """`batchseg review ... | head -1`: the closed pipe ends the command without a traceback."""
    part = tmp_path / "res" / "annotations" / "run=20260101T000000Z-aaaaaa"
    part.mkdir(parents=True)
    rows = 30_000
    pq.write_table(pa.table({"image_id": np.arange(rows, dtype=np.int64),
                             "image_uri": [f"s3://lake/{i}.jpg" for i in range(rows)],
                             "error": pa.nulls(rows, pa.string()),
                             "review_priority": np.linspace(0, 1, rows)}), part / "part-00000.parquet")
    proc = subprocess.Popen([sys.executable, "-m", "batchseg", "review", str(tmp_path / "res"), "--top", str(rows)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("1.0000  s3://lake/29999.jpg")
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141 and proc.stderr.read() == ""

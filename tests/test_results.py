"""Readers: newest row per image across runs, duplicates inside a run removed, torn files skipped."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchseg.results import SeenIds, open_results
from batchseg.schema import ROW, image_id


def _rows(uris, width):
    return [{"image_id": image_id(u), "image_uri": u, "width": width, "height": 1, "source_size": 1,
             "source_version": "v", "error": None} for u in uris]


def _write(root, run, name, rows):
    folder = root / "annotations" / f"run={run}"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW), folder / name)


def test_seen_ids_is_a_set():
    rng = np.random.default_rng(0)
    seen, reference = SeenIds(), set()
    for _ in range(50):
        ids = rng.integers(0, 5000, rng.integers(0, 300))
        assert seen.contains(ids).tolist() == [int(i) in reference for i in ids]
        seen.add(ids)
        reference.update(int(i) for i in ids)
    assert len(seen) == len(reference) and len(seen.levels) <= 12


def test_newest_row_per_image_and_duplicates_inside_a_run(tmp_path):
    _write(tmp_path, "20260101T000000Z-a", "part-00000.parquet", _rows(["s3://l/a.jpg", "s3://l/b.jpg"], 1))
    newer = _rows(["s3://l/b.jpg", "s3://l/c.jpg"], 2)
    _write(tmp_path, "20260102T000000Z-b", "part-00000.parquet", newer)
    _write(tmp_path, "20260102T000000Z-b", "part-00001.parquet", newer[:1] + newer[:1])  # doubled inside the run
    rows = {r["image_uri"]: r for r in open_results(str(tmp_path)).rows(["image_uri", "width"])}
    assert len(rows) == 3
    assert {u: r["width"] for u, r in rows.items()} == {"s3://l/a.jpg": 1, "s3://l/b.jpg": 2, "s3://l/c.jpg": 2}
    assert rows["s3://l/a.jpg"]["run"] == "20260101T000000Z-a" and rows["s3://l/c.jpg"]["run"] == "20260102T000000Z-b"


def test_a_torn_file_is_skipped_not_fatal(tmp_path, caplog):
    _write(tmp_path, "r1", "part-00000.parquet", _rows(["s3://l/a.jpg"], 1))
    (tmp_path / "annotations/run=r1/part-00001.parquet").write_bytes(b"PAR1 torn")
    assert [r["image_uri"] for r in open_results(str(tmp_path)).rows(["image_uri"])] == ["s3://l/a.jpg"]
    assert "not a readable Parquet file" in caplog.text

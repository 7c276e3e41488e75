"""Readers: newest row per image across runs, duplicates inside a run removed, torn files skipped."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchseg.config import ConfigError
from batchseg.store.results import SeenIds, open_results
from batchseg.rows.schema import ROW, image_id


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


def _report(root, run, categories):
    (root / "runs").mkdir(exist_ok=True)
    (root / "runs" / f"{run}.json").write_text(json.dumps({"run_id": run, "categories": categories}))


def test_results_can_be_one_run_partition_with_that_runs_report(tmp_path):
    _write(tmp_path, "20260101T000000Z-a", "part-00000.parquet", _rows(["s3://l/a.jpg"], 1))
    _write(tmp_path, "20260102T000000Z-b", "part-00000.parquet", _rows(["s3://l/a.jpg", "s3://l/b.jpg"], 2))
    _report(tmp_path, "20260101T000000Z-a", {"instance": {"things": [{"id": 1, "name": "old"}]}})
    results = open_results(str(tmp_path / "annotations" / "run=20260101T000000Z-a"))
    assert [(r["image_uri"], r["width"]) for r in results.rows(["image_uri", "width"])] == [("s3://l/a.jpg", 1)]
    assert results.categories == {"instance": {"things": [{"id": 1, "name": "old"}]}}


def test_a_damaged_run_json_falls_back_to_the_newest_report(tmp_path, caplog):
    _write(tmp_path, "20260101T000000Z-a", "part-00000.parquet", _rows(["s3://l/a.jpg"], 1))
    _report(tmp_path, "20260101T000000Z-a", {"instance": {"things": []}})
    (tmp_path / "run.json").write_text('{"trunc')
    assert open_results(str(tmp_path)).categories == {"instance": {"things": []}}
    assert "not a readable run report" in caplog.text


def test_ledgers_and_other_tools_parquet_are_not_results(tmp_path):
    _write(tmp_path, "r1", "part-00000.parquet", _rows(["s3://l/a.jpg"], 1))
    ledger = tmp_path / "_ledger" / "run=r1"
    ledger.mkdir(parents=True)
    pq.write_table(pa.table({"key": [1], "status": pa.array([0], pa.int8())}), ledger / "part-00000.parquet")
    with pytest.raises(ConfigError, match="no batchseg dataset"):
        open_results(str(tmp_path / "_ledger"))
    with pytest.raises(ConfigError, match="no run report next to"):  # rows, but no report naming categories
        open_results(str(tmp_path)).categories
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(pa.table({"id": [1]}), foreign / "x.parquet")
    with pytest.raises(ConfigError, match="is not a batchseg dataset: .* has no error column"):
        open_results(str(foreign))


def test_a_file_older_than_a_column_still_reads(tmp_path):
    """A run written before review_priority existed: its rows come back without the column."""
    folder = tmp_path / "annotations" / "run=r1"
    folder.mkdir(parents=True)
    rows = _rows(["s3://l/a.jpg"], 1)
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW).drop_columns(["review_priority"]), folder / "part-00000.parquet")
    got = list(open_results(str(tmp_path)).rows(["image_uri", "review_priority"]))
    assert [r["image_uri"] for r in got] == ["s3://l/a.jpg"] and got[0].get("review_priority") is None

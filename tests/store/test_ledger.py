"""The ledger decides what is done: per task fingerprints, failure classes, tar shards, compaction.

Pure tests on ledger files written to a local folder through the same functions the sink uses.
"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from batchseg.store import ledger
from batchseg.store.ledger import done_key
from batchseg.rows.schema import image_id


def _write_run(root, run_id, fingerprints, rows, part=0):
    """rows: (uri, version, error_kind, members) like the sink sees them."""
    (root / "runs").mkdir(parents=True, exist_ok=True)
    (root / "runs" / f"{run_id}.json").write_text(json.dumps(
        {"run_id": run_id, "provenance": {"tasks": {t: {"fingerprint": fp} for t, fp in fingerprints.items()}}}))
    keys = np.array([done_key(u, v) for u, v, _, _ in rows], np.int64)
    shards = np.array([done_key(u[len("tar://"):].split("::", 1)[1], v) if u.startswith("tar://") else 0
                       for u, v, _, _ in rows], np.int64)
    images = np.array([image_id(u) for u, *_ in rows], np.int64)
    table = ledger.entries(keys, images, [k for _, _, k, _ in rows], shards, np.array([m for *_, m in rows], np.int32))
    folder = root / "_ledger" / f"run={run_id}"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / f"part-{part:05d}.parquet")


def _done(root, needed, retry_failed=False):
    return set(ledger.done_with_figures(LocalFileSystem(), str(root), needed, retry_failed)[0].tolist())


def test_done_needs_every_task_with_the_same_fingerprint(tmp_path):
    _write_run(tmp_path, "r1", {"instance": "A"}, [("s3://l/a.jpg", "e1", None, -1)])
    a = done_key("s3://l/a.jpg", "e1")
    assert _done(tmp_path, {"instance": "A"}) == {a}
    assert _done(tmp_path, {"instance": "B"}) == set()  # new weights or config: annotate again
    assert _done(tmp_path, {"instance": "A", "keypoint": "K"}) == set()  # a task added: annotate again
    assert done_key("s3://l/a.jpg", "e2") not in _done(tmp_path, {"instance": "A"})  # the image changed


def test_a_run_with_more_tasks_covers_a_run_with_fewer(tmp_path):
    _write_run(tmp_path, "r1", {"instance": "A", "keypoint": "K"}, [("s3://l/a.jpg", "e1", None, -1)])
    assert _done(tmp_path, {"instance": "A"}) == {done_key("s3://l/a.jpg", "e1")}


def test_failure_classes(tmp_path):
    rows = [("s3://l/broken.jpg", "e", "content", -1), ("s3://l/crash.jpg", "e", "model", -1),
            ("s3://l/throttled.jpg", "e", "transient", -1)]
    _write_run(tmp_path, "r1", {"instance": "A"}, rows)
    broken, crash, throttled = (done_key(u, v) for u, v, _, _ in rows)
    assert _done(tmp_path, {"instance": "A"}) == {broken, crash}  # transient: never done
    assert _done(tmp_path, {"instance": "B"}) == {broken}  # a new model tries the model failure again
    assert _done(tmp_path, {"instance": "A"}, retry_failed=True) == set()


def test_only_an_images_newest_entry_counts(tmp_path):
    """An image put back to an earlier version (an ETag or mtime seen before), and an image whose
    newest row is a transient failure after an older success: both are annotated again."""
    _write_run(tmp_path, "r1", {"instance": "A"}, [("s3://l/a.jpg", "v1", None, -1), ("s3://l/b.jpg", "v", None, -1)])
    _write_run(tmp_path, "r2", {"instance": "A"}, [("s3://l/a.jpg", "v2", None, -1)])
    _write_run(tmp_path, "r3", {"instance": "B"}, [("s3://l/b.jpg", "v", "transient", -1)])
    assert _done(tmp_path, {"instance": "A"}) == {done_key("s3://l/a.jpg", "v2")}  # not v1 again, not b
    assert _done(tmp_path, {"instance": "B"}) == set()


def test_ledgers_written_before_entries_named_their_image_still_read(tmp_path):
    _write_run(tmp_path, "r1", {"instance": "A"}, [("s3://l/a.jpg", "v", None, -1)])
    part = tmp_path / "_ledger" / "run=r1" / "part-00000.parquet"
    pq.write_table(pq.read_table(part).drop_columns(["image"]), part)
    assert _done(tmp_path, {"instance": "A"}) == {done_key("s3://l/a.jpg", "v")}


def test_newest_entry_per_key_wins(tmp_path):
    _write_run(tmp_path, "r1", {"instance": "A"}, [("s3://l/a.jpg", "e", "content", -1)])
    _write_run(tmp_path, "r2", {"instance": "B"}, [("s3://l/a.jpg", "e", None, -1)])
    assert _done(tmp_path, {"instance": "A"}) == set()  # r2 annotated it with B: A must run again
    assert _done(tmp_path, {"instance": "B"}) == {done_key("s3://l/a.jpg", "e")}


def test_a_shard_is_done_when_all_its_members_are(tmp_path):
    shard = "s3://l/shard-0.tar"
    members = [f"tar://{i}.jpg::{shard}" for i in range(3)]
    _write_run(tmp_path, "r1", {"instance": "A"}, [(members[0], "v", None, -1), (members[1], "v", "content", -1)])
    _write_run(tmp_path, "r2", {"instance": "A"}, [(members[2], "v", None, -1), (shard, "v", None, 3)])
    assert done_key(shard, "v") in _done(tmp_path, {"instance": "A"})  # members spread over two runs
    _write_run(tmp_path, "r3", {"instance": "A"}, [(members[2], "v", "transient", -1)], part=1)
    _write_run(tmp_path, "r3", {"instance": "A"}, [], part=0)
    # a member's newest row is transient: the shard is read again for it
    assert done_key(shard, "v") not in _done(tmp_path, {"instance": "A"})
    assert done_key(shard, "v") not in _done(tmp_path, {"instance": "B"})  # new model: read the shard again


def test_planning_figures_count_done_images_and_done_shards_apart(tmp_path):
    shard = "s3://l/shard-0.tar"
    rows = [(f"tar://{i}.jpg::{shard}", "v", None, -1) for i in range(2)] + [(shard, "v", None, 2)]
    _write_run(tmp_path, "r1", {"instance": "A"}, rows + [("s3://l/a.jpg", "e", None, -1)])
    keys, figures = ledger.done_with_figures(LocalFileSystem(), str(tmp_path), {"instance": "A"}, False)
    assert len(keys) == 4
    assert figures == {"ledger_entries": 4, "runs": 1, "done": 3, "done_shards": 1}


def test_a_shard_cut_short_is_read_again(tmp_path):
    shard = "s3://l/shard-0.tar"
    _write_run(tmp_path, "r1", {"instance": "A"}, [(f"tar://0.jpg::{shard}", "v", None, -1), (shard, "v", None, 2)])
    assert done_key(shard, "v") not in _done(tmp_path, {"instance": "A"})


def test_a_corrupt_shard_is_recorded_once(tmp_path):
    _write_run(tmp_path, "r1", {"instance": "A"}, [("s3://l/broken.tar", "v", "content", -1)])
    assert done_key("s3://l/broken.tar", "v") in _done(tmp_path, {"instance": "A"})


@pytest.mark.parametrize("runs", [ledger.COMPACT_AFTER + 3])
def test_compaction_keeps_the_answer(tmp_path, runs):
    expected = set()
    for r in range(runs):
        uri = f"s3://l/{r}.jpg"
        _write_run(tmp_path, f"r{r:03d}", {"instance": "A" if r % 2 else "B"}, [(uri, "v", None, -1)])
        if r % 2:
            expected.add(done_key(uri, "v"))
    assert _done(tmp_path, {"instance": "A"}) == expected  # writes a base
    bases = list((tmp_path / "_ledger").glob("base-*.parquet"))
    assert len(bases) == 1
    _write_run(tmp_path, "r999", {"instance": "A"}, [("s3://l/new.jpg", "v", None, -1)])
    assert _done(tmp_path, {"instance": "A"}) == expected | {done_key("s3://l/new.jpg", "v")}  # base + newer run

"""Label Studio tasks without a server: what a task carries, what is left out, the worst-first order."""

import json

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from batchseg.rows.encoding import decode_mask
from batchseg.exports.labelstudio import export_labelstudio
from batchseg.exports.labelstudio_push import WorstFirst
from batchseg.run.provenance import model_version
from batchseg.store.results import open_results
from tests.annotated_rows import RUN_ID, write_results


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    """4 images (each with an empty instance mask, review_priority 0.0 .. 0.3) and a failed one."""
    return open_results(str(write_results(tmp_path_factory.mktemp("hand"))))


def test_tasks_carry_run_priority_and_provenance_and_leave_out_empty_masks(hand, tmp_path):
    summary = export_labelstudio(hand, str(tmp_path))
    assert summary["files"] == {"tasks-00000.json": 4, "labeling_config.xml": 1}
    assert (summary["tasks"], summary["failed_images"], summary["skipped_empty"]) == (4, 1, 4)
    rows = {r["image_id"]: r for r in hand.rows() if r["error"] is None}
    label = model_version(hand.run_info(RUN_ID))
    assert label.startswith("batchseg-0.1.0 ") and "instance=instance_model@11111111" in label
    for task in json.loads((tmp_path / "tasks-00000.json").read_text()):
        row = rows[task["data"]["image_id"]]
        assert task["data"]["batchseg_run"] == RUN_ID and task["data"]["review_priority"] == row["review_priority"]
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == label
        assert prediction["score"] == pytest.approx(1 - row["review_priority"])  # uncertainty sampling agrees
        kept = [i for i in row["instances"] if i["area"]]
        assert len(kept) == len(row["instances"]) - 1
        brushes = [r for r in prediction["result"] if r["from_name"] == "mask"]
        boxes = [r for r in prediction["result"] if r["from_name"] == "box"]
        assert len(brushes) == len(boxes) == len(kept)
        for brush, inst in zip(brushes, kept):
            mask = decode_rle(brush["value"]["rle"]).reshape(row["height"], row["width"], 4)[:, :, 3] > 0
            assert np.array_equal(mask, decode_mask(inst["segmentation"]))


def test_model_version_can_be_given(hand, tmp_path):
    export_labelstudio(hand, str(tmp_path), model_version="mask-rcnn-2026-11")
    tasks = json.loads((tmp_path / "tasks-00000.json").read_text())
    assert {t["predictions"][0]["model_version"] for t in tasks} == {"mask-rcnn-2026-11"}


def test_exporting_again_into_the_same_folder_leaves_no_stale_task_files(hand, tmp_path):
    """Importing DEST/tasks-*.json after a second export must not bring the first one's tasks."""
    export_labelstudio(hand, str(tmp_path), tasks_per_file=1)
    assert len(list(tmp_path.glob("tasks-*.json"))) == 4
    export_labelstudio(hand, str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("tasks-*.json")) == ["tasks-00000.json"]
    assert len(json.loads((tmp_path / "tasks-00000.json").read_text())) == 4


def test_worst_first_orders_by_priority_unknown_last_ties_in_input_order(tmp_path):
    priorities = [0.2, None, 0.9, 0.5, None, 0.9, 0.0]
    rows = ({"image_id": i, "review_priority": p, "payload": "x" * i} for i, p in enumerate(priorities))
    with WorstFirst(rows, str(tmp_path)) as ordered:
        assert ordered.count == len(priorities)
        out = list(ordered)
    assert [r["image_id"] for r in out] == [2, 5, 3, 0, 6, 1, 4]
    assert out[1] == {"image_id": 5, "review_priority": 0.9, "payload": "xxxxx"}  # rows come back whole
    assert list(tmp_path.iterdir()) == []  # the spool is an unnamed temporary file

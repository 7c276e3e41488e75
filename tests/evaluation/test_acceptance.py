"""Acceptance: one image's matching by hand-made masks, and the report over reviews written
through the real store (the run each review names, the newest row where it names none, images
with nothing to compare). The counts against a real Label Studio are in
tests/exports/test_labelstudio_pull.py."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from batchseg.cli.main import main
from batchseg.evaluation.acceptance import acceptance, match_instances
from batchseg.rows.encoding import encode_mask
from batchseg.store.results import open_results
from batchseg.store.reviews import PullWriter, open_reviews
from tests.annotated_rows import RUN_ID, image_row, write_results

H, W = 40, 60


def inst(box: tuple[int, int, int, int], category: int = 1) -> dict:
    """An instance whose mask is the block rows y0:y1, cols x0:x1."""
    y0, y1, x0, x1 = box
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return {"category_id": category, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": 1.0, "area": int(mask.sum()),
            "segmentation": encode_mask(mask)}


def test_matching_counts_kept_edited_deleted_added_and_class_changes():
    predicted = [inst((0, 10, 0, 10)), inst((0, 10, 20, 30)), inst((20, 30, 0, 10), 18), inst((20, 30, 40, 50))]
    reviewed = [inst((0, 10, 0, 10)),  # kept: IoU 1
                inst((0, 10, 20, 27)),  # edited: IoU 0.7
                inst((20, 30, 0, 10), 1),  # class changed: the dog is a person
                inst((30, 38, 20, 30), 18)]  # added; the prediction at (20:30, 40:50) was deleted
    m = match_instances(predicted, reviewed)
    assert (m.kept, m.edited, m.class_changed, m.deleted, m.added, m.edits) == (1, 2, 1, 1, 1, 4)
    assert sorted(round(v, 3) for v in m.ious) == [0.7, 1.0, 1.0]
    assert m.per_category[18] == {"kept": 0, "edited": 1, "class_changed": 1, "deleted": 0, "added": 1}
    assert m.per_category[1] == {"kept": 1, "edited": 1, "class_changed": 0, "deleted": 1, "added": 0}


def test_a_same_class_pair_beats_a_better_overlap_across_classes():
    predicted = [inst((0, 10, 0, 10), 1)]
    reviewed = [inst((0, 10, 0, 10), 18), inst((0, 10, 2, 10), 1)]  # the dog overlaps perfectly, the person at 0.8
    m = match_instances(predicted, reviewed)
    assert (m.kept, m.edited, m.class_changed, m.added) == (0, 1, 0, 1)


def test_below_the_match_threshold_is_a_delete_and_an_add():
    m = match_instances([inst((0, 10, 0, 10))], [inst((0, 10, 6, 16))])  # IoU 4/16 = 0.25
    assert (m.kept, m.edited, m.deleted, m.added) == (0, 0, 1, 1)
    assert match_instances([], []).edits == 0


@pytest.fixture
def lake(tmp_path):
    return write_results(tmp_path / "out", count=4)


def _review(row: dict, instances: list[dict], run: str | None, lead: float) -> dict:
    return {"image_id": row["image_id"], "image_uri": row["image_uri"], "width": row["width"], "height": row["height"],
            "instances": instances, "keypoints": [], "source": "human", "annotator": "a", "reviewed_at": None,
            "lead_time_s": lead, "tool": "coco", "ls_project": None, "ls_task": None, "ls_annotation": None,
            "run": run, "model_version": None}


def test_the_report_compares_with_the_run_seen_or_the_newest_row(lake, tmp_path, capsys):
    rows = [image_row(f"file:///lake/images/street/img{i:03d}.jpg", 60 + i % 3, 80 + i % 4, i) for i in range(4)]
    shown = [[i for i in r["instances"] if i["area"]] for r in rows]
    writer = PullWriter(str(lake))
    writer.add(_review(rows[0], shown[0], RUN_ID, 4.0))  # accepted, names its run
    writer.add(_review(rows[1], shown[1][:1], None, 9.0))  # the dog deleted; no run named: the newest row
    writer.add(_review(rows[2], [], "20200101T000000Z-gone", 7.0))  # all deleted; a run that is gone: the newest row
    stranger = {**rows[3], "image_id": 12345, "image_uri": "file:///elsewhere.jpg"}
    writer.add(_review(stranger, shown[3], None, 1.0))  # no prediction at all: not scored
    writer.publish({"tool": "coco"})

    report = acceptance(open_results(str(lake)), open_reviews(str(lake)), str(tmp_path / "tasks.parquet"))
    assert report["images"] == {"reviewed": 4, "scored": 3, "unscored": 1}
    assert {k: report["overall"][k] for k in ("kept", "edited", "deleted", "added")} == {
        "kept": 3, "edited": 0, "deleted": 3, "added": 0}
    assert report["runs"] == {"(newest)": 2, RUN_ID: 1, "20200101T000000Z-gone": 1}
    assert report["lead_time_by_edits"] == [{"edits": 0, "images": 1, "median_lead_time_s": 4.0},
                                            {"edits": 1, "images": 1, "median_lead_time_s": 9.0},
                                            {"edits": 2, "images": 1, "median_lead_time_s": 7.0}]
    # priorities 0.0, 0.1, 0.2 and edits 0, 1, 2: the queue was right
    assert report["review_priority"]["spearman_rho"] == 1.0
    assert report["review_priority"]["edit_rate_by_decile"] == [1.0, 0.5, 0.0]
    tasks = pq.read_table(tmp_path / "tasks.parquet").to_pylist()
    assert [t["edits"] for t in sorted(tasks, key=lambda t: t["review_priority"])] == [0, 1, 2]

    assert main(["acceptance", str(lake), "--out", str(tmp_path / "acc"), "--no-ap"]) == 0
    out = capsys.readouterr().out
    assert "person" in out and "Spearman rho 1.0" in out and "AP vs reviews" not in out
    written = json.loads((tmp_path / "acc" / "acceptance.json").read_text())
    assert written["overall"] == report["overall"] and "ap" not in written
    assert (tmp_path / "acc" / "acceptance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_reviews_and_bad_thresholds_are_one_line(lake, capsys):
    assert main(["acceptance", str(lake)]) == 2
    assert "no reviews in" in capsys.readouterr().err
    assert main(["acceptance", str(lake), "--kept-iou", "0.4"]) == 2
    assert "--match-iou <= --kept-iou" in capsys.readouterr().err

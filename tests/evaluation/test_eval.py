"""eval: PQ by hotcoco on hand-computed cases (void, crowd, a relabel, a false positive), the
one-line error for foreign category ids, and memory flat in the rows that match nothing."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchseg.config import ConfigError
from batchseg.rows.encoding import encode_mask
from batchseg.evaluation.evaluate import evaluate, match_images
from batchseg.store.results import open_results
from batchseg.rows.schema import ANNOTATIONS, ROW, image_id

H, W = 10, 20
CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 18, "name": "dog", "isthing": 1},
              {"id": 200, "name": "background", "isthing": 0}]


def _segments(ids: np.ndarray, categories: dict[int, int]) -> list[dict]:
    out = []
    for sid, cid in categories.items():
        m = ids == sid
        ys, xs = np.nonzero(m)
        out.append({"id": sid, "category_id": cid, "isthing": cid != 200, "area": int(m.sum()),
                    "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
                    "score": None if cid == 200 else 0.9, "segmentation": encode_mask(m)})
    return out


def _row(uri: str, panoptic: list[dict] | None) -> dict:
    return {"image_id": image_id(uri), "image_uri": uri, "width": W, "height": H, "source_size": 1,
            "source_version": "v", "error": None, "error_kind": None, "review_priority": None,
            "instances": None, "panoptic": panoptic, "keypoints": None, "densepose": None}


def _write_results(folder: Path, rows: list[dict]) -> Path:
    part = folder / ANNOTATIONS / "run=20261122T000000Z-0001"
    part.mkdir(parents=True)
    for start in range(0, len(rows), 500):
        pq.write_table(pa.Table.from_pylist(rows[start:start + 500], schema=ROW), part / f"part-{start:05d}.parquet")
    return folder


def _case():
    """(GT id map, GT segments_info, predicted id map, predicted categories by segment id)."""
    gt = np.ones((H, W), np.int64)  # 1: background stuff
    gt[0] = 0  # void
    gt[2:6, 2:7] = 2  # person A, 20 px
    gt[2:6, 10:15] = 4  # dog B, 20 px
    gt[6:10, 12:20] = 3  # a crowd of people
    gt_info = [{"id": 1, "category_id": 200, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 0},
               {"id": 3, "category_id": 1, "iscrowd": 1}, {"id": 4, "category_id": 18, "iscrowd": 0}]
    pred = np.ones((H, W), np.int64)
    pred[2:6, 2:7] = 2  # person A exactly: IoU 1
    pred[2:6, 11:16] = 3  # dog B one column right: 16 / 24
    pred[6:10, 13:19] = 4  # a person on the crowd region: ignored
    pred[0, 3:9] = 5  # a dog on void: ignored
    pred[7:9, 2:5] = 6  # a person on background: a false positive
    return gt, gt_info, pred, {1: 200, 2: 1, 3: 18, 4: 1, 5: 18, 6: 1}


def _panoptic_gt(folder: Path, gt: np.ndarray, info: list[dict]) -> Path:
    (folder / "gt_png").mkdir()
    rgb = np.stack([gt % 256, gt // 256 % 256, gt // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "gt_png" / "a.png")
    doc = {"images": [{"id": 7, "file_name": "street/a.jpg", "width": W, "height": H}],
           "annotations": [{"image_id": 7, "file_name": "a.png", "segments_info": info}], "categories": CATEGORIES}
    (folder / "gt.json").write_text(json.dumps(doc))
    return folder / "gt.json"


def test_pq_on_a_hand_computed_case(tmp_path):
    gt, info, pred, pred_categories = _case()
    results = open_results(str(_write_results(tmp_path / "out", [_row("file:///lake/street/a.jpg", _segments(pred, pred_categories))])))
    metrics = evaluate(results, str(_panoptic_gt(tmp_path, gt, info)), str(tmp_path / "gt_png"))
    # person: TP (IoU 1) + FP -> PQ 1 / 1.5; dog: TP (IoU 16/24) -> PQ = SQ = 2/3, RQ 1
    things = metrics["panoptic"]["Things"]
    assert things == {"PQ": pytest.approx(100 * (2 / 3 + 2 / 3) / 2, abs=1e-3), "SQ": pytest.approx(100 * (1 + 2 / 3) / 2, abs=1e-3),
                      "RQ": pytest.approx(100 * (2 / 3 + 1) / 2, abs=1e-3), "categories": 2}
    # background: one TP whose union leaves out the predicted pixels on void
    g, p = gt == 1, pred == 1
    iou = (g & p).sum() / ((g | p).sum() - (p & (gt == 0)).sum())
    assert metrics["panoptic"]["Stuff"] == {"PQ": pytest.approx(100 * iou, abs=1e-3), "SQ": pytest.approx(100 * iou, abs=1e-3),
                                            "RQ": 100.0, "categories": 1}
    assert metrics["panoptic"]["All"]["PQ"] == pytest.approx(100 * (2 / 3 + 2 / 3 + iou) / 3, abs=1e-3)


def test_pq_against_a_ground_truth_without_our_categories_says_so(tmp_path):
    gt, info, pred, pred_categories = _case()
    pred_categories[6] = 3  # an id the GT does not know
    results = open_results(str(_write_results(tmp_path / "out", [_row("file:///lake/street/a.jpg", _segments(pred, pred_categories))])))
    with pytest.raises(ConfigError, match="has no category 3 .*GT with the model's category ids"):
        evaluate(results, str(_panoptic_gt(tmp_path, gt, info)), str(tmp_path / "gt_png"))


def _peak_bytes(results, gt_path, gt_dir) -> tuple[int, dict]:
    tracemalloc.start()
    try:
        metrics = evaluate(results, gt_path, gt_dir)
        return tracemalloc.get_traced_memory()[1], metrics
    finally:
        tracemalloc.stop()


def test_eval_memory_is_flat_in_the_rows_that_match_nothing(tmp_path):
    gt, info, pred, pred_categories = _case()
    segments = _segments(pred, pred_categories)
    gt_path = _panoptic_gt(tmp_path, gt, info)
    peaks = []
    for n in (300, 3000):
        rows = [_row("file:///lake/street/a.jpg", segments)]
        rows += [_row(f"file:///lake/other/{i}.jpg", segments) for i in range(n)]
        results = open_results(str(_write_results(tmp_path / f"out{n}", rows)))
        peak, metrics = _peak_bytes(results, str(gt_path), str(tmp_path / "gt_png"))
        assert metrics["images"] == {"results": n + 1, "ground_truth": 1, "matched": 1}
        peaks.append(peak)
    assert peaks[1] < 1.5 * peaks[0], peaks  # ten times the rows; a list of them would be ~10x


def test_a_ground_truth_image_is_matched_once(caplog):
    """Two folders holding the same file names (or overlapping inputs): each GT image is scored
    against its first match only; the rest would count as false positives."""
    rows = [{"image_id": 11, "image_uri": "file:///a/street/x.jpg"}, {"image_id": 12, "image_uri": "file:///b/street/x.jpg"},
            {"image_id": 13, "image_uri": "file:///b/street/y.jpg"}]
    matched, seen = match_images(rows, [{"id": 1, "file_name": "street/x.jpg"}, {"id": 2, "file_name": "street/y.jpg"}])
    assert matched == {11: 1, 13: 2} and seen == 3
    assert "1 images match a ground-truth image another image matched already" in caplog.text

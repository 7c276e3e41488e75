"""Review priority: which images a human should look at first, from what the models produced.

Computed in the predictor actor from the encoded cells (no extra model work), written as the
`review_priority` column: 0..1, higher = look first. Each signal estimates how many
corrections an annotator will make; they add up to E, and

    priority = E / (E + 1)

(one expected correction gives 0.5, three give 0.75; crowded images rank high but keep their
order, where a product of chances would pin them all at 1):

  scores       per scored item (instance, person, thing segment):
               near = 1 - (score - threshold) / (1 - threshold), clipped to 0..1
               (1 at the threshold, 0 at score 1); each item adds near / 2: low margins and
               many borderline items.
  disagreement instance and panoptic both ran: each instance adds 1 - the IoU of its mask with
               the best panoptic thing segment of the same category (pycocotools RLE IoU).
               Two models disagreeing about an object's extent.
  keypoints    each person adds the fraction of its keypoints below detectron2's visibility
               threshold (0.05, what its Visualizer uses).
An image where nothing was found scores 0: there is nothing to correct.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_util

KEYPOINT_VISIBLE = 0.05  # detectron2 Visualizer's keypoint threshold


def priority(cells: dict[str, list[dict[str, Any]]], thresholds: dict[str, float]) -> float:
    """cells: task -> encoded cell (instances, panoptic segments, people); thresholds: task ->
    the score threshold it ran with. Returns 0..1."""
    expected = 0.0
    for task in ("instance", "keypoint", "densepose"):
        expected += expected_score_fixes([item["score"] for item in cells.get(task) or []], thresholds.get(task, 0.0))
    things = [s["score"] for s in cells.get("panoptic") or [] if s.get("isthing") and s.get("score") is not None]
    expected += expected_score_fixes(things, thresholds.get("panoptic", 0.0))
    if cells.get("instance") and cells.get("panoptic") is not None:
        expected += disagreement(cells["instance"], cells["panoptic"])
    expected += sum(_hidden_fraction(p["keypoints"]) for p in cells.get("keypoint") or [])
    return expected / (expected + 1.0)


def expected_score_fixes(scores: list[float], threshold: float) -> float:
    """Sum over items of near / 2, near = 1 at the threshold and 0 at score 1."""
    if not scores:
        return 0.0
    near = np.clip(1.0 - (np.asarray(scores, float) - threshold) / max(1.0 - threshold, 1e-6), 0.0, 1.0)
    return float(np.sum(near) / 2)


def disagreement(instances: list[dict[str, Any]], segments: list[dict[str, Any]]) -> float:
    """Sum over instances of 1 - IoU with the best same-category panoptic thing segment."""
    things = [s for s in segments if s.get("isthing")]
    total = 0.0
    for inst in instances:
        same = [s for s in things if s["category_id"] == inst["category_id"]]
        if same:
            total += 1.0 - float(np.max(mask_util.iou([_rle(inst)], [_rle(s) for s in same], [0] * len(same))))
        else:
            total += 1.0
    return total


def _rle(item: dict[str, Any]) -> dict[str, Any]:
    seg = item["segmentation"]
    return {"size": list(seg["size"]), "counts": seg["counts"].encode("ascii")}


def _hidden_fraction(keypoints: list[float]) -> float:
    scores = np.asarray(keypoints, float).reshape(-1, 3)[:, 2]
    return float(np.mean(scores < KEYPOINT_VISIBLE)) if len(scores) else 0.0

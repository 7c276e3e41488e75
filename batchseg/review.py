"""Review priority: which images a human should look at first, from what the models produced.

Computed in the predictor actor from the encoded cells (no extra model work), written as the
`review_priority` column: 0..1, higher = look first. Every signal is an uncertainty in 0..1,
and they combine like independent chances that something is wrong:

    priority = 1 - prod(1 - u) over the signals the run's tasks give

  scores       per scored item (instance, person, thing segment):
               near = 1 - (score - threshold) / (1 - threshold), clipped to 0..1
               (1 at the threshold, 0 at score 1); u = 1 - prod(1 - near / 2): one item at
               the threshold gives 0.5, two give 0.75: low margins and many borderline items.
  disagreement instance and panoptic both ran: for each instance, 1 - the IoU of its mask with
               the best panoptic thing segment of the same category (pycocotools RLE IoU);
               u = mean over instances. Two models disagreeing about an object's extent.
  keypoints    per person, the fraction of keypoints below detectron2's visibility threshold
               (0.05, what its Visualizer uses); u = mean over people.
An image where nothing was found scores 0: there is nothing to correct.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_util

KEYPOINT_VISIBLE = 0.05  # detectron2 Visualizer's keypoint threshold


def priority(cells: dict[str, list[dict[str, Any]]], thresholds: dict[str, float]) -> float:
    """cells: task -> encoded cell (instances, panoptic segments, people); thresholds: task ->
    the score threshold it ran with. Returns 0..1 (not rounded: crowded images sit close to 1
    and still need an order)."""
    signals = []
    for task in ("instance", "keypoint", "densepose"):
        if cells.get(task):
            signals.append(score_uncertainty([item["score"] for item in cells[task]], thresholds.get(task, 0.0)))
    if cells.get("panoptic"):
        things = [s["score"] for s in cells["panoptic"] if s.get("isthing") and s.get("score") is not None]
        signals.append(score_uncertainty(things, thresholds.get("panoptic", 0.0)))
    if cells.get("instance") and cells.get("panoptic") is not None:
        signals.append(disagreement(cells["instance"], cells["panoptic"]))
    if cells.get("keypoint"):
        signals.append(float(np.mean([_hidden_fraction(p["keypoints"]) for p in cells["keypoint"]])))
    confident = np.prod([1.0 - min(max(u, 0.0), 1.0) for u in signals]) if signals else 1.0
    return float(1.0 - confident)


def score_uncertainty(scores: list[float], threshold: float) -> float:
    if not scores:
        return 0.0
    near = np.clip(1.0 - (np.asarray(scores, float) - threshold) / max(1.0 - threshold, 1e-6), 0.0, 1.0)
    return float(1.0 - np.prod(1.0 - near / 2))


def disagreement(instances: list[dict[str, Any]], segments: list[dict[str, Any]]) -> float:
    """Mean over instances of 1 - IoU with the best same-category panoptic thing segment."""
    things = [s for s in segments if s.get("isthing")]
    worst = []
    for inst in instances:
        same = [s for s in things if s["category_id"] == inst["category_id"]]
        if not same:
            worst.append(1.0)
            continue
        ious = mask_util.iou([_rle(inst)], [_rle(s) for s in same], [0] * len(same))
        worst.append(1.0 - float(np.max(ious)))
    return float(np.mean(worst)) if worst else 0.0


def _rle(item: dict[str, Any]) -> dict[str, Any]:
    seg = item["segmentation"]
    return {"size": list(seg["size"]), "counts": seg["counts"].encode("ascii")}


def _hidden_fraction(keypoints: list[float]) -> float:
    scores = np.asarray(keypoints, float).reshape(-1, 3)[:, 2]
    return float(np.mean(scores < KEYPOINT_VISIBLE)) if len(scores) else 0.0

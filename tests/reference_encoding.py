"""The full-resolution encoders batchseg shipped before masks were cropped: the reference that
tests/rows/test_encoding.py checks the crop encoders against and benchmarks/hot_path.py times.

They take full (N, H, W) masks and make one full-image pass per mask or segment. Not part of
the package: nothing on the hot path may build full masks on the host.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from batchseg.rows.encoding import _kept, _xywh, encode_iuv, encode_mask
from batchseg.predictors.base import DensePose, Detections, Panoptic


def encode_instances(det: Detections, full_masks: np.ndarray, score_threshold: float,
                     allowed: set[int] | None = None) -> list[dict[str, Any]]:
    """det's boxes/scores/ids with `full_masks` (N, H, W) bool in place of its crops."""
    return [
        {
            "category_id": int(det.category_ids[i]),
            "bbox": _xywh(det.boxes[i]),
            "score": float(det.scores[i]),
            "area": int(np.count_nonzero(full_masks[i])),
            "segmentation": encode_mask(full_masks[i]),
        }
        for i in _kept(det.scores, det.category_ids, score_threshold, allowed)
    ]


def encode_panoptic(pan: Panoptic, score_threshold: float = 0.0, allowed: set[int] | None = None) -> list[dict[str, Any]]:
    """One full-image comparison per segment, on the int32 id map detectron2 hands over."""
    id_map = pan.id_map.astype(np.int32, copy=False)
    out = []
    for seg in sorted(pan.segments, key=lambda s: s.id):
        if allowed is not None and seg.category_id not in allowed:
            continue
        mask = id_map == seg.id
        ys, xs = np.nonzero(mask)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)] if len(xs) else [0.0] * 4
        out.append({
            "id": seg.id, "category_id": seg.category_id, "isthing": seg.isthing,
            "area": int(len(xs)), "bbox": bbox, "score": seg.score, "segmentation": encode_mask(mask),
        })
    return out


def encode_densepose(dp: DensePose, full_masks: np.ndarray, score_threshold: float,
                     allowed: set[int] | None = None) -> list[dict[str, Any]]:
    """dp's people with `full_masks` (N, H, W) bool foregrounds in place of its crops."""
    return [
        {
            "category_id": int(dp.category_ids[i]),
            "bbox": _xywh(dp.boxes[i]),
            "score": float(dp.scores[i]),
            "segmentation": encode_mask(full_masks[i]),
            "iuv_png": encode_iuv(dp.iuv[i]),
        }
        for i in _kept(dp.scores, dp.category_ids, score_threshold, allowed)
    ]

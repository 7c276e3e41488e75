"""Model outputs -> compact COCO encodings (pure numpy + pycocotools).

Runs inside the predictor actor, so full-resolution masks never leave it: only RLE strings
travel through the object store.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_util

from batchseg.predictors.base import Detections


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool -> {"size": [H, W], "counts": str}, COCO compressed RLE (column-major)."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8, copy=False))[:, :, None])[0]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_mask(segmentation: dict[str, Any]) -> np.ndarray:
    """Inverse of encode_mask: -> (H, W) bool."""
    rle = {"size": list(segmentation["size"]), "counts": segmentation["counts"].encode("ascii")}
    return mask_util.decode(rle).astype(bool)


def encode_instances(det: Detections, score_threshold: float) -> list[dict[str, Any]]:
    """Detections -> list of instance dicts (schema.INSTANCE), highest score first.

    bbox is the model's box as [x, y, w, h] (as detectron2's instances_to_coco_json writes it);
    area is the mask's pixel count.
    """
    keep = np.flatnonzero(det.scores >= score_threshold)
    keep = keep[np.argsort(-det.scores[keep], kind="stable")]
    out = []
    for i in keep:
        x0, y0, x1, y1 = (float(v) for v in det.boxes[i])
        segmentation = encode_mask(det.masks[i])
        out.append({
            "category_id": int(det.category_ids[i]),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": float(det.scores[i]),
            "area": int(np.count_nonzero(det.masks[i])),
            "segmentation": segmentation,
        })
    return out

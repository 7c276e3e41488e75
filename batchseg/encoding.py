"""Model outputs -> compact COCO encodings (pure numpy + pycocotools).

Runs inside the predictor actor, so full-resolution masks never leave it: only RLE strings
travel through the object store.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from batchseg.predictors.base import DensePose, Detections, Keypoints, Panoptic


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool -> {"size": [H, W], "counts": str}, COCO compressed RLE (column-major)."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8, copy=False))[:, :, None])[0]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_mask(segmentation: dict[str, Any]) -> np.ndarray:
    """Inverse of encode_mask: -> (H, W) bool."""
    rle = {"size": list(segmentation["size"]), "counts": segmentation["counts"].encode("ascii")}
    return mask_util.decode(rle).astype(bool)


def _kept(scores: np.ndarray, category_ids: np.ndarray, score_threshold: float, allowed: set[int] | None) -> np.ndarray:
    """Indices passing the threshold and the category allow-list, highest score first."""
    ok = scores >= score_threshold
    if allowed is not None:
        ok &= np.isin(category_ids, list(allowed))
    keep = np.flatnonzero(ok)
    return keep[np.argsort(-scores[keep], kind="stable")]


def _xywh(box: np.ndarray) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def encode_instances(det: Detections, score_threshold: float, allowed: set[int] | None = None) -> list[dict[str, Any]]:
    """Detections -> list of instance dicts (schema.INSTANCE), highest score first.

    bbox is the model's box as [x, y, w, h] (as detectron2's instances_to_coco_json writes it);
    area is the mask's pixel count. `allowed`: dataset ids to keep (None: all).
    """
    return [
        {
            "category_id": int(det.category_ids[i]),
            "bbox": _xywh(det.boxes[i]),
            "score": float(det.scores[i]),
            "area": int(np.count_nonzero(det.masks[i])),
            "segmentation": encode_mask(det.masks[i]),
        }
        for i in _kept(det.scores, det.category_ids, score_threshold, allowed)
    ]


def encode_keypoints(kp: Keypoints, score_threshold: float, allowed: set[int] | None = None) -> list[dict[str, Any]]:
    """Keypoints -> list of person dicts (schema.KEYPOINT_PERSON), highest score first.

    `keypoints` is K x [x, y, v] flattened (3K floats) in the model's (COCO) keypoint order,
    exactly as detectron2's instances_to_coco_json writes COCO results: x, y shifted by -0.5
    from the model's continuous coordinates to COCO's pixel-index convention, and v the
    keypoint's score (COCO result files carry a score there, not a visibility flag).
    """
    out = []
    for i in _kept(kp.scores, kp.category_ids, score_threshold, allowed):
        points = kp.keypoints[i].astype(np.float64).copy()
        points[:, :2] -= 0.5
        out.append({
            "category_id": int(kp.category_ids[i]),
            "bbox": _xywh(kp.boxes[i]),
            "score": float(kp.scores[i]),
            "keypoints": points.reshape(-1).tolist(),
        })
    return out


def encode_panoptic(pan: Panoptic, score_threshold: float = 0.0, allowed: set[int] | None = None) -> list[dict[str, Any]]:
    """Panoptic -> list of segment dicts (schema.PANOPTIC_SEGMENT), in id order.

    Each segment carries its COCO RLE, so decode_panoptic rebuilds the id map exactly.
    Segments are kept whole (the model already applied its own combine thresholds);
    `allowed` drops segments of other categories, which then read as void (0).
    """
    out = []
    for seg in sorted(pan.segments, key=lambda s: s.id):
        if allowed is not None and seg.category_id not in allowed:
            continue
        mask = pan.id_map == seg.id
        ys, xs = np.nonzero(mask)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)] if len(xs) else [0.0] * 4
        out.append({
            "id": seg.id, "category_id": seg.category_id, "isthing": seg.isthing,
            "area": int(len(xs)), "bbox": bbox, "score": seg.score, "segmentation": encode_mask(mask),
        })
    return out


def decode_panoptic(segments: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """Segments -> (height, width) int32 id map, 0 where no segment (void)."""
    id_map = np.zeros((height, width), np.int32)
    for seg in segments:
        id_map[decode_mask(seg["segmentation"])] = seg["id"]
    return id_map


def encode_densepose(dp: DensePose, score_threshold: float, allowed: set[int] | None = None) -> list[dict[str, Any]]:
    """DensePose -> list of person dicts (schema.DENSEPOSE_PERSON), highest score first.

    `iuv_png` is the quantized chart (I, U*255, V*255) over the person's box as a PNG, the
    same image detectron2's compress_quantized_densepose_chart_result base64-encodes;
    decode it with decode_iuv. `segmentation` is the DensePose foreground as COCO RLE.
    """
    return [
        {
            "category_id": int(dp.category_ids[i]),
            "bbox": _xywh(dp.boxes[i]),
            "score": float(dp.scores[i]),
            "segmentation": encode_mask(dp.masks[i]),
            "iuv_png": encode_iuv(dp.iuv[i]),
        }
        for i in _kept(dp.scores, dp.category_ids, score_threshold, allowed)
    ]


def encode_iuv(iuv: np.ndarray) -> bytes:
    """(3, h, w) uint8 -> PNG bytes of the (h, w, 3) image, as detectron2 compresses it."""
    buf = io.BytesIO()
    Image.fromarray(np.moveaxis(iuv, 0, -1)).save(buf, format="png", optimize=True)
    return buf.getvalue()


def decode_iuv(png: bytes) -> np.ndarray:
    """PNG bytes -> (3, h, w) uint8: I (part 0..24), U * 255, V * 255 over the person's box."""
    return np.moveaxis(np.asarray(Image.open(io.BytesIO(png)), dtype=np.uint8), -1, 0)

"""Model outputs -> compact COCO encodings (pure numpy + pycocotools).

Masks arrive cropped to their boxes (CroppedMasks) and the full-image COCO RLE is built from
each crop's runs, so work is proportional to the crops, not to N x H x W; pycocotools writes
the compressed strings. Panoptic id maps are encoded in one pass. Only RLE strings travel on.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from batchseg.predictors.base import CroppedMasks, DensePose, Detections, Keypoints, Panoptic


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool -> {"size": [H, W], "counts": str}, COCO compressed RLE (column-major)."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8, copy=False))[:, :, None])[0]
    return _cell(rle)


def decode_mask(segmentation: dict[str, Any]) -> np.ndarray:
    """Inverse of encode_mask: -> (H, W) bool."""
    rle = {"size": list(segmentation["size"]), "counts": segmentation["counts"].encode("ascii")}
    return mask_util.decode(rle).astype(bool)


def _cell(rle: dict[str, Any]) -> dict[str, Any]:
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _compress(counts: list[np.ndarray], height: int, width: int) -> list[dict[str, Any]]:
    """Uncompressed COCO run lengths (zeros first, column-major) -> compressed RLE cells.

    pycocotools writes the string (frPyObjects -> rleToString), so it is byte-identical to
    pycocotools.mask.encode of the same mask.
    """
    if not counts:
        return []
    rles = mask_util.frPyObjects([{"size": [height, width], "counts": c} for c in counts], height, width)
    return [_cell(r) for r in rles]


def crop_counts(crop: np.ndarray, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """COCO run lengths of a (height, width) mask that is `crop` ((h, w) bool) at (y0, x0), zero elsewhere.

    Column-major like pycocotools: each crop column is a stretch of the image column, with
    height - h zeros between consecutive crop columns; when h == height those gaps vanish and
    runs continue from one column into the next. Returns (K,) uint32, zeros first (the first
    count may be 0), summing to height * width. Work is O(h * w), never O(height * width);
    a column-major (Fortran-order) crop, as CroppedMasks holds them, is read without a transpose.
    """
    total = height * width
    h, w = crop.shape
    if h == 0 or w == 0 or not crop.any():
        return np.array([total], np.uint32)
    n = w * (h + 2)
    padded = np.zeros(n, bool)  # the crop's columns one after another, each between two Falses
    padded.reshape(w, h + 2)[:, 1:-1] = crop.T
    flip = np.flatnonzero(padded[1:] != padded[:-1]) + 1  # where a value differs from the one before
    column, row = np.divmod(flip, h + 2)  # row 1..h + 1 in the padded column: pixel row - 1
    pos = (x0 + column) * height + y0 + row - 1  # pixel index (column-major) where the value flips
    if h == height:  # a run ending at the bottom of one column and restarting at the top of the next
        same = pos[1:] == pos[:-1]
        keep = np.ones(len(pos), bool)
        keep[1:] &= ~same
        keep[:-1] &= ~same
        pos = pos[keep]
    pos = pos[pos < total]  # a run that ends at the last pixel has no zeros after it
    return np.diff(pos, prepend=0, append=total).astype(np.uint32)


def _area(counts: np.ndarray) -> int:
    """Pixels set in a mask, from its COCO counts (every second run is ones)."""
    return int(counts[1::2].sum())


def encode_masks(masks: CroppedMasks, indices: np.ndarray) -> list[dict[str, Any]]:
    """The masks at `indices` -> COCO compressed RLE cells of the full (height, width) image."""
    return _compress(_counts(masks, indices), masks.height, masks.width)


def _counts(masks: CroppedMasks, indices: np.ndarray) -> list[np.ndarray]:
    offsets = masks.offsets.tolist()
    return [crop_counts(masks.crops[i], *offsets[i], masks.height, masks.width) for i in indices]


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
    keep = _kept(det.scores, det.category_ids, score_threshold, allowed)
    counts = _counts(det.masks, keep)
    return [
        {
            "category_id": int(det.category_ids[i]),
            "bbox": _xywh(det.boxes[i]),
            "score": float(det.scores[i]),
            "area": _area(c),
            "segmentation": segmentation,
        }
        for i, c, segmentation in zip(keep, counts, _compress(counts, det.masks.height, det.masks.width))
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
    bbox is [x, y, w, h] of the segment's pixels ([0, 0, 0, 0] if it has none).
    """
    segments = [s for s in sorted(pan.segments, key=lambda s: s.id) if allowed is None or s.category_id in allowed]
    runs = _IdRuns(pan.id_map)
    found = [runs.segment(s.id) for s in segments]
    height, width = pan.id_map.shape
    cells = _compress([counts for counts, _, _ in found], height, width)
    return [
        {"id": seg.id, "category_id": seg.category_id, "isthing": seg.isthing,
         "area": area, "bbox": bbox, "score": seg.score, "segmentation": cell}
        for seg, (_, area, bbox), cell in zip(segments, found, cells)
    ]


class _IdRuns:
    """One pass over an (H, W) id map: its column-major runs, grouped by id.

    The map is read once in column-major order and split where the id changes; the runs are
    then stably sorted by id, so each id's runs sit together in image order and its COCO
    counts, area and bbox come from its own runs only (no full-image pass per segment).
    """

    def __init__(self, id_map: np.ndarray) -> None:
        self.height, self.width = id_map.shape
        flat = np.ascontiguousarray(id_map.T).reshape(-1)
        starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts = np.concatenate([[0], starts]) if flat.size else starts
        ends = np.append(starts[1:], flat.size)
        order = np.argsort(flat[starts], kind="stable")
        self.starts, self.ends, ids = starts[order], ends[order], flat[starts][order]
        self.ids, self.first = np.unique(ids, return_index=True)
        self.last = np.append(self.first[1:], len(ids))  # one past each id's last run

    def segment(self, seg_id: int) -> tuple[np.ndarray, int, list[float]]:
        """-> (COCO counts (K,) uint32, area in pixels, bbox [x, y, w, h])."""
        total = self.height * self.width
        k = np.searchsorted(self.ids, seg_id)
        if k == len(self.ids) or self.ids[k] != seg_id:
            return np.array([total], np.uint32), 0, [0.0] * 4
        s, e = self.starts[self.first[k]:self.last[k]], self.ends[self.first[k]:self.last[k]]
        counts = np.empty(2 * len(s) + 1, np.int64)
        counts[0:-1:2] = s - np.append(0, e[:-1])  # zeros before each run
        counts[1::2] = e - s
        counts[-1] = total - e[-1]
        if counts[-1] == 0:  # the segment ends at the last pixel: no zeros after it
            counts = counts[:-1]
        x_first, x_last = s // self.height, (e - 1) // self.height
        one_column = x_first == x_last  # a run spanning columns covers rows 0..H-1 in the bbox
        y_min = int(np.where(one_column, s % self.height, 0).min())
        y_max = int(np.where(one_column, (e - 1) % self.height, self.height - 1).max())
        x_min, x_max = int(x_first[0]), int(x_last[-1])
        bbox = [float(x_min), float(y_min), float(x_max - x_min + 1), float(y_max - y_min + 1)]
        return counts.astype(np.uint32), _area(counts), bbox


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
    keep = _kept(dp.scores, dp.category_ids, score_threshold, allowed)
    return [
        {
            "category_id": int(dp.category_ids[i]),
            "bbox": _xywh(dp.boxes[i]),
            "score": float(dp.scores[i]),
            "segmentation": segmentation,
            "iuv_png": encode_iuv(dp.iuv[i]),
        }
        for i, segmentation in zip(keep, encode_masks(dp.masks, keep))
    ]


def encode_iuv(iuv: np.ndarray) -> bytes:
    """(3, h, w) uint8 -> PNG bytes of the (h, w, 3) image, as detectron2 compresses it."""
    buf = io.BytesIO()
    Image.fromarray(np.moveaxis(iuv, 0, -1)).save(buf, format="png", optimize=True)
    return buf.getvalue()


def decode_iuv(png: bytes) -> np.ndarray:
    """PNG bytes -> (3, h, w) uint8: I (part 0..24), U * 255, V * 255 over the person's box."""
    return np.moveaxis(np.asarray(Image.open(io.BytesIO(png)), dtype=np.uint8), -1, 0)

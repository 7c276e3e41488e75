"""Link instances across consecutive sampled frames of a video into tracks.

The association is SORT / ByteTrack's IoU step without a motion model: between two
consecutive frames, instances of the same category are paired by scipy's
`linear_sum_assignment` (Hungarian) on 1 - mask IoU (pycocotools' RLE IoU), and a pair with an
IoU under `min_iou` is not a match. An instance with no match starts a new track.

Tracking runs per video segment (`link_segment`, the frames one read task decoded), and the
segments are stitched at their borders (`stitch`) by the same association between the last
frame of a segment and the first of the next, so a track crossing a border keeps one id.
`track_video` does both and numbers the tracks 1, 2, ... in order of first appearance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_util
from scipy.optimize import linear_sum_assignment

Instances = Sequence[dict[str, Any]]  # one frame's `instances` cells (category_id, segmentation)


def match(before: Instances, after: Instances, min_iou: float) -> list[tuple[int, int]]:
    """Pairs (i, j): instance i of `before` continues as instance j of `after`; same category,
    mask IoU >= min_iou, chosen by minimum total cost (1 - IoU) per category."""
    pairs = []
    for category in {a["category_id"] for a in after} & {b["category_id"] for b in before}:
        rows = [i for i, b in enumerate(before) if b["category_id"] == category]
        cols = [j for j, a in enumerate(after) if a["category_id"] == category]
        iou = mask_util.iou([_rle(after[j]) for j in cols], [_rle(before[i]) for i in rows], [0] * len(rows))
        iou = np.asarray(iou, float).reshape(len(cols), len(rows)).T  # (before, after)
        for r, c in zip(*linear_sum_assignment(1.0 - iou)):
            if iou[r, c] >= min_iou:
                pairs.append((rows[r], cols[c]))
    return sorted(pairs)


def link_segment(frames: Sequence[Instances], min_iou: float) -> list[list[int]]:
    """Per frame (in time order), per instance: a track number local to the segment (0, 1, ...)."""
    out: list[list[int]] = []
    fresh = 0
    for k, instances in enumerate(frames):
        ids = [-1] * len(instances)
        if k:
            for i, j in match(frames[k - 1], instances, min_iou):
                ids[j] = out[k - 1][i]
        for j in range(len(ids)):
            if ids[j] < 0:
                ids[j], fresh = fresh, fresh + 1
        out.append(ids)
    return out


def stitch(segments: Sequence[Sequence[Instances]], local: Sequence[list[list[int]]],
           min_iou: float) -> list[list[list[int]]]:
    """Segments' local track numbers -> video-wide ones: a track that continues across a border
    (last frame of a segment to the first of the next, same association) takes the earlier id;
    ids are then numbered 1, 2, ... in order of first appearance."""
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def root(node: tuple[int, int]) -> tuple[int, int]:
        while parent.get(node, node) != node:
            node = parent[node]
        return node

    previous = None  # (segment index, its last frame's instances, their local ids)
    for s, (frames, ids) in enumerate(zip(segments, local)):
        if not frames:
            continue
        if previous is not None:
            p, last, last_ids = previous
            for i, j in match(last, frames[0], min_iou):
                parent[root((s, ids[0][j]))] = root((p, last_ids[i]))
        previous = (s, frames[-1], ids[-1])
    number: dict[tuple[int, int], int] = {}
    out = []
    for s, ids in enumerate(local):
        seg = []
        for frame_ids in ids:
            seg.append([number.setdefault(root((s, t)), len(number) + 1) for t in frame_ids])
        out.append(seg)
    return out


def track_video(segments: Sequence[Sequence[Instances]], min_iou: float) -> list[list[list[int]]]:
    """Frames grouped by segment (each in time order) -> per segment, per frame, per instance,
    the video-wide track id (1, 2, ...)."""
    return stitch(segments, [link_segment(frames, min_iou) for frames in segments], min_iou)


def _rle(instance: dict[str, Any]) -> dict[str, Any]:
    seg = instance["segmentation"]
    counts = seg["counts"]
    return {"size": list(seg["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}

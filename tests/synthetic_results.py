"""A results folder written by hand through the real encoders: keypoints and DensePose rows
(and instances), for export tests that must run without detectron2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchseg.rows.encoding import encode_densepose, encode_instances, encode_keypoints
from batchseg.predictors.base import CroppedMasks, DensePose, Detections, Keypoints
from batchseg.rows.schema import ROW, image_id

KEYPOINT_NAMES = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                  "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                  "right_knee", "left_ankle", "right_ankle"]
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
            [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]


def person_row(uri: str, h: int, w: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    box = np.array([[w * 0.2, h * 0.1, w * 0.7, h * 0.9]], np.float32)
    mask = np.zeros((1, h, w), bool)
    mask[0, int(h * 0.1):int(h * 0.9), int(w * 0.2):int(w * 0.7)] = True
    points = np.column_stack([rng.uniform(w * 0.2, w * 0.7, 17), rng.uniform(h * 0.1, h * 0.9, 17),
                              rng.uniform(0.1, 2.0, 17)])[None].astype(np.float32)
    bh, bw = int(h * 0.8), int(w * 0.5)
    iuv = np.stack([rng.integers(0, 25, (bh, bw)), rng.integers(0, 256, (bh, bw)), rng.integers(0, 256, (bh, bw))]).astype(np.uint8)
    score, ids = np.array([0.9], np.float32), np.array([1])
    return {
        "image_id": image_id(uri), "image_uri": uri, "width": w, "height": h, "source_size": 1, "source_version": "v",
        "error": None,
        "instances": encode_instances(Detections(box, score, ids, CroppedMasks.from_full(mask)), 0.5),
        "panoptic": None,
        "keypoints": encode_keypoints(Keypoints(box, score, ids, points), 0.5),
        "densepose": encode_densepose(DensePose(box, score, ids, [iuv], CroppedMasks.from_full(mask)), 0.5),
    }


def write_results(folder: Path, count: int = 3, rows_per_file: int = 1000) -> Path:
    """folder/annotations/*.parquet + folder/run.json for `count` people images (+ 1 failed row)."""
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    rows = [person_row(f"s3://lake/people/p{i:06d}.jpg", 60 + i % 7, 80 + i % 5, i) for i in range(count)]
    rows.append({"image_id": image_id("s3://lake/people/broken.jpg"), "image_uri": "s3://lake/people/broken.jpg",
                 "width": None, "height": None, "source_size": 0, "source_version": "v", "error": "empty file",
                 "instances": None, "panoptic": None, "keypoints": None, "densepose": None})
    for start in range(0, len(rows), rows_per_file):
        pq.write_table(pa.Table.from_pylist(rows[start:start + rows_per_file], schema=ROW),
                       folder / "annotations" / f"part-{start // rows_per_file:05d}.parquet")
    person = [{"id": 1, "name": "person"}]
    run = {
        "images": {"in": len(rows), "annotated": count, "failed": 1},
        "categories": {"instance": {"things": person}, "densepose": {"things": person},
                       "keypoint": {"things": person, "keypoint_names": KEYPOINT_NAMES, "skeleton": SKELETON}},
        "config": {"inputs": ["s3://lake/people/"], "tasks": ["instance", "keypoint", "densepose"],
                   "models": {"instance": {"model": "mask_rcnn"}, "keypoint": {"model": "keypoint_rcnn"},
                              "densepose": {"model": "densepose"}}},
        "versions": {"batchseg": "0.1.0"},
    }
    (folder / "run.json").write_text(json.dumps(run))
    return folder

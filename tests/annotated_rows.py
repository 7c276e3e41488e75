"""A results folder of hand-made rows for export and eval tests: masks with holes, objects in
two parts, an empty mask (what a random or tiny box gives), panoptic segments, keypoints,
DensePose, one failed row, and a run report with provenance. Cells are written with the real RLE
encoder and the real Arrow schema, so readers see exactly what a run writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchseg.rows.encoding import encode_iuv, encode_mask
from batchseg.rows.schema import ANNOTATIONS, ROW, RUNS, image_id

RUN_ID = "20261122T000000Z-0001"
THINGS = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]
STUFF = [{"id": 200, "name": "background"}]
KEYPOINT_NAMES = [f"point{i}" for i in range(17)]
WEIGHTS_SHA256 = "5f" * 32


def shapes(height: int, width: int, seed: int) -> dict[str, np.ndarray]:
    """(H, W) bool masks: a ring (a block with a hole), a dog in two parts, and an empty one."""
    rng = np.random.default_rng(seed)
    y, x = int(rng.integers(2, 8)), int(rng.integers(2, 8))
    ring = np.zeros((height, width), bool)
    ring[y:y + 25, x:x + 30] = True
    ring[y + 8:y + 14, x + 10:x + 17] = False
    dog = np.zeros((height, width), bool)
    dog[36:50, 3:9] = True
    dog[40:46, 50:61] = True
    return {"ring": ring, "dog": dog, "empty": np.zeros((height, width), bool)}


def _instance(mask: np.ndarray, category_id: int, score: float, bbox: list[float] | None = None) -> dict:
    ys, xs = np.nonzero(mask)
    if bbox is None:  # the model's box: a little off the mask's tight box, as real boxes are
        bbox = [xs.min() - 0.4, ys.min() + 0.3, xs.max() - xs.min() + 1.2, ys.max() - ys.min() + 0.5]
    return {"category_id": category_id, "bbox": [float(v) for v in bbox], "score": score,
            "area": int(mask.sum()), "segmentation": encode_mask(mask)}


def image_row(uri: str, height: int, width: int, seed: int) -> dict:
    m = shapes(height, width, seed)
    instances = [_instance(m["ring"], 1, 0.95), _instance(m["dog"], 18, 0.8),
                 _instance(m["empty"], 1, 0.3, bbox=[70.2, 3.1, 0.6, 0.4])]  # lowest score, as tiny boxes get
    ids = np.ones((height, width), np.int32)  # 1: background stuff
    ids[m["ring"]], ids[m["dog"]], ids[:2] = 2, 3, 0  # 0: void
    panoptic = []
    for sid, cid, isthing in [(1, 200, False), (2, 1, True), (3, 18, True)]:
        seg = ids == sid
        ys, xs = np.nonzero(seg)
        panoptic.append({"id": sid, "category_id": cid, "isthing": isthing, "area": int(seg.sum()),
                         "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
                         "score": 0.9 if isthing else None, "segmentation": encode_mask(seg)})
    rng = np.random.default_rng(seed)
    points = np.column_stack([rng.uniform(0, width - 1, 17), rng.uniform(0, height - 1, 17), rng.uniform(0.1, 1, 17)])
    return {"image_id": image_id(uri), "image_uri": uri, "width": width, "height": height, "source_size": 1,
            "source_version": "v1", "error": None, "error_kind": None, "review_priority": round(0.1 * seed, 3),
            "instances": instances, "panoptic": panoptic,
            "keypoints": [{"category_id": 1, "bbox": [4.0, 3.0, 40.0, 30.0], "score": 0.7,
                           "keypoints": points.reshape(-1).tolist()}],
            "densepose": [{"category_id": 1, "bbox": instances[0]["bbox"], "score": 0.85,
                           "segmentation": encode_mask(m["ring"]),
                           "iuv_png": encode_iuv(rng.integers(0, 25, (3, 26, 31)).astype(np.uint8))}]}


def failed_row(uri: str) -> dict:
    return {"image_id": image_id(uri), "image_uri": uri, "width": None, "height": None, "source_size": 0,
            "source_version": "v1", "error": "truncated file", "error_kind": "content", "review_priority": None,
            "instances": None, "panoptic": None, "keypoints": None, "densepose": None}


def run_report(run_id: str = RUN_ID, inputs: list[str] | None = None) -> dict:
    tasks = ["instance", "panoptic", "keypoint", "densepose"]
    return {
        "run_id": run_id,
        "categories": {"instance": {"things": THINGS}, "panoptic": {"things": THINGS, "stuff": STUFF},
                       "densepose": {"things": THINGS[:1]},
                       "keypoint": {"things": THINGS[:1], "keypoint_names": KEYPOINT_NAMES, "skeleton": [[1, 2], [2, 3]]}},
        "config": {"inputs": inputs or ["file:///lake/images"], "tasks": tasks},
        "versions": {"batchseg": "0.1.0"},
        "provenance": {"batchseg_version": "0.1.0", "run_id": run_id, "tasks": {
            t: {"fingerprint": f"{i + 1}" * 32, "backend": "detectron2", "model": f"{t}_model.yaml",
                "weights": f"s3://models/{t}.pkl", "weights_sha256": WEIGHTS_SHA256, "score_threshold": 0.3,
                "precision": "fp32"} for i, t in enumerate(tasks)}},
    }


def write_results(folder: Path, count: int = 4, root: str = "file:///lake/images") -> Path:
    """folder/annotations/run=RUN_ID/part-00000.parquet, folder/runs/RUN_ID.json and
    folder/run.json: `count` images under the input folder `root` (a canonical URI, as
    image_uri holds them) plus one failed row."""
    part = folder / ANNOTATIONS / f"run={RUN_ID}"
    part.mkdir(parents=True, exist_ok=True)
    rows = [image_row(f"{root}/street/img{i:03d}.jpg", 60 + i % 3, 80 + i % 4, i) for i in range(count)]
    rows.append(failed_row(f"{root}/street/broken.jpg"))
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW), part / "part-00000.parquet")
    report = json.dumps(run_report(inputs=[root]))
    (folder / RUNS).mkdir(exist_ok=True)
    (folder / RUNS / f"{RUN_ID}.json").write_text(report)
    (folder / "run.json").write_text(report)
    return folder

"""Score pre-labels against a COCO ground truth: COCOeval (bbox, segm, keypoints) and PQ.

Images are matched to the ground truth by id (a GT built from our own export) or by file
name: a GT `file_name` equal to the end of the image's path ("street/a.jpg" matches
".../images/street/a.jpg"; the longest match wins). Only matched images are scored.
PQ follows the COCO panoptic definition (panopticapi is not on PyPI, so it is computed here):
segments match at IoU > 0.5 within a category; predicted segments lying more than half on
void or on a crowd region of their category are ignored.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import defaultdict
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from batchseg.config import ConfigError
from batchseg.encoding import decode_panoptic
from batchseg.results import Results
from batchseg.sources import image_path

COCO_STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
KEYPOINT_STATS = ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]


def match_images(rows: list[dict[str, Any]], gt_images: list[dict[str, Any]]) -> dict[int, int]:
    """Our image_id -> GT image id, by id first, else by the longest file-name suffix."""
    by_id = {img["id"] for img in gt_images}
    by_name = {img["file_name"].lstrip("./"): img["id"] for img in gt_images}
    matched = {}
    for row in rows:
        if row["image_id"] in by_id:
            matched[row["image_id"]] = row["image_id"]
            continue
        parts = image_path(row["image_uri"]).split("://", 1)[-1].split("/")
        for i in range(len(parts)):
            name = "/".join(parts[i:])
            if name in by_name:
                matched[row["image_id"]] = by_name[name]
                break
    return matched


def evaluate(results: Results, gt_path: str, gt_panoptic_dir: str | None = None,
             storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics (percent) for every task present in both the results and the ground truth."""
    with fsspec.open(gt_path, "r", **(storage_options or {})) as f:
        gt = json.load(f)
    if not gt.get("images"):
        raise ConfigError(f"{gt_path} holds no images; expected a COCO ground-truth JSON")
    columns = ["image_id", "image_uri", "width", "height", "error", "instances", "keypoints", "panoptic"]
    rows = [r for r in results.rows(columns) if r["error"] is None]
    matched = match_images(rows, gt["images"])
    if not matched:
        raise ConfigError(
            f"the ground truth matches no image of the results ({len(rows)} images, {len(gt['images'])} in GT): "
            "compare its image ids or file_names with the image URIs"
        )
    metrics: dict[str, Any] = {"images": {"results": len(rows), "ground_truth": len(gt["images"]), "matched": len(matched)}}
    rows = [r for r in rows if r["image_id"] in matched]
    if "segments_info" in (gt.get("annotations") or [{}])[0]:
        folder = gt_panoptic_dir or os.path.splitext(gt_path)[0]
        metrics["panoptic"] = panoptic_quality(rows, matched, gt, folder, storage_options or {})
        return metrics
    anns = gt.get("annotations", [])
    if any("keypoints" in c for c in gt.get("categories", [])):  # a person_keypoints ground truth
        plan = [("keypoints", ["keypoints"])]
    else:
        plan = [("instances", ["bbox"] + (["segm"] if any("segmentation" in a for a in anns) else []))]
    for column, iou_types in plan:
        detections = [
            {**{k: v for k, v in item.items() if k in ("category_id", "bbox", "score", "segmentation", "keypoints")},
             "image_id": matched[r["image_id"]]}
            for r in rows if r.get(column) is not None for item in r[column]
        ]
        if not any(r.get(column) is not None for r in rows) or not anns:
            continue
        for iou_type in iou_types:
            metrics[iou_type] = _cocoeval(gt, detections, iou_type, sorted(set(matched.values())))
    return metrics


def _cocoeval(gt: dict[str, Any], detections: list[dict[str, Any]], iou_type: str, image_ids: list[int]) -> dict[str, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections) if detections else COCO()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = KEYPOINT_STATS if iou_type == "keypoints" else COCO_STATS
    # COCOeval writes -1 where the GT has no objects of that size
    return {name: round(float(v) * 100, 3) if v >= 0 else None for name, v in zip(names, ev.stats)}


def panoptic_quality(rows: list[dict[str, Any]], matched: dict[int, int], gt: dict[str, Any], gt_dir: str,
                     storage_options: dict[str, Any]) -> dict[str, Any]:
    isthing = {c["id"]: bool(c.get("isthing", 1)) for c in gt["categories"]}
    gt_anns = {a["image_id"]: a for a in gt["annotations"]}
    stats: dict[int, dict[str, float]] = defaultdict(lambda: {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0})
    for row in rows:
        ann = gt_anns.get(matched[row["image_id"]])
        if ann is None or row.get("panoptic") is None:
            continue
        with fsspec.open(f"{gt_dir.rstrip('/')}/{ann['file_name']}", "rb", **storage_options) as f:
            rgb = np.asarray(Image.open(f).convert("RGB"), dtype=np.int64)
        gt_map = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
        pred_map = decode_panoptic(row["panoptic"], row["height"], row["width"])
        if gt_map.shape != pred_map.shape:
            raise ConfigError(f"ground-truth PNG {ann['file_name']} is {gt_map.shape}, results {pred_map.shape}")
        _score_image(gt_map, pred_map, {s["id"]: s for s in ann["segments_info"]},
                     {s["id"]: s for s in row["panoptic"]}, stats)
    return _summarise_pq(stats, isthing)


def _score_image(gt_map, pred_map, gt_segs, pred_segs, stats) -> None:
    offset = int(pred_map.max()) + 1
    pairs, counts = np.unique(gt_map.astype(np.int64) * offset + pred_map, return_counts=True)
    inter = {(int(p // offset), int(p % offset)): int(c) for p, c in zip(pairs, counts)}
    gt_area = {g: 0 for g in gt_segs}
    pred_area = {p: 0 for p in pred_segs}
    for (g, p), c in inter.items():
        if g in gt_area:
            gt_area[g] += c
        if p in pred_area:
            pred_area[p] += c
    gt_matched, pred_matched = set(), set()
    for (g, p), c in inter.items():
        if g not in gt_segs or p not in pred_segs or gt_segs[g].get("iscrowd", 0):
            continue
        if gt_segs[g]["category_id"] != pred_segs[p]["category_id"]:
            continue
        union = pred_area[p] + gt_area[g] - c - inter.get((0, p), 0)
        iou = c / union if union else 0.0
        if iou > 0.5:
            stat = stats[gt_segs[g]["category_id"]]
            stat["tp"] += 1
            stat["iou"] += iou
            gt_matched.add(g)
            pred_matched.add(p)
    crowd = {seg["category_id"]: g for g, seg in gt_segs.items() if seg.get("iscrowd", 0)}
    for g, seg in gt_segs.items():
        if g not in gt_matched and not seg.get("iscrowd", 0):
            stats[seg["category_id"]]["fn"] += 1
    for p, seg in pred_segs.items():
        if p in pred_matched or not pred_area[p]:
            continue
        ignored = inter.get((0, p), 0) + inter.get((crowd.get(seg["category_id"], -1), p), 0)
        if ignored / pred_area[p] > 0.5:
            continue
        stats[seg["category_id"]]["fp"] += 1


def _summarise_pq(stats: dict[int, dict[str, float]], isthing: dict[int, bool]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, keep in (("All", lambda c: True), ("Things", lambda c: isthing.get(c, True)),
                       ("Stuff", lambda c: not isthing.get(c, True))):
        pq = sq = rq = 0.0
        cats = [c for c, s in stats.items() if keep(c) and s["tp"] + s["fp"] + s["fn"] > 0]
        for c in cats:
            s = stats[c]
            denom = s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"]
            pq += s["iou"] / denom
            sq += s["iou"] / s["tp"] if s["tp"] else 0.0
            rq += s["tp"] / denom
        n = len(cats)
        out[name] = {"PQ": round(100 * pq / n, 3) if n else None, "SQ": round(100 * sq / n, 3) if n else None,
                     "RQ": round(100 * rq / n, 3) if n else None, "categories": n}
    return out


def format_table(metrics: dict[str, Any]) -> str:
    lines = [f"images: {metrics['images']['matched']} matched of {metrics['images']['results']} annotated "
             f"and {metrics['images']['ground_truth']} in the ground truth"]
    for kind, values in metrics.items():
        if kind == "images":
            continue
        if kind == "panoptic":
            lines.append(f"{'panoptic':10s}" + "".join(f"  {k:>6s} PQ {v['PQ']}  SQ {v['SQ']}  RQ {v['RQ']}" for k, v in values.items()))
        else:
            lines.append(f"{kind:10s}" + "".join(f"  {k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in values.items()))
    return "\n".join(lines)

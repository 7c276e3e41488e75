"""Score pre-labels against a COCO ground truth: COCOeval (bbox, segm, keypoints) and PQ.

Images are matched to the ground truth by id (a GT built from our own export) or by file
name: a GT `file_name` equal to the end of the image's path ("street/a.jpg" matches
".../images/street/a.jpg"; the longest match wins). Only matched images are scored.

Rows are streamed: one pass matches images (keeping our id -> GT id for matched images only),
one more pass collects what the scorer needs from the matched images. COCOeval needs every
detection at once (pycocotools holds them anyway); PQ needs nothing in memory per image:
each predicted panoptic map is written as a PNG to a temporary folder as it streams by.

PQ is computed by hotcoco (`hotcoco.panoptic.PanopticEval`), which follows panopticapi, the
COCO reference: segments match at IoU > 0.5 within a category, void pixels are left out of
the union, predicted segments lying more than half on void or on a crowd region of their
category are ignored. panopticapi itself is not installable next to numpy 2 (panopticapi-lite
pins numpy < 2); on the same inputs (void, crowd, relabelled, shifted and spurious segments)
hotcoco, panopticapi and the implementation batchseg had before gave the same PQ, SQ and RQ,
so ours was deleted; tests/evaluation/test_eval.py checks hand-computed cases.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from batchseg.config import ConfigError
from batchseg.rows.encoding import decode_panoptic
from batchseg.store.results import Results
from batchseg.inputs.sources import image_path
from batchseg.rows.tasks import TASK_TABLE

log = logging.getLogger(__name__)

COCO_STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
KEYPOINT_STATS = ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]


def match_images(rows: Iterable[dict[str, Any]], gt_images: list[dict[str, Any]]) -> tuple[dict[int, int], int]:
    """(our image_id -> GT image id for the matched rows, rows seen): by id first, else by the
    longest file-name suffix. `rows` need `image_id` and `image_uri`."""
    by_id = {img["id"] for img in gt_images}
    by_name = {img["file_name"].lstrip("./"): img["id"] for img in gt_images if img.get("file_name")}
    matched: dict[int, int] = {}
    taken: set[int] = set()
    seen = twice = 0
    for row in rows:
        seen += 1
        gt_id = row["image_id"] if row["image_id"] in by_id else None
        if gt_id is None:
            parts = image_path(row["image_uri"]).split("://", 1)[-1].split("/")
            gt_id = next((by_name[n] for n in ("/".join(parts[i:]) for i in range(len(parts))) if n in by_name), None)
        if gt_id in taken:
            twice += 1
        elif gt_id is not None:  # a GT image is scored once, against the first match
            matched[row["image_id"]] = gt_id
            taken.add(gt_id)
    if twice:
        log.warning("%d images match a ground-truth image another image matched already; each GT image is "
                    "scored against its first match only (inputs that overlap, or the same file names in two folders)", twice)
    return matched, seen


def check_ground_truth(gt: Any, gt_path: str) -> None:
    """Raise ConfigError (one line) unless `gt` has the COCO shape evaluate relies on."""
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{gt_path} is not a COCO ground truth: {what}")

    if not isinstance(gt, dict):
        raise bad(f"expected an object with images, annotations and categories, found a JSON {type(gt).__name__}")
    images, anns, cats = gt.get("images"), gt.get("annotations", []), gt.get("categories")
    if not images:
        raise ConfigError(f"{gt_path} holds no images; expected a COCO ground-truth JSON")
    if not isinstance(images, list) or not all(isinstance(i, dict) and isinstance(i.get("id"), int) for i in images):
        raise bad("images must be a list of objects, each with an integer id (and a file_name)")
    if not isinstance(cats, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), int) for c in cats):
        raise bad("categories must be a list of objects, each with an integer id")
    if not isinstance(anns, list) or not all(isinstance(a, dict) for a in anns):
        raise bad("annotations must be a list of objects")
    panoptic = bool(anns) and "segments_info" in anns[0]
    needed = ("image_id", "file_name", "segments_info") if panoptic else ("image_id", "category_id", "bbox")
    for i, ann in enumerate(anns):
        missing = [k for k in needed if k not in ann]
        if missing:
            raise bad(f"annotations[{i}] has no {missing[0]}")


def evaluate(results: Results, gt_path: str, gt_panoptic_dir: str | None = None,
             storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics (percent) for every task present in both the results and the ground truth."""
    opts = storage_options or {}
    with fsspec.open(gt_path, "r", **opts) as f:
        gt = json.load(f)
    check_ground_truth(gt, gt_path)
    anns = gt.get("annotations") or []
    if not anns:
        raise ConfigError(f"{gt_path} holds no annotations: nothing to score against")
    ok = (r for r in results.rows(["image_uri", "error"]) if r["error"] is None)
    matched, annotated = match_images(ok, gt["images"])
    if not matched:
        raise ConfigError(
            f"the ground truth matches no image of the results ({annotated} images, {len(gt['images'])} in GT): "
            "compare its image ids or file_names with the image URIs"
        )
    metrics: dict[str, Any] = {"images": {"results": annotated, "ground_truth": len(gt["images"]), "matched": len(matched)}}
    if "segments_info" in anns[0]:
        folder = gt_panoptic_dir or os.path.splitext(gt_path)[0]
        metrics["panoptic"] = panoptic_quality(results, matched, gt, folder, opts)
        return metrics
    if any("keypoints" in c for c in gt["categories"]):  # a person_keypoints ground truth
        column, iou_types = "keypoints", ["keypoints"]
    else:
        column, iou_types = "instances", ["bbox"] + (["segm"] if any("segmentation" in a for a in anns) else [])
    detections, present = _detections(results, matched, column)
    if not present:
        raise _no_results_for(column, gt_path)
    for iou_type in iou_types:
        metrics[iou_type] = coco_metrics(gt, _for_iou_type(detections, iou_type), iou_type, sorted(set(matched.values())))
    return metrics


def _detections(results: Results, matched: dict[int, int], column: str) -> tuple[list[dict[str, Any]], bool]:
    """COCO result dicts of the matched images (GT image ids), and whether any matched row
    has the column at all."""
    keys = ("category_id", "bbox", "score", "segmentation", "keypoints")
    detections, present = [], False
    for row in results.rows(["error", column]):
        gt_id = matched.get(row["image_id"])
        if gt_id is None or row["error"] is not None or row.get(column) is None:
            continue
        present = True
        detections.extend({**{k: v for k, v in item.items() if k in keys}, "image_id": gt_id} for item in row[column])
    return detections, present


def _for_iou_type(detections: list[dict[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """segm results go without their box, as detectron2's COCOEvaluator passes them:
    pycocotools' loadRes then takes area (APs/APm/APl) from the mask, not from the box."""
    if iou_type != "segm":
        return detections
    return [{k: v for k, v in d.items() if k != "bbox"} for d in detections]


def coco_metrics(gt: dict[str, Any], detections: list[dict[str, Any]], iou_type: str, image_ids: list[int]) -> dict[str, float]:
    """COCOeval's 12 (keypoints: 10) summary figures, in percent, of `detections` (COCO result
    dicts) against the COCO dict `gt`, over `image_ids`; None where the GT has no such objects."""
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


def panoptic_quality(results: Results, matched: dict[int, int], gt: dict[str, Any], gt_dir: str,
                     storage_options: dict[str, Any]) -> dict[str, Any]:
    """PQ / SQ / RQ (percent) for All, Things and Stuff, by hotcoco, over the matched images
    with a panoptic result. `gt_dir` holds the GT PNGs (any fsspec URI; remote ones are
    copied image by image into a temporary folder)."""
    from hotcoco.panoptic import PanopticEval

    from batchseg.exports.coco import id_map_png

    gt_anns = {a["image_id"]: a for a in gt["annotations"]}
    known = {c["id"] for c in gt["categories"]}
    fs, gt_root = url_to_fs(gt_dir.rstrip("/"), **storage_options)
    local_gt = "file" in fs.protocol
    with tempfile.TemporaryDirectory(prefix="batchseg-pq-") as tmp:
        pred_dir, copy_dir = os.path.join(tmp, "pred"), os.path.join(tmp, "gt")
        os.makedirs(pred_dir)
        os.makedirs(copy_dir)
        predictions, scored = [], set()
        for row in results.rows(["error", "width", "height", "panoptic"]):
            gt_id = matched.get(row["image_id"])
            if gt_id is None or gt_id not in gt_anns or row["error"] is not None or row.get("panoptic") is None:
                continue
            scored.add(gt_id)
            for seg in row["panoptic"]:
                if seg["category_id"] not in known:
                    raise ConfigError(f"the panoptic ground truth has no category {seg['category_id']} (predicted in "
                                      f"{row['image_id']}): evaluate against a GT with the model's category ids")
            name = f"{gt_id}.png"
            with open(os.path.join(pred_dir, name), "wb") as f:
                f.write(id_map_png(decode_panoptic(row["panoptic"], row["height"], row["width"])))
            predictions.append({"image_id": gt_id, "file_name": name, "segments_info": [
                {"id": s["id"], "category_id": s["category_id"], "iscrowd": 0, "area": s["area"], "bbox": s["bbox"]}
                for s in row["panoptic"]]})
            if not local_gt:
                gt_name = gt_anns[gt_id]["file_name"]
                fs.get_file(f"{gt_root}/{gt_name}", os.path.join(copy_dir, gt_name))
        subset = {**gt, "images": [i for i in gt["images"] if i["id"] in scored],
                  "annotations": [gt_anns[i] for i in sorted(scored)]}
        if not predictions:
            raise _no_results_for("panoptic", "the panoptic ground truth")
        try:
            ev = PanopticEval(subset, {"annotations": predictions}, gt_folder=gt_root if local_gt else copy_dir,
                              pred_folder=pred_dir)
            with contextlib.redirect_stdout(io.StringIO()):
                ev.evaluate()
        except (ValueError, OSError) as e:
            raise ConfigError(f"panoptic evaluation against {gt_dir}: {e}") from None
        res = ev.results()
    return {name: _percent(res[name]) for name in ("All", "Things", "Stuff")}


def _no_results_for(column: str, gt: str) -> ConfigError:
    task = next(task for task, spec in TASK_TABLE.items() if spec.column == column)
    return ConfigError(f"no matched image has {column} results to score against {gt}; "
                       f"evaluate a run made with --tasks {task}")


def _percent(values: dict[str, Any]) -> dict[str, Any]:
    n = values["n"]
    return {key.upper(): round(100 * values[key], 3) if n else None for key in ("pq", "sq", "rq")} | {"categories": n}


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

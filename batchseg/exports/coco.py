"""COCO files from a results dataset, written as a stream (memory flat in the image count).

DEST gets, for each task the run had:
  instances.json, instances_results.json              dataset form and results form
  person_keypoints.json, person_keypoints_results.json with keypoint names and skeleton
  panoptic.json, panoptic/IMAGE_ID.png                 id = R + 256 G + 256^2 B per pixel
  densepose_results.json                               DensePose's compressed chart results
Only rows without an error become images; failed rows have no size and nothing to import.

The dataset form (instances.json) is what annotation tools import as labels, so it holds valid
annotations only: an instance whose mask is empty (a random or tiny box can give one) is left
out and counted as `skipped_empty`. The results form keeps every instance the model produced.
With `polygons=True` the dataset form's masks become COCO polygons (exports.polygons).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

import fsspec
import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from batchseg.rows.encoding import decode_iuv, decode_panoptic
from batchseg.exports.polygons import PolygonStats
from batchseg.store.results import Results
from batchseg.inputs.sources import split_member
from batchseg.rows.tasks import TASK_TABLE

COLUMN_FILES = {  # task column -> the files it produces
    "instances": ["instances.json", "instances_results.json"],
    "keypoints": ["person_keypoints.json", "person_keypoints_results.json"],
    "panoptic": ["panoptic.json", "panoptic/"],
    "densepose": ["densepose_results.json"],
}


def columns_present(results: Results) -> list[str]:
    """Task columns the run filled (from run.json, else from non-null data in the first file)."""
    tasks = results.run.get("config", {}).get("tasks")
    if tasks:
        return [TASK_TABLE[t].column for t in tasks]
    first = next(results.rows(list(COLUMN_FILES)), {})
    return [c for c in COLUMN_FILES if first.get(c) is not None]


def file_name(uri: str, roots: list[str]) -> str:
    """An image's name relative to the run's input roots (tar members as SHARD/member)."""
    parts = split_member(uri)
    if parts:
        return f"{file_name(parts[0], roots)}/{parts[1]}"
    for root in sorted(roots, key=len, reverse=True):
        prefix = root.rstrip("/") + "/"
        if uri.startswith(prefix):
            return uri[len(prefix):]
    return uri.rsplit("/", 1)[-1]


def input_roots(results: Results) -> list[str]:
    """The run's inputs as canonical URIs, the form image_uri takes."""
    from fsspec.core import url_to_fs

    roots = []
    for uri in results.run.get("config", {}).get("inputs", []):
        fs, path = url_to_fs(uri)
        roots.append(fs.unstrip_protocol(path))
    return roots


def image_entry(row: dict[str, Any], roots: list[str]) -> dict[str, Any]:
    return {
        "id": row["image_id"], "file_name": file_name(row["image_uri"], roots),
        "width": row["width"], "height": row["height"], "coco_url": row["image_uri"],
    }


def has_mask(item: dict[str, Any]) -> bool:
    """False for an instance (or DensePose person) whose mask is empty: no valid annotation
    (segm IoU 0 with anything, itself included). Reads `area` (the mask's pixel count) where
    the cell has one, else the RLE's area."""
    area = item.get("area")
    if area is None:
        seg = item["segmentation"]
        area = mask_util.area({"size": list(seg["size"]), "counts": seg["counts"].encode("ascii")})
    return bool(area)


def export_coco(results: Results, dest: str, storage_options: dict[str, Any] | None = None,
                only: set[str] | None = None, polygons: bool = False) -> dict[str, Any]:
    """Write the COCO files for every task column present (or just the file names in `only`).

    Returns {"files": {file name: items written}, "skipped_empty": instances with an empty mask
    left out of instances.json, "polygons": PolygonStats.summary() (only with `polygons`)}."""
    opts = storage_options or {}

    def want(name: str) -> bool:
        return only is None or name in only

    roots = input_roots(results)
    cats = results.categories
    written: dict[str, int] = {}

    def ok_rows(column: str) -> Iterator[dict[str, Any]]:
        for row in results.rows(["image_id", "image_uri", "width", "height", "error", column]):
            if row["error"] is None and row[column] is not None:
                yield row

    def images(column: str) -> Iterator[dict[str, Any]]:
        return (image_entry(r, roots) for r in ok_rows(column))

    def items(column: str, make: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for row in ok_rows(column):
            for item in row[column]:
                yield make(row, item)

    skipped_empty = 0
    stats = PolygonStats() if polygons else None

    def instance_annotations() -> Iterator[dict[str, Any]]:
        nonlocal skipped_empty
        for row in ok_rows("instances"):
            for inst in row["instances"]:
                if not has_mask(inst):
                    skipped_empty += 1
                    continue
                ann = _instance_annotation(row, inst)
                if stats is not None:
                    ann["segmentation"] = stats.convert(inst["segmentation"])
                yield ann

    present = columns_present(results)
    if "instances" in present:
        things = cats.get("instance", {}).get("things", [])
        if want("instances_results.json"):
            written["instances_results.json"] = _write_array(dest, "instances_results.json", opts,
                                                             items("instances", _instance_result))
        if want("instances.json"):
            written["instances.json"] = _write_dataset(dest, "instances.json", opts, things, images("instances"),
                                                       _numbered(instance_annotations()))
    if "keypoints" in present:
        kp = cats.get("keypoint", {})
        categories = [{**c, "supercategory": c["name"], "keypoints": kp.get("keypoint_names", []),
                       "skeleton": kp.get("skeleton", [])} for c in kp.get("things", [])]
        if want("person_keypoints_results.json"):
            written["person_keypoints_results.json"] = _write_array(dest, "person_keypoints_results.json", opts,
                                                                    items("keypoints", _keypoint_result))
        if want("person_keypoints.json"):
            written["person_keypoints.json"] = _write_dataset(dest, "person_keypoints.json", opts, categories,
                                                              images("keypoints"),
                                                              _numbered(items("keypoints", _keypoint_annotation)))
    if "panoptic" in present and want("panoptic.json"):
        pan = cats.get("panoptic", {})
        categories = ([{**c, "isthing": 1} for c in pan.get("things", [])]
                      + [{**c, "isthing": 0} for c in pan.get("stuff", [])])
        written["panoptic.json"] = _write_panoptic(dest, opts, categories, lambda: ok_rows("panoptic"), roots)
    if "densepose" in present and want("densepose_results.json"):
        written["densepose_results.json"] = _write_array(dest, "densepose_results.json", opts,
                                                         items("densepose", _densepose_result))
    summary: dict[str, Any] = {"files": written, "skipped_empty": skipped_empty}
    if stats is not None:
        summary["polygons"] = stats.summary()
    return summary


def _instance_result(row: dict[str, Any], inst: dict[str, Any]) -> dict[str, Any]:
    return {"image_id": row["image_id"], "category_id": inst["category_id"], "bbox": inst["bbox"],
            "score": inst["score"], "segmentation": inst["segmentation"]}


def _instance_annotation(row: dict[str, Any], inst: dict[str, Any]) -> dict[str, Any]:
    return {**_instance_result(row, inst), "area": inst["area"], "iscrowd": 0}


def _keypoint_result(row: dict[str, Any], person: dict[str, Any]) -> dict[str, Any]:
    return {"image_id": row["image_id"], "category_id": person["category_id"], "bbox": person["bbox"],
            "score": person["score"], "keypoints": person["keypoints"]}


def _keypoint_annotation(row: dict[str, Any], person: dict[str, Any]) -> dict[str, Any]:
    """Dataset form: v becomes COCO's visibility flag (2 = labelled and visible); an empty
    segmentation, as COCO person annotations without a mask have (datumaro warns otherwise)."""
    points = np.asarray(person["keypoints"], float).reshape(-1, 3)
    flags = np.column_stack([points[:, :2].round(2), np.full(len(points), 2)])
    x, y, w, h = person["bbox"]
    return {"image_id": row["image_id"], "category_id": person["category_id"], "bbox": person["bbox"],
            "score": person["score"], "keypoints": flags.reshape(-1).tolist(), "num_keypoints": len(points),
            "area": w * h, "iscrowd": 0, "segmentation": []}


def _densepose_result(row: dict[str, Any], person: dict[str, Any]) -> dict[str, Any]:
    iuv = decode_iuv(person["iuv_png"])
    return {"image_id": row["image_id"], "category_id": person["category_id"], "bbox": person["bbox"],
            "score": person["score"], "segmentation": person["segmentation"],
            "densepose": {"labels_uv_str": base64.encodebytes(person["iuv_png"]).decode(), "shape_chw": list(iuv.shape)}}


def _numbered(annotations: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for i, ann in enumerate(annotations, start=1):
        yield {"id": i, **ann}


def _write_array(dest: str, name: str, opts: dict[str, Any], items: Iterable[Any]) -> int:
    with fsspec.open(f"{dest.rstrip('/')}/{name}", "w", **opts) as f:
        return _dump_array(f, items)


def _dump_array(f: TextIO, items: Iterable[Any]) -> int:
    f.write("[")
    n = 0
    for n, item in enumerate(items, start=1):
        f.write(("," if n > 1 else "") + "\n" + json.dumps(item))
    f.write("\n]")
    return n


def _write_dataset(dest: str, name: str, opts: dict[str, Any], categories: list[dict[str, Any]],
                   images: Iterable[dict[str, Any]], annotations: Iterable[dict[str, Any]]) -> int:
    """{"info", "licenses", "categories", "images": [...], "annotations": [...]}, lists streamed
    in that order (each from its own pass over the Parquet files). Returns the annotation count."""
    head = {"info": {"description": "batchseg pre-labels"}, "licenses": [], "categories": categories}
    with fsspec.open(f"{dest.rstrip('/')}/{name}", "w", **opts) as f:
        f.write(json.dumps(head)[:-1])
        f.write(', "images": ')
        _dump_array(f, images)
        f.write(', "annotations": ')
        n = _dump_array(f, annotations)
        f.write("}\n")
    return n


def _write_panoptic(dest: str, opts: dict[str, Any], categories: list[dict[str, Any]],
                    rows: Callable[[], Iterable[dict[str, Any]]], roots: list[str]) -> int:
    """panoptic.json plus panoptic/IMAGE_ID.png for each image."""
    root = dest.rstrip("/")

    def annotations() -> Iterator[dict[str, Any]]:
        for row in rows():
            png_name = f"{row['image_id']}.png"
            with fsspec.open(f"{root}/panoptic/{png_name}", "wb", **opts) as png:
                png.write(id_map_png(decode_panoptic(row["panoptic"], row["height"], row["width"])))
            segments = [{"id": s["id"], "category_id": s["category_id"], "iscrowd": 0, "bbox": s["bbox"],
                         "area": s["area"]} for s in row["panoptic"]]
            yield {"image_id": row["image_id"], "file_name": png_name, "segments_info": segments}

    return _write_dataset(dest, "panoptic.json", opts, categories,
                          (image_entry(r, roots) for r in rows()), annotations())


def id_map_png(id_map: np.ndarray) -> bytes:
    """(H, W) segment ids -> COCO panoptic PNG bytes, id = R + 256 G + 256^2 B."""
    rgb = np.stack([id_map % 256, id_map // 256 % 256, id_map // 256**2], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()

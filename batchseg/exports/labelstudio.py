"""Label Studio tasks with predictions (pre-annotations), split into files of bounded size.

DEST gets tasks-00000.json, tasks-00001.json, ... (at most `tasks_per_file` tasks each: one
huge import fails in Label Studio) and labeling_config.xml whose tag names match the regions:
  instances -> "box" rectanglelabels (percent of the image) and "mask" brushlabels (Label
               Studio's brush RLE, encoded by label-studio-sdk's own converter)
  panoptic  -> "panoptic" brushlabels, one per segment, things and stuff
  keypoints -> "keypoints" keypointlabels, one point per keypoint, named as in COCO
DensePose charts have no Label Studio region type and are not exported here.
Image references stay as they are (s3://, https://), or are rewritten by `url_map` prefixes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from xml.sax.saxutils import quoteattr

import fsspec
import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from batchseg.encoding import decode_mask
from batchseg.results import Results

COLUMNS = ["image_id", "image_uri", "width", "height", "error", "instances", "panoptic", "keypoints"]


def export_labelstudio(results: Results, dest: str, storage_options: dict[str, Any] | None = None,
                       model_version: str | None = None, tasks_per_file: int = 1000,
                       url_map: list[tuple[str, str]] | None = None) -> dict[str, int]:
    opts = storage_options or {}
    names = _names(results.categories)
    version = model_version or _model_version(results.run)
    written: dict[str, int] = {}
    chunk: list[dict[str, Any]] = []
    for task in _tasks(results, names, version, url_map or []):
        chunk.append(task)
        if len(chunk) == tasks_per_file:
            written.update(_flush(dest, len(written), chunk, opts))
            chunk = []
    if chunk or not written:
        written.update(_flush(dest, len(written), chunk, opts))
    with fsspec.open(f"{dest.rstrip('/')}/labeling_config.xml", "w", **opts) as f:
        f.write(labeling_config(results.categories))
    written["labeling_config.xml"] = 1
    return written


def _flush(dest: str, index: int, tasks: list[dict[str, Any]], opts: dict[str, Any]) -> dict[str, int]:
    name = f"tasks-{index:05d}.json"
    with fsspec.open(f"{dest.rstrip('/')}/{name}", "w", **opts) as f:
        json.dump(tasks, f)
    return {name: len(tasks)}


def _tasks(results: Results, names: dict[str, dict[int, str]], version: str,
           url_map: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    for row in results.rows(COLUMNS):
        if row["error"] is not None:
            continue
        regions = [*_instance_regions(row, names["things"]), *_panoptic_regions(row, names["panoptic"]),
                   *_keypoint_regions(row, names["keypoint_names"])]
        scores = [r["score"] for r in regions if "score" in r]
        yield {
            "data": {"image": _url(row["image_uri"], url_map), "image_id": row["image_id"]},
            "predictions": [{
                "model_version": version,
                "score": float(np.mean(scores)) if scores else 0.0,
                "result": regions,
            }],
        }


def _region(row: dict[str, Any], rid: str, kind: str, from_name: str, value: dict[str, Any], score: float | None):
    region = {"id": rid, "type": kind, "from_name": from_name, "to_name": "image",
              "original_width": row["width"], "original_height": row["height"], "image_rotation": 0, "value": value}
    if score is not None:
        region["score"] = score
    return region


def _instance_regions(row: dict[str, Any], things: dict[int, str]) -> Iterator[dict[str, Any]]:
    w, h = row["width"], row["height"]
    for i, inst in enumerate(row.get("instances") or []):
        label = [things.get(inst["category_id"], str(inst["category_id"]))]
        x, y, bw, bh = inst["bbox"]
        yield _region(row, f"i{i}", "rectanglelabels", "box", {
            "x": 100 * x / w, "y": 100 * y / h, "width": 100 * bw / w, "height": 100 * bh / h,
            "rotation": 0, "rectanglelabels": label}, inst["score"])
        yield _region(row, f"i{i}m", "brushlabels", "mask", {
            "format": "rle", "rle": brush_rle(decode_mask(inst["segmentation"])), "brushlabels": label}, inst["score"])


def _panoptic_regions(row: dict[str, Any], labels: dict[int, str]) -> Iterator[dict[str, Any]]:
    for seg in row.get("panoptic") or []:
        yield _region(row, f"p{seg['id']}", "brushlabels", "panoptic", {
            "format": "rle", "rle": brush_rle(decode_mask(seg["segmentation"])),
            "brushlabels": [labels.get(seg["category_id"], str(seg["category_id"]))]}, seg["score"])


def _keypoint_regions(row: dict[str, Any], keypoint_names: list[str]) -> Iterator[dict[str, Any]]:
    w, h = row["width"], row["height"]
    for i, person in enumerate(row.get("keypoints") or []):
        points = np.asarray(person["keypoints"], float).reshape(-1, 3)
        for k, (x, y, score) in enumerate(points):
            name = keypoint_names[k] if k < len(keypoint_names) else str(k)
            # stored in COCO's pixel-index convention; Label Studio wants continuous percent
            yield _region(row, f"k{i}_{k}", "keypointlabels", "keypoints", {
                "x": 100 * (x + 0.5) / w, "y": 100 * (y + 0.5) / h, "width": 0.5,
                "keypointlabels": [name]}, float(score))


def brush_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool -> Label Studio brush RLE, by label-studio-sdk's converter."""
    return mask2rle(mask.astype(np.uint8) * 255)


def _url(uri: str, url_map: list[tuple[str, str]]) -> str:
    for prefix, url in url_map:
        if uri.startswith(prefix):
            return url + uri[len(prefix):]
    return uri


def _names(categories: dict[str, Any]) -> dict[str, Any]:
    things = {c["id"]: c["name"] for table in categories.values() for c in table.get("things", [])}
    panoptic = {c["id"]: c["name"] for key in ("things", "stuff") for c in categories.get("panoptic", {}).get(key, [])}
    return {"things": things, "panoptic": panoptic,
            "keypoint_names": categories.get("keypoint", {}).get("keypoint_names", [])}


def _model_version(run: dict[str, Any]) -> str:
    models = run.get("config", {}).get("models", {})
    tasks = run.get("config", {}).get("tasks", list(models))
    parts = [f"{t}={models[t].get('model') or models[t].get('backend')}" for t in tasks if t in models]
    return f"batchseg-{run.get('versions', {}).get('batchseg', '?')} " + " ".join(parts)


def labeling_config(categories: dict[str, Any]) -> str:
    """A labeling config whose tag names and labels match the exported regions."""
    names = _names(categories)
    lines = ["<View>", '  <Image name="image" value="$image" zoom="true"/>']

    def block(tag: str, name: str, labels: list[str]) -> None:
        if labels:
            lines.append(f'  <{tag} name="{name}" toName="image">')
            lines.extend(f"    <Label value={quoteattr(label)}/>" for label in labels)
            lines.append(f"  </{tag}>")

    if "instance" in categories:
        labels = [c["name"] for c in categories["instance"].get("things", [])]
        block("RectangleLabels", "box", labels)
        block("BrushLabels", "mask", labels)
    block("BrushLabels", "panoptic", sorted(set(names["panoptic"].values())))
    block("KeyPointLabels", "keypoints", names["keypoint_names"])
    lines.append("</View>")
    return "\n".join(lines) + "\n"

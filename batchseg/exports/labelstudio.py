"""Label Studio tasks with predictions (pre-annotations): files here, a live server in
labelstudio_push.

`export_labelstudio` writes DEST/tasks-00000.json, tasks-00001.json, ... (at most
`tasks_per_file` tasks each: one huge import fails in Label Studio) and labeling_config.xml
whose tag names match the regions:
  instances -> "box" rectanglelabels (percent of the image) and "mask" brushlabels (Label
               Studio's brush RLE, encoded by label-studio-sdk's own converter)
  panoptic  -> "panoptic" brushlabels, one per segment, things and stuff
  keypoints -> "keypoints" keypointlabels, one point per keypoint, named as in COCO
DensePose charts have no Label Studio region type and are not exported here.

A task's data: `image` (the URI as it is -- s3:// stays s3:// so a connected S3 storage
resolves it -- or rewritten by `url_map` prefixes), `image_id` (the row's stable id: the key
that `batchseg push labelstudio` finds the task by), `batchseg_run` (the run that annotated
it) and `review_priority` (0..1, higher = look first; null for rows of older runs).
The prediction's `model_version` is the run's provenance label
(`batchseg.run.provenance.model_version`, e.g. `batchseg-0.1.0 instance=mask_rcnn_R_50_FPN_3x@1a2b3c4d`)
and its `score` is 1 - review_priority, so Label Studio's uncertainty sampling (lowest score
first) serves the same images first as batchseg's review order.
Instances and segments whose mask is empty are left out (Label Studio cannot show or export
them) and counted as `skipped_empty`; error rows make no task (`failed_images`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
from fsspec.core import url_to_fs
from label_studio_sdk.converter.brush import mask2rle

from batchseg.rows.encoding import decode_mask
from batchseg.run.provenance import model_version as provenance_label
from batchseg.store.results import Results
from batchseg.store.storage import write_text

COLUMNS = ["image_uri", "width", "height", "error", "review_priority", "instances", "panoptic", "keypoints"]


@dataclass
class TaskStats:
    """What the tasks hold and what was left out of them."""

    tasks: int = 0
    regions: int = 0
    failed_images: int = 0  # error rows: no task
    skipped_empty: int = 0  # instances / panoptic segments left out: their mask has no pixel

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class TaskMaker:
    """Result rows -> Label Studio task dicts (None for error rows), counting into `stats`."""

    def __init__(self, results: Results, model_version: str | None = None,
                 url_map: list[tuple[str, str]] | None = None) -> None:
        self.results = results
        self.names = _names(results.categories)
        self.fixed_version = model_version
        self.url_map = url_map or []
        self.stats = TaskStats()
        self._versions: dict[str, str] = {}

    def model_version(self, run: str) -> str:
        """The provenance label of `run` (its runs/RUN_ID.json; run.json for rows outside a run partition)."""
        if self.fixed_version:
            return self.fixed_version
        if run not in self._versions:
            info = self.results.run_info(run) if run else {}
            self._versions[run] = provenance_label(info or {**self.results.run, "run_id": run or "?"})
        return self._versions[run]

    def __call__(self, row: dict[str, Any]) -> dict[str, Any] | None:
        if row["error"] is not None:
            self.stats.failed_images += 1
            return None
        regions = [*self._instance_regions(row), *self._panoptic_regions(row), *_keypoint_regions(row, self.names["keypoint_names"])]
        priority = row.get("review_priority")
        scores = [r["score"] for r in regions if "score" in r]
        if priority is not None:
            score = 1.0 - float(priority)
        else:  # older runs: the mean region score, as Label Studio's examples do
            score = float(np.mean(scores)) if scores else 0.0
        run = row.get("run", "")
        self.stats.tasks += 1
        self.stats.regions += len(regions)
        return {
            "data": {"image": map_url(row["image_uri"], self.url_map), "image_id": row["image_id"],
                     "batchseg_run": run, "review_priority": priority},
            "predictions": [{"model_version": self.model_version(run), "score": score, "result": regions}],
        }

    def _instance_regions(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        w, h = row["width"], row["height"]
        things = self.names["things"]
        for i, inst in enumerate(row.get("instances") or []):
            mask = decode_mask(inst["segmentation"])
            if not mask.any():
                self.stats.skipped_empty += 1  # box and mask both left out: the instance is not there
                continue
            label = [things.get(inst["category_id"], str(inst["category_id"]))]
            x, y, bw, bh = inst["bbox"]
            yield _region(row, f"i{i}", "rectanglelabels", "box", {
                "x": 100 * x / w, "y": 100 * y / h, "width": 100 * bw / w, "height": 100 * bh / h,
                "rotation": 0, "rectanglelabels": label}, inst["score"])
            yield _region(row, f"i{i}m", "brushlabels", "mask", {
                "format": "rle", "rle": brush_rle(mask), "brushlabels": label}, inst["score"])

    def _panoptic_regions(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        labels = self.names["panoptic"]
        for seg in row.get("panoptic") or []:
            mask = decode_mask(seg["segmentation"])
            if not mask.any():
                self.stats.skipped_empty += 1
                continue
            yield _region(row, f"p{seg['id']}", "brushlabels", "panoptic", {
                "format": "rle", "rle": brush_rle(mask),
                "brushlabels": [labels.get(seg["category_id"], str(seg["category_id"]))]}, seg["score"])


def export_labelstudio(results: Results, dest: str, storage_options: dict[str, Any] | None = None,
                       model_version: str | None = None, tasks_per_file: int = 1000,
                       url_map: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Write the task files and labeling_config.xml. Returns {"files": {file name: tasks in it},
    "tasks", "regions", "failed_images", "skipped_empty"}."""
    opts = storage_options or {}
    make = TaskMaker(results, model_version, url_map)
    written: dict[str, int] = {}
    chunk: list[dict[str, Any]] = []
    for row in results.rows(COLUMNS):
        task = make(row)
        if task is None:
            continue
        chunk.append(task)
        if len(chunk) == tasks_per_file:
            written.update(_flush(dest, len(written), chunk, opts))
            chunk = []
    if chunk or not written:
        written.update(_flush(dest, len(written), chunk, opts))
    write_text(f"{dest.rstrip('/')}/labeling_config.xml", labeling_config(results.categories), opts)
    fs, folder = url_to_fs(dest.rstrip("/"), **opts)
    for stale in fs.glob(f"{folder}/tasks-*.json"):  # an earlier, larger export's files: importing them would double tasks
        if stale.rsplit("/", 1)[-1] not in written:
            fs.rm(stale)
    written["labeling_config.xml"] = 1
    return {"files": written, **make.stats.as_dict()}


def _flush(dest: str, index: int, tasks: list[dict[str, Any]], opts: dict[str, Any]) -> dict[str, int]:
    name = f"tasks-{index:05d}.json"
    write_text(f"{dest.rstrip('/')}/{name}", json.dumps(tasks), opts)
    return {name: len(tasks)}


def _region(row: dict[str, Any], rid: str, kind: str, from_name: str, value: dict[str, Any], score: float | None):
    region = {"id": rid, "type": kind, "from_name": from_name, "to_name": "image",
              "original_width": row["width"], "original_height": row["height"], "image_rotation": 0, "value": value}
    if score is not None:
        region["score"] = score
    return region


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


def map_url(uri: str, url_map: list[tuple[str, str]]) -> str:
    """`uri` with the first matching prefix of `url_map` replaced (unchanged if none matches)."""
    for prefix, url in url_map:
        if uri.startswith(prefix):
            return url + uri[len(prefix):]
    return uri


def _names(categories: dict[str, Any]) -> dict[str, Any]:
    things = {c["id"]: c["name"] for table in categories.values() for c in table.get("things", [])}
    panoptic = {c["id"]: c["name"] for key in ("things", "stuff") for c in categories.get("panoptic", {}).get(key, [])}
    return {"things": things, "panoptic": panoptic,
            "keypoint_names": categories.get("keypoint", {}).get("keypoint_names", [])}


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

"""A FiftyOne dataset on disk, imported with one call; written without fiftyone installed.

DEST gets FiftyOne's portable JSON layout (`fo.types.LegacyFiftyOneDataset`, which
`fo.types.FiftyOneDataset` also reads: its metadata.json has no "version"):

  samples.json                 {"samples": [...]}, one sample per annotated image, streamed
  fields/panoptic/ID.png       per-pixel category ids of the panoptic result (uint8, or 16-bit)
  metadata.json                mask_targets, keypoint skeleton, and info.batchseg: each run's
                               provenance (written last)

    import fiftyone as fo
    dataset = fo.Dataset.from_dir("DEST", dataset_type=fo.types.FiftyOneDataset,
                                  name="prelabels", dynamic=True)

Samples are serialized as `fo.Sample.from_dict` reads them (MongoDB extended JSON for
arrays). Fields, present where the run had the task:

  image_id, image_uri, run, review_priority      per sample (and source, exported --reviews)
  instances         Detections: label, bounding_box, mask, confidence
  panoptic          Segmentation (mask_path): category id per pixel, 0 = void
  panoptic_things   Detections: the thing segments with their masks
  keypoints         Keypoints: points (x / width, y / height, as FiftyOne's COCO importer
                    reads COCO keypoints), confidence per point; `score` per person
  densepose         Detections: the person boxes with DensePose's foreground mask

Every label carries `model_version` (batchseg.run.provenance.model_version) and
`weights_sha256` of the run that produced it (`dynamic=True` declares them for filtering).
Exported with reviews (`export fiftyone --reviews`), a sample also has `source`: "human" for an
image's newest review (its labels have no model_version), "model" otherwise.

Masks follow FiftyOne's instance-mask convention: a 2-D array covering the label's
bounding box, which FiftyOne maps to pixels as int(W * x) .. int(W * (x + w)). The box
written is the pixel box holding both the model's box and the whole mask (at most one pixel
larger than the model's box), with coordinates chosen so that FiftyOne's int() gives exactly
those pixels back: `Detection.to_segmentation()` reproduces the Parquet mask bit for bit.
Instances with an empty mask are left out (counted as `skipped_empty`).

Images: local files keep their absolute path; a tar member becomes SHARD_PATH/MEMBER (open
source FiftyOne cannot read inside tars); `url_map` prefixes rewrite URIs first (e.g. an
s3:// prefix to the local folder where the bucket is mounted). Samples whose image FiftyOne
cannot open from a local path (remote URIs, tar members) are counted as `not_local`: their
labels import all the same.
"""

from __future__ import annotations

import base64
import io
import json
import math
import zlib
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from batchseg.rows.encoding import decode_mask, decode_panoptic
from batchseg.exports.coco import columns_present, has_mask
from batchseg.run.provenance import model_version
from batchseg.store.results import Results
from batchseg.inputs.sources import image_path, split_member

COLUMN_TASK = {"instances": "instance", "panoptic": "panoptic", "keypoints": "keypoint", "densepose": "densepose"}


def export_fiftyone(results: Results, dest: str, storage_options: dict[str, Any] | None = None,
                    url_map: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Write DEST/samples.json, DEST/fields/panoptic/*.png and DEST/metadata.json.

    Returns {"files": {"samples.json": samples}, "labels": {field: count}, "skipped_empty": n,
    "not_local": samples whose image FiftyOne cannot open locally (remote URI, tar member)}."""
    opts = storage_options or {}
    root = dest.rstrip("/")
    columns = columns_present(results)
    cats = results.categories
    writer = _SampleWriter(results, root, opts, columns, url_map or [])
    with fsspec.open(f"{root}/samples.json", "w", **opts) as f:
        f.write('{"samples": [')
        for n, sample in enumerate(writer.samples()):
            f.write(("," if n else "") + "\n" + json.dumps(sample))
        f.write("\n]}\n")
    info: dict[str, Any] = {"batchseg": {"runs": {run: results.run_info(run).get("provenance", {})
                                                  for run in sorted(writer.runs)}}}
    if "panoptic" in columns:
        pan = cats.get("panoptic", {})
        info["mask_targets"] = {"panoptic": {str(c["id"]): c["name"] for key in ("things", "stuff")
                                             for c in pan.get(key, [])}}
    if "keypoints" in columns:
        kp = cats.get("keypoint", {})
        info["skeletons"] = {"keypoints": {"labels": kp.get("keypoint_names", []),
                                           "edges": [[a - 1, b - 1] for a, b in kp.get("skeleton", [])]}}
    with fsspec.open(f"{root}/metadata.json", "w", **opts) as f:
        json.dump({"info": info}, f)
    return {"files": {"samples.json": writer.count}, "labels": writer.labels,
            "skipped_empty": writer.skipped_empty, "not_local": writer.not_local}


class _SampleWriter:
    """Rows -> sample dicts, one at a time; counts what it wrote and skipped."""

    def __init__(self, results: Results, root: str, opts: dict[str, Any], columns: list[str],
                 url_map: list[tuple[str, str]]) -> None:
        self.results, self.root, self.opts, self.columns, self.url_map = results, root, opts, columns, url_map
        cats = results.categories
        self.names = {task: {c["id"]: c["name"] for key in ("things", "stuff") for c in cats.get(task, {}).get(key, [])}
                      for task in COLUMN_TASK.values()}
        self.count = self.skipped_empty = self.not_local = 0
        self.labels: dict[str, int] = {}
        self.runs: set[str] = set()
        self._provenance: dict[tuple[str, str], dict[str, Any]] = {}

    def samples(self) -> Iterator[dict[str, Any]]:
        wanted = ["image_id", "image_uri", "width", "height", "error", "review_priority", *self.columns]
        for row in self.results.rows(wanted):
            if row["error"] is not None:
                continue
            self.count += 1
            self.runs.add(row["run"])
            filepath = self._filepath(row["image_uri"])
            sample = {"filepath": filepath, "tags": [],
                      "metadata": {"_cls": "ImageMetadata", "width": row["width"], "height": row["height"]},
                      "image_id": row["image_id"], "image_uri": row["image_uri"], "run": row["run"],
                      "review_priority": row.get("review_priority")}
            if "source" in row:  # the merged view (export --reviews): "human" or "model"
                sample["source"] = row["source"]
            for column in self.columns:
                if row.get(column) is not None:
                    sample.update(getattr(self, f"_{column}")(row))
            yield sample

    def _filepath(self, uri: str) -> str:
        for prefix, replacement in self.url_map:
            if uri.startswith(prefix):
                uri = replacement + uri[len(prefix):]
                break
        member = split_member(uri) is not None
        uri = image_path(uri)  # a tar member as SHARD/MEMBER
        uri = uri.removeprefix("file://")
        if member or not uri.startswith("/"):
            self.not_local += 1
        return uri

    def _label_fields(self, row: dict[str, Any], task: str) -> dict[str, Any]:
        """Provenance attributes of every label of `task` in this row's run."""
        key = (row["run"], task)
        if key not in self._provenance:
            info = self.results.run_info(row["run"])
            record = ((info.get("provenance") or {}).get("tasks") or {}).get(task) or {}
            self._provenance[key] = {"model_version": model_version(info, task) if info else None,
                                     "weights_sha256": record.get("weights_sha256")}
        return self._provenance[key]

    def _detections(self, row: dict[str, Any], task: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        detections = []
        for item in items:
            if not has_mask(item):
                self.skipped_empty += 1
                continue
            box, mask = box_and_mask(item["bbox"], item["segmentation"], row["width"], row["height"])
            detections.append({"_cls": "Detection", "label": self.names[task].get(item["category_id"], str(item["category_id"])),
                               "bounding_box": box, "mask": _ndarray(mask), "confidence": item.get("score"),
                               **self._label_fields(row, task)})
        return {"_cls": "Detections", "detections": detections}

    def _count(self, field: str, n: int) -> None:
        self.labels[field] = self.labels.get(field, 0) + n

    def _instances(self, row: dict[str, Any]) -> dict[str, Any]:
        field = self._detections(row, "instance", row["instances"])
        self._count("instances", len(field["detections"]))
        return {"instances": field}

    def _densepose(self, row: dict[str, Any]) -> dict[str, Any]:
        field = self._detections(row, "densepose", row["densepose"])
        self._count("densepose", len(field["detections"]))
        return {"densepose": field}

    def _panoptic(self, row: dict[str, Any]) -> dict[str, Any]:
        segments = row["panoptic"]
        ids = decode_panoptic(segments, row["height"], row["width"])
        lut = np.zeros(max([s["id"] for s in segments], default=0) + 1, np.int64)
        for s in segments:
            lut[s["id"]] = s["category_id"]
        name = f"fields/panoptic/{row['image_id']}.png"
        with fsspec.open(f"{self.root}/{name}", "wb", **self.opts) as f:
            f.write(category_png(lut[ids]))
        things = self._detections(row, "panoptic", [s for s in segments if s["isthing"]])
        self._count("panoptic", 1)
        self._count("panoptic_things", len(things["detections"]))
        return {"panoptic": {"_cls": "Segmentation", "mask_path": name, **self._label_fields(row, "panoptic")},
                "panoptic_things": things}

    def _keypoints(self, row: dict[str, Any]) -> dict[str, Any]:
        w, h = row["width"], row["height"]
        people = []
        for person in row["keypoints"]:
            points = np.asarray(person["keypoints"], float).reshape(-1, 3)
            people.append({"_cls": "Keypoint", "label": self.names["keypoint"].get(person["category_id"], "person"),
                           "points": [[x / w, y / h] for x, y in points[:, :2].tolist()],
                           "confidence": points[:, 2].tolist(), "score": person["score"],
                           **self._label_fields(row, "keypoint")})
        self._count("keypoints", len(people))
        return {"keypoints": {"_cls": "Keypoints", "keypoints": people}}


def box_and_mask(bbox: list[float], segmentation: dict[str, Any], width: int, height: int) -> tuple[list[float], np.ndarray]:
    """Model box [x, y, w, h] (pixels) + full-image RLE -> FiftyOne's relative
    [x, y, w, h] and the (rows, cols) bool mask inside it.

    The box is the pixel box holding the model's box and every mask pixel, clipped to the
    image; each coordinate is nudged up by a few ulps where needed so that FiftyOne's
    int(W * x) lands on the intended pixel edge."""
    rle = {"size": list(segmentation["size"]), "counts": segmentation["counts"].encode("ascii")}
    mx, my, mw, mh = mask_util.toBbox(rle).tolist()
    bx, by, bw, bh = bbox
    x0, y0 = max(0, math.floor(min(bx, mx))), max(0, math.floor(min(by, my)))
    x1, y1 = min(width, math.ceil(max(bx + bw, mx + mw))), min(height, math.ceil(max(by + bh, my + mh)))
    rx, ry = _edge(x0, width), _edge(y0, height)
    rw, rh = _extent(rx, x1, width), _extent(ry, y1, height)
    return [rx, ry, rw, rh], decode_mask(segmentation)[y0:y1, x0:x1]


def _edge(pixel: int, size: int) -> float:
    """The smallest float r near pixel / size with int(size * r) == pixel."""
    r = pixel / size
    while int(size * r) < pixel:
        r = float(np.nextafter(r, 2.0))
    return r


def _extent(start: float, end_pixel: int, size: int) -> float:
    """A relative extent e with int(size * (start + e)) == end_pixel."""
    e = end_pixel / size - start
    while int(size * (start + e)) < end_pixel:
        e = float(np.nextafter(e, 2.0))
    return e


def _ndarray(array: np.ndarray) -> dict[str, Any]:
    """A numpy array as FiftyOne stores one: np.save bytes, zlib-compressed, as extended-JSON
    binary (fiftyone.core.utils.serialize_numpy_array)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return {"$binary": {"base64": base64.b64encode(zlib.compress(buf.getvalue())).decode("ascii"), "subType": "00"}}


def category_png(categories: np.ndarray) -> bytes:
    """(H, W) category ids -> grayscale PNG bytes: 8-bit when every id fits, else 16-bit."""
    if categories.max(initial=0) <= 255:
        image = Image.fromarray(categories.astype(np.uint8))
    else:
        image = Image.fromarray(categories.astype(np.uint16))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()

"""Pull a COCO dataset export (CVAT's "COCO 1.0", or any tool's) into the lake as reviews:
`batchseg pull coco FILE... OUTPUT`.

Each FILE is a COCO JSON, or a zip holding them (CVAT: annotations/instances_default.json in
the "COCO 1.0" archive, person_keypoints_default.json in the "COCO Keypoints 1.0" one); every
JSON with `images` is read, whole (a COCO file is one JSON document), and the files make one
pull, their images merged by file name. Each image becomes one review row of its annotations:
  segmentation  RLE (compressed or not) or polygons -> COCO RLE (pycocotools); an annotation with
                neither is its box rasterised
  keypoints     [x, y, v] triples in the order of the runs' keypoint names (the file's
                category `keypoints` names them), v as written
  category      by name -> the runs' category id; a name outside their table stops the pull
                (exit 2) before anything is published
Images are matched to the lake's by file name: ROOT/file_name with --images-root, the
--url-map pairs turned back (URL -> PREFIX), else the longest path ending of an image URI the
runs hold ("a/b.jpg" matches ".../a/b.jpg"; one pass over the runs' image_uri column).
Unmatched images are skipped and counted. COCO files carry no time and no annotator:
`reviewed_at` is the pull's time, `annotator` what --annotator says.
"""

from __future__ import annotations

import io
import json
import zipfile
from datetime import datetime, timezone
from typing import Any

import fsspec
import numpy as np
import pycocotools.mask as mask_utils

from batchseg.config import ConfigError
from batchseg.exports.labelstudio_pull import Labels, rle_for_coco, unmap_url
from batchseg.inputs.sources import image_path
from batchseg.rows.schema import image_id as image_id_of
from batchseg.store.results import open_results
from batchseg.store.reviews import PullWriter

TOOL = "coco"


def pull_coco(files: list[str], output: str, images_root: str | None = None, url_map: list[tuple[str, str]] | None = None,
              annotator: str | None = None, storage_options: dict[str, Any] | None = None,
              file_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the images of `files` as one pull of OUTPUT's reviews; returns the receipt."""
    results = open_results(output, storage_options)
    labels = Labels(results.categories)
    images, annotations, categories = read_coco(files, file_options or {})
    names = {c["id"]: c["name"] for c in categories}
    keypoint_names = {c["id"]: c.get("keypoints") or [] for c in categories}
    uris = match_uris(images, results, images_root, url_map or [])
    now = datetime.now(timezone.utc)
    writer = PullWriter(output, storage_options)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in annotations:
        by_image.setdefault(ann["image_id"], []).append(ann)
    counts = {"images": len(images), "unmatched": 0, "annotations": len(annotations)}
    for img in images:
        uri = uris.get(img["id"])
        if uri is None:
            counts["unmatched"] += 1
            continue
        h, w = int(img["height"]), int(img["width"])
        instances, people = [], []
        for ann in by_image.get(img["id"], []):
            name = names.get(ann["category_id"], str(ann["category_id"]))
            if ann.get("keypoints"):
                people.append(_person(ann, keypoint_names.get(ann["category_id"]) or labels.keypoint_names, labels))
                if not ann.get("segmentation"):
                    continue  # a skeleton: its box is the person's, not an instance
            rle = _rle(ann, h, w)
            area = int(mask_utils.area(rle))
            if area:
                instances.append({"category_id": labels.category(name, f"COCO image {img['file_name']!r}"),
                                  "bbox": [float(v) for v in mask_utils.toBbox(rle)], "score": 1.0, "area": area,
                                  "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}})
        writer.add({"image_id": image_id_of(uri), "image_uri": uri, "width": w, "height": h, "instances": instances,
                    "keypoints": people, "source": "human", "annotator": annotator, "reviewed_at": now,
                    "lead_time_s": None, "tool": TOOL, "ls_project": None, "ls_task": None, "ls_annotation": None,
                    "run": None, "model_version": None})
    return writer.publish({"tool": TOOL, "source": {"files": files}, "counts": counts, "categories": results.categories})


def read_coco(files: list[str], storage_options: dict[str, Any]) -> tuple[list[dict], list[dict], list[dict]]:
    """(images, annotations, categories) of COCO JSONs and of every COCO JSON in zips (images
    of several files are one image when their file names agree)."""
    docs = []
    for file in files:
        with fsspec.open(file, "rb", **storage_options) as f:
            data = f.read()
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                found = [json.loads(z.read(n)) for n in sorted(z.namelist()) if n.endswith(".json")]
        else:
            try:
                found = [json.loads(data)]
            except ValueError as e:
                raise ConfigError(f"{file} is neither a COCO JSON nor a zip of one ({e})") from None
        found = [d for d in found if isinstance(d, dict) and "images" in d]
        if not found:
            raise ConfigError(f"{file} holds no COCO dataset (no JSON with images); give CVAT's COCO 1.0 export or a "
                              "COCO JSON")
        docs += found
    images: dict[str, dict] = {}
    annotations, categories = [], []
    for doc in docs:
        own = {}  # this file's image ids -> the merged image's id
        for img in doc["images"]:
            merged = images.setdefault(img["file_name"], {**img, "id": len(images) + 1})
            own[img["id"]] = merged["id"]
        cats = {c["id"]: c for c in doc.get("categories", [])}
        for ann in doc.get("annotations", []):
            cat = cats.get(ann["category_id"], {"name": str(ann["category_id"])})
            annotations.append({**ann, "image_id": own[ann["image_id"]], "category_id": _category(categories, cat)})
    return list(images.values()), annotations, categories


def _category(categories: list[dict], cat: dict) -> int:
    """The id of `cat` (by name, keypoint names kept) in the merged `categories`."""
    for c in categories:
        if c["name"] == cat["name"]:
            c["keypoints"] = c.get("keypoints") or cat.get("keypoints") or []
            return c["id"]
    categories.append({"id": len(categories) + 1, "name": cat["name"], "keypoints": cat.get("keypoints") or []})
    return len(categories)


def match_uris(images: list[dict], results, images_root: str | None, url_map: list[tuple[str, str]]) -> dict[int, str]:
    """COCO image id -> the lake URI of its image (unmatched images left out)."""
    if images_root:
        root = images_root.rstrip("/")
        return {img["id"]: f"{root}/{img['file_name'].lstrip('./')}" for img in images}
    matched = {}
    for img in images:
        uri = unmap_url(img["file_name"], url_map)
        if uri != img["file_name"]:
            matched[img["id"]] = uri
    by_name = {img["file_name"].lstrip("./"): img["id"] for img in images if img["id"] not in matched}
    if by_name:
        for row in results.rows(["image_uri", "error"]):
            parts = image_path(row["image_uri"]).split("://", 1)[-1].split("/")
            coco_id = next((by_name[n] for n in ("/".join(parts[i:]) for i in range(len(parts))) if n in by_name), None)
            if coco_id is not None and coco_id not in matched:
                matched[coco_id] = row["image_uri"]
    return matched


def _rle(ann: dict[str, Any], h: int, w: int) -> dict[str, Any]:
    seg = ann.get("segmentation")
    if isinstance(seg, dict):  # RLE: counts as a list (uncompressed) or a string
        return mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else rle_for_coco(seg)
    if seg:
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    x, y, bw, bh = ann["bbox"]
    return mask_utils.merge(mask_utils.frPyObjects([[x, y, x + bw, y, x + bw, y + bh, x, y + bh]], h, w))


def _person(ann: dict[str, Any], names: list[str], labels: Labels) -> dict[str, Any]:
    points = np.asarray(ann.get("keypoints") or [], float).reshape(-1, 3)
    order = {n: i for i, n in enumerate(names)}
    flat = np.zeros((len(labels.keypoint_names), 3))
    for k, name in enumerate(labels.keypoint_names):
        if name in order and order[name] < len(points):
            flat[k] = points[order[name]]
        elif not names and k < len(points):
            flat[k] = points[k]
    return {"category_id": labels.person_id, "bbox": [float(v) for v in ann.get("bbox") or [0, 0, 0, 0]], "score": 1.0,
            "keypoints": flat.reshape(-1).tolist()}

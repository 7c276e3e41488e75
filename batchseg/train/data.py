"""Training examples: where they come from, the held-out split, and their decoding.

An example is one image and its instances, as a small record the driver holds (URI and RLE
text, no pixels): {image_id, image_uri, height, width, instances (JSON: [{category_id,
segmentation}])}. Sources:
  - a COCO ground-truth file: `file_name`s under an images root (a member of a tar shard
    written as `.../shard.tar/member.png` is read from the shard);
  - the reviews dataset (`OUTPUT/reviews/`, from `batchseg pull`): the newest review per image.

The split is by image: an image is held out when the hash of its image_id (which is derived
from its URI, as in every run) falls under the held-out fraction, so the same data always
gives the same split, and an image keeps its side when it comes from another source.

Pixels are decoded in Ray Data tasks (`decode_examples`), never on the driver: image bytes ->
upright RGB, resized by the shortest-edge rule `batchseg run` uses; masks resized with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from fsspec.core import url_to_fs

from batchseg.config import ConfigError, StorageConfig
from batchseg.evaluation.evaluate import check_ground_truth
from batchseg.inputs import sources
from batchseg.inputs.imaging import ShortestEdge, decode_rgb
from batchseg.rows.schema import image_id as uri_image_id

log = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 89_478_485  # the run's default decompression-bomb limit


@dataclass
class TrainingData:
    """What the driver plans with: examples split in two, the categories, what they came from.

    categories: [{"id", "name"}] in class-index order (index 1 is the first); `source`: the
    model card's "data" record (kind, URI, sha256 or pull ids).
    """

    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    source: dict[str, Any]
    instances_per_category: dict[str, int] = field(default_factory=dict)

    def label_map(self, first_index: int = 1) -> dict[str, dict[str, Any]]:
        """Class index -> {id, name}: the label_map form `batchseg run` takes. torchvision's
        indices start at 1 (0 is the background), detectron2's at 0."""
        return {str(i): {"id": c["id"], "name": c["name"]} for i, c in enumerate(self.categories, start=first_index)}

    def card(self) -> dict[str, Any]:
        return {**self.source, "images": {"train": len(self.train), "heldout": len(self.heldout)},
                "instances_per_category": self.instances_per_category}


def is_heldout(image_id: int, fraction: float) -> bool:
    """Deterministic: sha256 of the image_id's decimal text, read as a number in [0, 1)."""
    digest = hashlib.sha256(str(int(image_id)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split(examples: list[dict[str, Any]], categories: list[dict[str, Any]], source: dict[str, Any],
          heldout_fraction: float) -> TrainingData:
    """Split by image_id hash and count instances per category in the training part."""
    train = [e for e in examples if not is_heldout(e["image_id"], heldout_fraction)]
    heldout = [e for e in examples if is_heldout(e["image_id"], heldout_fraction)]
    counts = Counter(inst["category_id"] for e in train for inst in json.loads(e["instances"]))
    per_category = {c["name"]: counts.get(c["id"], 0) for c in categories}
    return TrainingData(train, heldout, categories, source, per_category)


def select_categories(examples: list[dict[str, Any]], categories: list[dict[str, Any]],
                      names: list[str] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Keep only the categories named (all when None) and their instances; categories sorted by id."""
    known = {c["name"]: c for c in categories}
    if names is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"--categories names {', '.join(map(repr, unknown))}, not in the data; "
                              f"its categories: {', '.join(sorted(known))}")
        categories = [known[n] for n in names]
    categories = sorted(categories, key=lambda c: c["id"])
    ids = {c["id"] for c in categories}
    kept = []
    for e in examples:
        instances = [i for i in json.loads(e["instances"]) if i["category_id"] in ids]
        kept.append({**e, "instances": json.dumps(instances)})
    return kept, categories


def from_coco(gt_path: str, images_root: str | None, storage: StorageConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(examples, categories, source record) from a COCO ground-truth file. Crowd regions are
    left out (the tutorial's practice: they are not instances to learn)."""
    opts = storage.options(gt_path)
    try:
        with fsspec.open(gt_path, "rb", **opts) as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"--data {gt_path}: not found; give a COCO ground-truth .json or a reviews output folder") from None
    try:
        gt = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"--data {gt_path}: not JSON ({e}); give a COCO ground-truth file") from None
    check_ground_truth(gt, gt_path)
    root = (images_root or os.path.dirname(gt_path)).rstrip("/")
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in gt.get("annotations") or []:
        if not ann.get("iscrowd") and ann.get("segmentation"):
            by_image.setdefault(ann["image_id"], []).append(
                {"category_id": int(ann["category_id"]), "segmentation": ann["segmentation"]})
    fs, _ = url_to_fs(root, **storage.options(root))
    examples = []
    for img in gt["images"]:
        uri = _image_uri(fs, root, img["file_name"])
        examples.append({"image_id": uri_image_id(uri), "image_uri": uri, "height": int(img["height"]),
                         "width": int(img["width"]), "instances": json.dumps(by_image.get(img["id"], []))})
    categories = [{"id": int(c["id"]), "name": str(c["name"])} for c in gt["categories"]]
    source = {"kind": "coco", "uri": gt_path, "sha256": hashlib.sha256(raw).hexdigest(), "images_root": root}
    return examples, categories, source


def _image_uri(fs: Any, root: str, file_name: str) -> str:
    """ROOT/FILE_NAME, or the tar member URI when a folder of its path is a `.tar` file
    (`shards/a.tar/0001.png` -> `tar://0001.png::ROOT/shards/a.tar`)."""
    if "://" in file_name or file_name.startswith("/"):
        return file_name
    uri = f"{root}/{file_name}"
    parts = file_name.split("/")
    for i in range(len(parts) - 1, 0, -1):
        shard = "/".join(parts[:i])
        if shard.endswith(".tar") and fs.isfile(f"{root}/{shard}"):
            return sources.member_uri(f"{root}/{shard}", "/".join(parts[i:]))
    return uri


def from_reviews(output: str, storage: StorageConfig, model_rows: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(examples, categories, source record) from the reviews dataset (part 1 of the loop): the
    newest review of each image, its instances as the person left them. `model_rows`: the
    merged view instead, which adds the newest prediction of every image nobody reviewed (a
    WARNING says how many: the model then learns its own mistakes)."""
    from batchseg.store.results import open_results
    from batchseg.store.reviews import open_reviews

    opts = storage.options(output)
    reviews = open_reviews(output, opts)
    if not reviews.pulls():
        raise ConfigError(f"--data {output}: no reviews there (no published pull in {output.rstrip('/')}/reviews/); "
                          "pull reviewed labels first (batchseg pull labelstudio|coco), or give a COCO ground truth")
    columns = ["image_uri", "width", "height", "instances"]
    if model_rows:
        rows = (r for r in open_results(output, opts, reviews=True).rows([*columns, "error"]) if r.get("error") is None)
    else:
        rows = reviews.rows(columns)
    examples, predicted = [], 0
    for row in rows:
        predicted += row.get("source", "human") != "human"
        instances = [{"category_id": int(i["category_id"]), "segmentation": dict(i["segmentation"])}
                     for i in row["instances"] or [] if i.get("segmentation")]
        examples.append({"image_id": int(row["image_id"]), "image_uri": row["image_uri"], "height": int(row["height"]),
                         "width": int(row["width"]), "instances": json.dumps(instances)})
    if predicted:
        log.warning("training on the model's own pre-labels for %d of %d images (--include-model-rows): "
                    "its mistakes there are learnt as truth", predicted, len(examples))
    table = reviews.categories().get("instance", {}).get("things", [])
    categories = [{"id": int(c["id"]), "name": str(c["name"])} for c in table]
    source = {"kind": "merged" if model_rows else "reviews", "uri": output, "pulls": reviews.pulls(),
              "model_rows": predicted}
    return examples, categories, source


def decode_examples(batch: dict[str, np.ndarray], min_size: int, max_size: int,
                    category_index: dict[int, int], storage: StorageConfig) -> dict[str, list[Any]]:
    """A Ray Data batch of examples -> decoded training rows: image (H, W, 3) uint8 resized by
    the shortest-edge rule; masks (N, H, W) uint8 and labels (N,) int64 class indices, for the
    instances still visible after the resize. An image that cannot be read or decoded is left
    out with a WARNING naming it (training goes on without it)."""
    from pycocotools import mask as mask_util

    resize = ShortestEdge(min_size, max_size)
    out: dict[str, list[Any]] = {"image_id": [], "image": [], "masks": [], "labels": []}
    for image_id, uri, height, width, instances in zip(batch["image_id"], batch["image_uri"], batch["height"],
                                                       batch["width"], batch["instances"]):
        try:
            rgb = decode_rgb(_read(str(uri), storage), MAX_IMAGE_PIXELS)
        except Exception as e:
            log.warning("training image %s left out: %s", uri, e)
            continue
        small = resize(rgb)
        h, w = small.shape[:2]
        masks, labels = [], []
        for inst in json.loads(instances):
            mask = _rle_to_mask(mask_util, inst["segmentation"], rgb.shape[0], rgb.shape[1])
            mask = _resize_mask(mask, h, w)
            if mask.any():
                masks.append(mask)
                labels.append(category_index[inst["category_id"]])
        out["image_id"].append(int(image_id))
        out["image"].append(small)
        out["masks"].append(np.stack(masks) if masks else np.zeros((0, h, w), np.uint8))
        out["labels"].append(np.asarray(labels, np.int64))
    return out


def check_readable(examples: list[dict[str, Any]], storage: StorageConfig, hint: str, tries: int = 3) -> None:
    """Refuse (ConfigError) when none of the first `tries` images can be read: a wrong image
    folder, which would otherwise leave every training image out, one warning each."""
    error = None
    for example in examples[:tries]:
        try:
            _read(example["image_uri"], storage)
            return
        except Exception as e:  # whatever storage raises: only the refusal's text uses it
            error = f"{example['image_uri']}: cannot be read ({e})"
    if error is not None:
        raise ConfigError(f"{error}; {hint}")


def _read(uri: str, storage: StorageConfig) -> bytes:
    member = sources.split_member(uri)
    if member is None:
        return sources.read_bytes(uri, storage.options(uri))
    shard, _ = member
    protocol = shard.split("://", 1)[0] if "://" in shard else "file"
    with fsspec.open(uri, "rb", **{protocol: storage.options(shard)}) as f:
        return f.read()


def _rle_to_mask(mask_util: Any, segmentation: Any, height: int, width: int) -> np.ndarray:
    """Polygons, uncompressed or compressed RLE -> (height, width) uint8 mask."""
    if isinstance(segmentation, list):  # polygons
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_util.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": list(segmentation["size"]), "counts": segmentation["counts"].encode("ascii")}
    return mask_util.decode(rle)


def _resize_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    if mask.shape == (h, w):
        return mask.astype(np.uint8)
    from PIL import Image

    return (np.asarray(Image.fromarray(mask * 255).resize((w, h), Image.BILINEAR)) >= 128).astype(np.uint8)

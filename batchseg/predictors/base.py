"""The one small protocol every predictor backend implements, for every task.

A backend is split so that the driver and the CPU stages never load a model:
  - `categories(model_cfg)` -> the model's category tables (dataset ids, names, keypoint
    names, skeleton), known without weights: the driver checks them and writes run.json.
  - `preprocessor(model_cfg)` -> callable run in the decode stage: (H, W, 3) uint8 RGB ->
    the model's input array (resized, channel order the model wants), uint8. Preprocessors
    that compare equal are run once and their output shared by the tasks that use them.
    Optional `on_device(tensor)`: the same on a (3, H, W) uint8 RGB tensor, giving (3, h, w)
    uint8 on its device; with it a backend accepts decode_on_device (JPEGs decoded on the GPU).
  - `default_weights(model_cfg)` (optional) -> weights URI used when none are configured.
  - `Backend(model_cfg, weights_path, device, precision)` loads the model once (in a
    predictor actor); `predict(images)` runs one batched forward and returns one result per
    image, at original resolution: Detections (instance), Panoptic, Keypoints or DensePose.
    Masks are CroppedMasks: pasted over their boxes on the model's device, only the crops moved
    to the host (CroppedMasks.from_full wraps full masks a backend already has on the host).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from batchseg.config import ModelConfig


@dataclass(frozen=True)
class Category:
    id: int  # the dataset's id (COCO: 1..90 things, 92..200 stuff), never a model's index
    name: str


@dataclass(frozen=True)
class Categories:
    """What a model can output, as dataset categories.

    things: model thing-class index -> Category.  stuff: model stuff-class index -> Category
    (panoptic).  keypoint_names: in the model's (COCO) order.  skeleton: 1-based index pairs
    into keypoint_names, as COCO's person_keypoints files write it.
    """

    things: dict[int, Category]
    stuff: dict[int, Category] = field(default_factory=dict)
    keypoint_names: tuple[str, ...] = ()
    skeleton: tuple[tuple[int, int], ...] = ()

    def table(self) -> dict[str, Any]:
        """The JSON form that goes into run.json."""
        out: dict[str, Any] = {"things": _unique(self.things)}
        if self.stuff:
            out["stuff"] = _unique(self.stuff)
        if self.keypoint_names:
            out["keypoint_names"] = list(self.keypoint_names)
            out["skeleton"] = [list(pair) for pair in self.skeleton]
        return out

    def ids_named(self, names: list[str]) -> set[int]:
        """Dataset ids of the named categories; ValueError names the unknown ones."""
        by_name = {c.name: c.id for c in [*self.things.values(), *self.stuff.values()]}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"unknown categories {unknown}; the model has: {', '.join(sorted(by_name))}")
        return {by_name[n] for n in names}


def _unique(table: dict[int, Category]) -> list[dict[str, Any]]:
    names = {c.id: c.name for c in table.values()}
    return [{"id": i, "name": names[i]} for i in sorted(names)]


@dataclass
class ModelInput:
    uri: str
    # already preprocessed for this model: (h, w, 3) uint8 array, or (3, h, w) uint8 tensor
    # on the model's device where the JPEG was decoded there (decode_on_device)
    image: Any
    height: int  # original (upright) image height, pixels
    width: int  # original (upright) image width, pixels


@dataclass(frozen=True)
class CroppedMasks:
    """N binary masks of one image, each stored only over the rectangle that can hold it.

    height, width: the image's size, pixels.
    offsets: (N, 2) int64, (y0, x0) of each crop's top-left pixel in the image.
    crops: N arrays (h_i, w_i) bool, with 0 <= y0, y0 + h_i <= height (same for x, width),
    stored column-major (Fortran order, as COCO RLE reads masks) so that encoding reads each
    column contiguously. Every pixel outside a crop is False. A crop may be larger than its mask's tight box
    (e.g. detectron2 pastes over the box plus one pixel) or empty ((0, 0)).

    Full-resolution (N, height, width) masks never exist on the host: backends paste on the
    model's device and move the crops only (`nbytes` of them).
    """

    height: int
    width: int
    offsets: np.ndarray
    crops: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.crops):
            raise ValueError(f"{len(self.offsets)} offsets for {len(self.crops)} crops")
        for (y0, x0), crop in zip(self.offsets.tolist(), self.crops):
            h, w = crop.shape
            if crop.dtype != bool or y0 < 0 or x0 < 0 or y0 + h > self.height or x0 + w > self.width:
                raise ValueError(f"crop {crop.dtype} {crop.shape} at {(y0, x0)} is not a bool crop "
                                 f"inside a {self.height}x{self.width} image")

    def __len__(self) -> int:
        return len(self.crops)

    @property
    def nbytes(self) -> int:
        """Bytes held by the crops (what a backend moved device -> host)."""
        return sum(c.nbytes for c in self.crops)

    def areas(self) -> np.ndarray:
        """(N,) int64: pixels in each mask."""
        return np.array([np.count_nonzero(c) for c in self.crops], np.int64)

    def select(self, keep: np.ndarray) -> "CroppedMasks":
        """The masks at `keep` (an index or boolean array)."""
        index = np.arange(len(self))[keep]
        return CroppedMasks(self.height, self.width, self.offsets[index], tuple(self.crops[i] for i in index))

    @classmethod
    def empty(cls, height: int, width: int) -> "CroppedMasks":
        return cls(height, width, np.zeros((0, 2), np.int64), ())

    @classmethod
    def from_flat(cls, buffer: np.ndarray, regions: np.ndarray, height: int, width: int) -> "CroppedMasks":
        """Crops as views into one flat bool buffer (one device -> host copy for all of them).

        buffer: (sum h_i * w_i,) bool, the crops one after another, each column-major.
        regions: (N, 4) int, y0, x0, h_i, w_i of each crop.
        """
        regions = np.asarray(regions, np.int64).reshape(-1, 4)
        ends = np.cumsum(regions[:, 2] * regions[:, 3])
        crops = tuple(part.reshape(w, h).T for part, (_, _, h, w) in zip(np.split(buffer, ends[:-1]), regions.tolist()))
        return cls(height, width, regions[:, :2].copy(), crops)

    @classmethod
    def from_full(cls, masks: np.ndarray) -> "CroppedMasks":
        """(N, H, W) bool full masks -> each cropped to its tight bounding box ((0, 0) if empty).

        For backends and test oracles that produce full masks on the host anyway.
        """
        n, height, width = masks.shape
        offsets, crops = np.zeros((n, 2), np.int64), []
        for i, mask in enumerate(masks):
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            if not len(rows):
                crops.append(np.zeros((0, 0), bool, order="F"))
                continue
            offsets[i] = rows[0], cols[0]
            crops.append(np.asfortranarray(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], dtype=bool))
        return cls(height, width, offsets, tuple(crops))

    def full(self, i: int) -> np.ndarray:
        """(height, width) bool: mask i at full resolution. For tests; never on the hot path."""
        out = np.zeros((self.height, self.width), bool)
        (y0, x0), crop = self.offsets[i], self.crops[i]
        out[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
        return out


@dataclass
class Detections:
    """One image's instances, all in original-image pixels. N = number of instances.

    boxes: (N, 4) float, x0, y0, x1, y1.  scores: (N,) float.
    category_ids: (N,) int, dataset ids.  masks: N masks of the (height, width) image, cropped.
    """

    boxes: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray
    masks: CroppedMasks

    def __post_init__(self) -> None:
        _check_masks(self.masks)

    def select(self, keep: np.ndarray) -> "Detections":
        """The instances at `keep` (an index or boolean array)."""
        return Detections(self.boxes[keep], self.scores[keep], self.category_ids[keep], self.masks.select(keep))

    @classmethod
    def empty(cls, height: int, width: int) -> "Detections":
        return cls(
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros((0,), np.float32),
            category_ids=np.zeros((0,), np.int64),
            masks=CroppedMasks.empty(height, width),
        )


@dataclass
class Keypoints:
    """People with keypoints, original-image pixels. N people, K keypoints each.

    boxes: (N, 4) x0, y0, x1, y1.  scores: (N,).  category_ids: (N,) dataset ids.
    keypoints: (N, K, 3) float: x, y (continuous coordinates, as the model predicts), score.
    """

    boxes: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray
    keypoints: np.ndarray


@dataclass
class PanopticSegment:
    id: int  # value of this segment in Panoptic.id_map
    category_id: int  # dataset id
    isthing: bool
    score: float | None = None  # things carry the instance score; stuff none


@dataclass
class Panoptic:
    """id_map: (H, W) integers, 0 = void, else a segment id. Backends hand over the narrowest
    dtype that holds the ids (uint8 for fewer than 256 segments), column-major (Fortran order,
    as COCO RLE reads it) so the encoder reads it without a transpose; any order is correct.
    segments: one per id in the map."""

    id_map: np.ndarray
    segments: list[PanopticSegment]


@dataclass
class DensePose:
    """People with DensePose chart results. N people.

    boxes: (N, 4) x0, y0, x1, y1.  scores: (N,).  category_ids: (N,).
    iuv: N arrays (3, h_i, w_i) uint8 over each person's box: part index I (0 = background,
    1..24), U * 255, V * 255 -- detectron2's quantized chart result.
    masks: the DensePose foreground (I > 0) of each person in the (H, W) image, cropped.
    """

    boxes: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray
    iuv: list[np.ndarray]
    masks: CroppedMasks

    def __post_init__(self) -> None:
        _check_masks(self.masks)

    @classmethod
    def empty(cls, height: int, width: int) -> "DensePose":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), [],
                   CroppedMasks.empty(height, width))


def _check_masks(masks: Any) -> None:
    """A backend written for full masks gets told how to hand them over, not an AttributeError."""
    if not isinstance(masks, CroppedMasks):
        raise TypeError(f"masks must be CroppedMasks, not {type(masks).__name__}; "
                        "wrap full (N, H, W) bool masks with CroppedMasks.from_full(masks)")


Result = Detections | Keypoints | Panoptic | DensePose
Preprocessor = Callable[[np.ndarray], np.ndarray]


class Backend(Protocol):
    def __init__(self, cfg: ModelConfig, weights: str | None, device: str, precision: str) -> None:
        """Load the model once. `weights` is a local file (already fetched), or None for random init."""

    @staticmethod
    def preprocessor(cfg: ModelConfig) -> Preprocessor: ...

    @staticmethod
    def categories(cfg: ModelConfig) -> Categories:
        """Known without loading weights."""

    def predict(self, images: list[ModelInput]) -> list[Result]: ...


# The built-in backends, found by name like any other: (backend, task) -> "package.module:Class".
# Imported only when asked for, so this module, which every backend imports, imports none of them.
BUILTIN_BACKENDS = {
    ("detectron2", "instance"): "batchseg.predictors.detectron2:Detectron2Backend",
    ("detectron2", "panoptic"): "batchseg.predictors.detectron2:Detectron2PanopticBackend",
    ("detectron2", "keypoint"): "batchseg.predictors.detectron2:Detectron2KeypointBackend",
    ("detectron2", "densepose"): "batchseg.predictors.detectron2:DensePoseBackend",
    ("torchvision", "instance"): "batchseg.predictors.torchvision:TorchvisionBackend",
}
_TASK_WORDS = {"instance": "instance segmentation", "panoptic": "panoptic segmentation",
               "keypoint": "person keypoints", "densepose": "DensePose"}


def backend_class(name: str, task: str = "instance") -> type[Backend]:
    """('detectron2' | 'torchvision' | 'package.module:Class', task) -> the backend class."""
    if ":" not in name:
        spec = BUILTIN_BACKENDS.get((name, task))
        if spec is None:
            tasks = [_TASK_WORDS[t] for (n, t) in BUILTIN_BACKENDS if n == name]
            raise ValueError(f"the {name} backend does {', '.join(tasks)} only, not {task}")
        name = spec
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_label_map(spec: str | dict[int, Any] | None) -> dict[int, Category] | None:
    """Model class index -> dataset Category, from a dict or a YAML/JSON file.

    Accepted entry forms: `3: {id: 7, name: car}` or `3: car` (the id is then the index).
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        import fsspec
        import yaml

        with fsspec.open(spec, "r") as f:
            spec = yaml.safe_load(f)
    table = {}
    for index, entry in spec.items():
        if isinstance(entry, dict):
            table[int(index)] = Category(int(entry.get("id", index)), str(entry["name"]))
        else:
            table[int(index)] = Category(int(index), str(entry))
    return table


def autocast(device: str, precision: str):
    """Mixed precision on CUDA for fp16/bf16; a no-op context otherwise."""
    import torch

    if device.startswith("cuda") and precision in ("fp16", "bf16"):
        return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
    return contextlib.nullcontext()


def group_by_shape(shapes: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Batches of image indices, each at most `batch_size` long, of images with similar shapes.

    shapes: (h, w) of each model input, pixels. detectron2 pads a batch to its largest image
    (rounded up to the backbone's stride), so a portrait image among landscape ones costs the
    whole batch the padding. Sorting by (h, w) puts equal heights together (shortest-edge resize
    makes landscape inputs share h) and portrait inputs after them. Each index appears once;
    the order is deterministic (stable sort).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    order = sorted(range(len(shapes)), key=lambda i: (int(shapes[i][0]), int(shapes[i][1])))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def weights_uri(cfg: ModelConfig, backend: type[Backend]) -> str | None:
    """The weights to load: configured, else the backend's default, else None (random init)."""
    if cfg.weights or cfg.random_init:
        return cfg.weights
    default = getattr(backend, "default_weights", None)
    return default(cfg) if default else None


def preprocess_plan(models: dict[str, ModelConfig]) -> tuple[list[Preprocessor], dict[str, int]]:
    """Distinct preprocessors for the tasks, and task -> index into them.

    Tasks whose preprocessors compare equal (e.g. detectron2 zoo models that all resize to
    800/1333 BGR) share one decoded array: each image is decoded and resized once per distinct
    preprocessing, whatever the number of tasks.
    """
    unique: list[Preprocessor] = []
    index: dict[str, int] = {}
    for task, cfg in models.items():
        prep = backend_class(cfg.backend, task).preprocessor(cfg)
        if prep not in unique:
            unique.append(prep)
        index[task] = unique.index(prep)
    return unique, index

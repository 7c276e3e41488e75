"""The one small protocol every predictor backend implements, for every task.

A backend is split so that the driver and the CPU stages never load a model:
  - `categories(model_cfg)` -> the model's category tables (dataset ids, names, keypoint
    names, skeleton), known without weights: the driver checks them and writes run.json.
  - `preprocessor(model_cfg)` -> callable run in the decode stage: (H, W, 3) uint8 RGB ->
    the model's input array (resized, channel order the model wants), uint8. Preprocessors
    that compare equal are run once and their output shared by the tasks that use them.
  - `default_weights(model_cfg)` (optional) -> weights URI used when none are configured.
  - `Backend(model_cfg, weights_path, device, precision)` loads the model once (in a
    predictor actor); `predict(images)` runs one batched forward and returns one result per
    image, at original resolution: Detections (instance), Panoptic, Keypoints or DensePose.
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
    image: np.ndarray  # (h, w, 3) uint8, already preprocessed for this model
    height: int  # original (upright) image height, pixels
    width: int  # original (upright) image width, pixels


@dataclass
class Detections:
    """One image's instances, all in original-image pixels. N = number of instances.

    boxes: (N, 4) float, x0, y0, x1, y1.  scores: (N,) float.
    category_ids: (N,) int, dataset ids.  masks: (N, height, width) bool.
    """

    boxes: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray
    masks: np.ndarray

    def select(self, keep: np.ndarray) -> "Detections":
        """The instances at `keep` (an index or boolean array)."""
        return Detections(self.boxes[keep], self.scores[keep], self.category_ids[keep], self.masks[keep])

    @classmethod
    def empty(cls, height: int, width: int) -> "Detections":
        return cls(
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros((0,), np.float32),
            category_ids=np.zeros((0,), np.int64),
            masks=np.zeros((0, height, width), bool),
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
    """id_map: (H, W) int32, 0 = void, else a segment id.  segments: one per id in the map."""

    id_map: np.ndarray
    segments: list[PanopticSegment]


@dataclass
class DensePose:
    """People with DensePose chart results. N people.

    boxes: (N, 4) x0, y0, x1, y1.  scores: (N,).  category_ids: (N,).
    iuv: N arrays (3, h_i, w_i) uint8 over each person's box: part index I (0 = background,
    1..24), U * 255, V * 255 -- detectron2's quantized chart result.
    masks: (N, H, W) bool, the DensePose foreground at original resolution.
    """

    boxes: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray
    iuv: list[np.ndarray]
    masks: np.ndarray

    @classmethod
    def empty(cls, height: int, width: int) -> "DensePose":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), [],
                   np.zeros((0, height, width), bool))


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


def backend_class(name: str, task: str = "instance") -> type[Backend]:
    """('detectron2' | 'torchvision' | 'package.module:Class', task) -> the backend class."""
    if name == "detectron2":
        from batchseg.predictors import detectron2

        return detectron2.BACKENDS[task]
    if name == "torchvision":
        if task != "instance":
            raise ValueError(f"the torchvision backend does instance segmentation only, not {task}")
        from batchseg.predictors.torchvision import TorchvisionBackend

        return TorchvisionBackend
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

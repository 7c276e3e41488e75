"""The one small protocol every predictor backend implements.

A backend is split in two so that the CPU stages never load a model:
  - `label_map(model_cfg)` -> model class index -> dataset Category (no weights needed), so
    the driver can check it and write the category table before any work starts.
  - `preprocessor(model_cfg)` -> callable run in the decode stage: (H, W, 3) uint8 RGB ->
    the model's input array (resized, channel order the model wants), uint8.
  - `Backend(model_cfg, weights_path, device, precision)` -> loads the model once (in a predictor actor);
    `predict(images)` runs one batched forward and returns detections at original resolution.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from batchseg.config import ModelConfig


@dataclass(frozen=True)
class Category:
    id: int  # the dataset's id (COCO: 1..90), never a model's contiguous index
    name: str


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


Preprocessor = Callable[[np.ndarray], np.ndarray]


class Backend(Protocol):
    def __init__(self, cfg: ModelConfig, weights: str | None, device: str, precision: str) -> None:
        """Load the model once. `weights` is a local file (already fetched), or None for random init."""

    @staticmethod
    def preprocessor(cfg: ModelConfig) -> Preprocessor: ...

    @staticmethod
    def label_map(cfg: ModelConfig) -> dict[int, Category]:
        """Model class index -> dataset category, known without loading weights."""

    def predict(self, images: list[ModelInput]) -> list[Detections]: ...


def backend_class(name: str) -> type[Backend]:
    """'detectron2' | 'torchvision' | 'package.module:Class' -> the backend class."""
    if name == "detectron2":
        from batchseg.predictors.detectron2 import Detectron2Backend

        return Detectron2Backend
    if name == "torchvision":
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

"""A test-only backend that segments the sample images exactly, by colour.

It goes through the same protocol as the real backends (preprocessor, label map, batched
predict at original resolution), so a pipeline run with it must reproduce the ground truth
written by batchseg.samples pixel for pixel: COCOeval segm AP = 1.0.
"""

from __future__ import annotations

import numpy as np

from batchseg.config import ModelConfig
from batchseg.predictors.base import (
    Categories, Category, CroppedMasks, Detections, ModelInput, Panoptic, PanopticSegment, Preprocessor,
)
from batchseg.samples import BACKGROUND, SHAPE_COLORS


class ColorKeyBackend:
    calls: list[int] = []  # batch sizes seen, per process (read in-process by unit tests)

    def __init__(self, cfg: ModelConfig, weights: str | None, device: str, precision: str) -> None:
        self.colors = list(SHAPE_COLORS.items())

    @staticmethod
    def preprocessor(cfg: ModelConfig) -> Preprocessor:
        return _identity  # full resolution: masks come out exact

    @staticmethod
    def categories(cfg: ModelConfig) -> Categories:
        return Categories({cid: Category(cid, name) for cid, name in SHAPE_COLORS.values()})

    def predict(self, images: list[ModelInput]) -> list[Detections]:
        ColorKeyBackend.calls.append(len(images))
        out = []
        for x in images:
            assert x.image.shape[:2] == (x.height, x.width), "oracle needs unresized input"
            masks, boxes, ids = [], [], []
            for color, (cid, _) in self.colors:
                mask = np.all(x.image == color, axis=-1)
                if mask.any():
                    ys, xs = np.nonzero(mask)
                    masks.append(mask)
                    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                    ids.append(cid)
            if not masks:
                out.append(Detections.empty(x.height, x.width))
                continue
            out.append(Detections(
                boxes=np.asarray(boxes, np.float32),
                scores=np.linspace(1.0, 0.9, len(masks)).astype(np.float32),
                category_ids=np.asarray(ids, np.int64),
                masks=CroppedMasks.from_full(np.stack(masks)),
            ))
        return out


class ColorKeyPanoptic(ColorKeyBackend):
    """Panoptic oracle: each shape colour a thing segment, the gray background one stuff segment."""

    BACKGROUND_ID = 200

    @staticmethod
    def categories(cfg: ModelConfig) -> Categories:
        return Categories(ColorKeyBackend.categories(cfg).things, stuff={0: Category(ColorKeyPanoptic.BACKGROUND_ID, "background")})

    def predict(self, images: list[ModelInput]) -> list[Panoptic]:
        out = []
        for x in images:
            id_map = np.zeros((x.height, x.width), np.int32)
            segments = []
            for color, (cid, isthing) in [*((c, (i, True)) for c, (i, _) in self.colors), (BACKGROUND, (self.BACKGROUND_ID, False))]:
                mask = np.all(x.image == color, axis=-1)
                if mask.any():
                    segments.append(PanopticSegment(len(segments) + 1, cid, isthing, 1.0 if isthing else None))
                    id_map[mask] = len(segments)
            out.append(Panoptic(id_map, segments))
        return out


def _identity(rgb: np.ndarray) -> np.ndarray:
    return rgb


class DiesOnceBackend(ColorKeyBackend):
    """The oracle, except that the first actor to predict kills its own process (os._exit)
    on its first batch; a marker file makes it happen once per marker, across restarts."""

    def predict(self, images: list[ModelInput]) -> list[Detections]:
        import os

        marker = self.marker
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return super().predict(images)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)

    def __init__(self, cfg: ModelConfig, weights: str | None, device: str, precision: str) -> None:
        super().__init__(cfg, weights, device, precision)
        self.marker = cfg.options["marker"]


class SlowBackend(ColorKeyBackend):
    """The oracle at options["seconds"] per image, so a run lasts long enough to interrupt."""

    def predict(self, images: list[ModelInput]) -> list[Detections]:
        import time

        time.sleep(self.seconds * len(images))
        return super().predict(images)

    def __init__(self, cfg: ModelConfig, weights: str | None, device: str, precision: str) -> None:
        super().__init__(cfg, weights, device, precision)
        self.seconds = float(cfg.options.get("seconds", 0.5))

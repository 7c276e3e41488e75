"""Test-only backends that are deliberately slow in one stage, for the run report's
bottleneck line: the colour-key oracle (tests.oracle), with SLOW_S of sleep per image in the
forward (SlowModelBackend) or in the preprocessor the decode stage runs (SlowDecodeBackend)."""

from __future__ import annotations

import time

import numpy as np

from batchseg.config import ModelConfig
from batchseg.predictors.base import Detections, ModelInput, Preprocessor
from tests.oracle import ColorKeyBackend

SLOW_S = 1.0  # well above a real decode on a loaded 2-core machine (~0.3 s), so the slow part dominates


class SlowModelBackend(ColorKeyBackend):
    def predict(self, images: list[ModelInput]) -> list[Detections]:
        time.sleep(SLOW_S * len(images))
        return super().predict(images)


class SlowDecodeBackend(ColorKeyBackend):
    @staticmethod
    def preprocessor(cfg: ModelConfig) -> Preprocessor:
        return _slow_identity


def _slow_identity(rgb: np.ndarray) -> np.ndarray:
    time.sleep(SLOW_S)
    return rgb

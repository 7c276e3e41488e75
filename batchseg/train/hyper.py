"""The training recipe's hyper-parameters, apart from the recipe: `batchseg` reads their
defaults for every command's --help, and must not import torch for that."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Hyper:
    """Hyper-parameters. Sizes in pixels; lr is for `batch_size` images on each of the workers
    (the linear scaling rule: lr grows with the total batch)."""

    arch: str = "maskrcnn_resnet50_fpn"
    iterations: int = 1000
    batch_size: int = 2  # images per worker per iteration
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iterations: int = 50
    steps: tuple[float, ...] = (0.7, 0.9)  # fractions of `iterations` where lr drops x0.1
    min_size: int = 800
    max_size: int = 1333
    flip: float = 0.5  # probability of a horizontal flip
    clip_grad_norm: float = 10.0  # keeps the first iterations from scratch from diverging
    amp: bool = False  # fp16 autocast with a gradient scaler (CUDA only)
    seed: int = 0
    checkpoint_every: int = 100  # iterations

    def record(self) -> dict[str, Any]:
        return asdict(self)

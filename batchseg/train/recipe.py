"""The torchvision Mask R-CNN recipe, as the PyTorch detection tutorial fine-tunes it.

New `FastRCNNPredictor` and `MaskRCNNPredictor` heads for the categories trained on, SGD with
momentum and weight decay, a linear warm-up then a step schedule (lr x 0.1 at fixed fractions
of the iterations), horizontal flips. Plain functions on one process; `loop.py` runs them on
Ray Train workers.

Images arrive resized already (the decode task uses the same shortest-edge rule as `batchseg
run`), so the model's own resize is off, in training as at inference.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from batchseg.config import ConfigError
from batchseg.predictors import torchvision as tv_backend
from batchseg.rows.encoding import encode_mask
from batchseg.train.hyper import Hyper

# Fewer proposals and RoI samples than torchvision's defaults (2000 / 512): small images with
# a few objects each; the forward costs a fraction. Inference settings are torchvision's.
TRAIN_KNOBS = {"rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300, "box_batch_size_per_image": 64}
EVAL_SCORE_THRESHOLD = 0.05  # torchvision's default: AP needs the low-scored detections too


def build_model(arch: str, num_classes: int) -> torch.nn.Module:
    """An untrained Mask R-CNN of `arch` with `num_classes` (background included), built as
    `batchseg run` builds it, so a state dict saved from it loads there."""
    if arch not in tv_backend.ARCHITECTURES:
        raise ConfigError(f"--arch {arch}: use one of {', '.join(tv_backend.ARCHITECTURES)}")
    builder, _ = tv_backend.ARCHITECTURES[arch]
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes,
                    box_score_thresh=EVAL_SCORE_THRESHOLD, **TRAIN_KNOBS)
    t = model.transform
    model.transform = tv_backend.PreResizedTransform(t.min_size, t.max_size, t.image_mean, t.image_std)
    return model


def from_base(arch: str, base_weights: str, num_classes: int, keep_head: bool) -> torch.nn.Module:
    """The base checkpoint loaded whole (its architecture checked key by key), then, unless
    `keep_head`, new box and mask predictors for `num_classes` (the tutorial's recipe).

    Raises ConfigError when `keep_head` and the base head has another number of classes.
    """
    state = tv_backend.load_state(base_weights)
    base_classes = state[tv_backend.CLS_WEIGHT].shape[0]
    if keep_head and base_classes != num_classes:
        raise ConfigError(f"--keep-head: the base weights' head has {base_classes - 1} classes but the data has "
                          f"{num_classes - 1} categories; drop --keep-head to train new heads")
    model = build_model(arch, base_classes)
    tv_backend.load_strict(model, state, base_weights)
    if not keep_head:
        heads = model.roi_heads
        heads.box_predictor = FastRCNNPredictor(heads.box_predictor.cls_score.in_features, num_classes)
        mask = heads.mask_predictor.conv5_mask
        heads.mask_predictor = MaskRCNNPredictor(mask.in_channels, mask.out_channels, num_classes)
    return model


def optimizer_and_schedule(model: torch.nn.Module, hyper: Hyper, workers: int):
    """SGD (momentum, weight decay) on the trainable parameters; a LambdaLR stepped once per
    iteration: linear warm-up from lr/1000, then x0.1 at each of `hyper.steps`."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=hyper.lr * workers, momentum=hyper.momentum, weight_decay=hyper.weight_decay)
    milestones = [int(f * hyper.iterations) for f in hyper.steps]

    def factor(it: int) -> float:
        warm = min(1.0, 0.001 + (1 - 0.001) * it / hyper.warmup_iterations) if hyper.warmup_iterations else 1.0
        return warm * 0.1 ** sum(it >= m for m in milestones)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_targets(batch: dict[str, np.ndarray], flip: float, rng: np.random.Generator) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A decoded batch (see data.decode_examples) -> model inputs: float images (3, H, W) in
    0..1 and targets {boxes (N, 4) x0 y0 x1 y1, labels (N,), masks (N, H, W) uint8}, each
    image flipped left-right with probability `flip`."""
    images, targets = [], []
    for image, masks, labels in zip(batch["image"], batch["masks"], batch["labels"]):
        image = torch.tensor(image).permute(2, 0, 1).float().div_(255)  # a copy: Ray's arrays are read-only
        masks = torch.tensor(masks, dtype=torch.uint8)
        if rng.random() < flip:
            image, masks = image.flip(-1), masks.flip(-1)
        images.append(image)
        targets.append({"boxes": boxes_of(masks), "labels": torch.tensor(labels, dtype=torch.int64), "masks": masks})
    return images, targets


def boxes_of(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) masks -> (N, 4) float boxes x0, y0, x1, y1 (x1, y1 one past the last pixel)."""
    if len(masks) == 0:
        return torch.zeros((0, 4))
    rows, cols = masks.any(2), masks.any(1)
    h, w = masks.shape[1:]
    y0 = rows.float().argmax(1)
    y1 = h - rows.flip(1).float().argmax(1)
    x0 = cols.float().argmax(1)
    x1 = w - cols.flip(1).float().argmax(1)
    return torch.stack([x0, y0, x1, y1], 1).float()


def train_step(model: torch.nn.Module, optimizer, schedule, images, targets, clip_grad_norm: float,
               scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One SGD step, gradients clipped to `clip_grad_norm`; with `scaler`, the forward runs
    under fp16 autocast (CUDA). Returns the losses (floats), "loss" their sum. Raises
    FloatingPointError when the loss is not finite (a learning rate too high)."""
    model.train()
    with torch.autocast("cuda", dtype=torch.float16, enabled=scaler is not None):
        losses = model(images, targets)
    loss = sum(losses.values())
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"training loss is {loss.item()} ({ {k: round(v.item(), 4) for k, v in losses.items()} }); "
                                 "lower --lr")
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    schedule.step()
    return {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}


@torch.inference_mode()
def predict(model: torch.nn.Module, images: list[np.ndarray]) -> list[dict[str, Any]]:
    """(H, W, 3) uint8 images -> per image {boxes (N, 4) x0 y0 x1 y1, scores (N,), labels (N,),
    masks (N, H, W) bool}, numpy, at the given images' size."""
    model.eval()
    tensors = [torch.tensor(im).permute(2, 0, 1).float().div_(255) for im in images]
    out = []
    for d in model(tensors):
        out.append({"boxes": d["boxes"].numpy(), "scores": d["scores"].numpy(), "labels": d["labels"].numpy(),
                    "masks": (d["masks"][:, 0] > 0.5).numpy()})
    return out


def coco_detections(found: dict[str, Any], image_id: int, index_to_id: dict[int, int]) -> list[dict[str, Any]]:
    """One image's predictions as COCO result dicts (bbox x, y, w, h; segmentation RLE)."""
    dets = []
    for box, score, label, mask in zip(found["boxes"], found["scores"], found["labels"], found["masks"]):
        x0, y0, x1, y1 = (float(v) for v in box)
        dets.append({"image_id": image_id, "category_id": index_to_id[int(label)], "score": float(score),
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": encode_mask(mask)})
    return dets

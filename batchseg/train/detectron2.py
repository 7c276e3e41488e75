"""Training through detectron2's own machinery, inside the same Ray Train workers.

Each worker registers its shard of the decoded examples in detectron2's `DatasetCatalog`
(`batchseg_train_rank{R}`, with `thing_classes` in `MetadataCatalog`), builds its data loader
with `build_detection_train_loader` (a mapper that turns our decoded rows into detectron2's
`Instances`, with a random horizontal flip), and steps detectron2's `SimpleTrainer` (its
optimizer and LR schedule from the model-zoo config: `build_optimizer`, `build_lr_scheduler`).
A detectron2 hook reports to Ray Train every `checkpoint_every` iterations, so checkpoints,
`FailureConfig` resumes and held-out AP work as for torchvision (`loop.py`).

Class indices are detectron2's: 0..N-1, no background. Needs detectron2 installed; CI skips it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from batchseg.config import ConfigError, ModelConfig


def check_installed() -> None:
    """ConfigError (one line) unless detectron2 imports."""
    try:
        import detectron2  # noqa: F401
    except ImportError:
        raise ConfigError("--backend detectron2: detectron2 is not installed (docs/backends.md says how); "
                          "or train with --backend torchvision") from None


def build(arch: str, num_classes: int, base: str | None, hyper: Any):
    """(model, optimizer, schedule, cfg) for `arch` (a model-zoo config or YAML path) with
    `num_classes` categories, from the base weights (detectron2's own loading, which leaves a
    head of another shape randomly initialised, as its fine-tuning tutorial does)."""
    from detectron2.modeling import build_model
    from detectron2.solver import build_lr_scheduler, build_optimizer

    from batchseg.predictors.detectron2 import build_cfg, load_weights

    cfg = build_cfg(ModelConfig(backend="detectron2", model=arch, random_init=True)).clone()
    cfg.defrost()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.SOLVER.BASE_LR = hyper.lr
    cfg.SOLVER.MAX_ITER = hyper.iterations
    cfg.SOLVER.STEPS = tuple(int(f * hyper.iterations) for f in hyper.steps)
    cfg.SOLVER.WARMUP_ITERS = hyper.warmup_iterations
    cfg.SOLVER.MOMENTUM, cfg.SOLVER.WEIGHT_DECAY = hyper.momentum, hyper.weight_decay
    cfg.SOLVER.IMS_PER_BATCH = hyper.batch_size
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE, cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = "norm", hyper.clip_grad_norm
    cfg.DATALOADER.NUM_WORKERS = 0  # Ray Data decoded the images already
    cfg.freeze()
    model = build_model(cfg)
    if base is not None:
        load_weights(model, base)
    optimizer = build_optimizer(cfg, model)
    return model, optimizer, build_lr_scheduler(cfg, optimizer), cfg


def train_loader(cfg, rows: dict[str, list[Any]], categories: list[dict[str, Any]], rank: int, flip: float, seed: int):
    """detectron2's train loader over this worker's decoded rows, registered in DatasetCatalog."""
    from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader

    name = f"batchseg_train_rank{rank}"
    dicts = [{"image_id": int(i), "image": im, "masks": m, "labels": lb, "height": im.shape[0], "width": im.shape[1]}
             for i, im, m, lb in zip(rows["image_id"], rows["image"], rows["masks"], rows["labels"])]
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=[c["name"] for c in categories])
    return build_detection_train_loader(
        DatasetCatalog.get(name), mapper=_Mapper(cfg.INPUT.FORMAT, flip, seed + rank),
        sampler=_Forever(len(dicts), seed + rank), total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=True, num_workers=0)


def predictor(image_format: str):
    """predict(model, images) as recipe.predict gives it, for a detectron2 model: images (H, W, 3)
    uint8 RGB in, per image {boxes, scores, labels (1-based, as the label map's index + 1), masks}."""
    @torch.inference_mode()
    def predict(model: torch.nn.Module, images: list[np.ndarray]) -> list[dict[str, Any]]:
        model.eval()
        inputs = [{"image": torch.tensor(np.ascontiguousarray(im[:, :, ::-1] if image_format == "BGR" else im)).permute(2, 0, 1),
                   "height": im.shape[0], "width": im.shape[1]} for im in images]
        out = []
        for result in model(inputs):
            found = result["instances"].to("cpu")
            out.append({"boxes": found.pred_boxes.tensor.numpy(), "scores": found.scores.numpy(),
                        "labels": found.pred_classes.numpy() + 1, "masks": found.pred_masks.numpy()})
        model.train()
        return out
    return predict


class _Forever(torch.utils.data.Sampler):
    """Shuffled indices of this worker's own shard, epoch after epoch (detectron2's
    TrainingSampler would shard again by rank what Ray Data has sharded already)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        while True:
            yield from rng.permutation(self.size).tolist()


class _Mapper:
    """A decoded row -> detectron2's input dict: image (3, H, W) in the model's channel order,
    `instances` with gt_boxes, gt_classes (0-based) and gt_masks; flipped with probability `flip`."""

    def __init__(self, image_format: str, flip: float, seed: int) -> None:
        self.bgr, self.flip = image_format == "BGR", flip
        self.rng = np.random.default_rng(seed)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from detectron2.structures import BitMasks, Boxes, Instances

        from batchseg.train.recipe import boxes_of

        image, masks = np.asarray(row["image"]), torch.tensor(np.asarray(row["masks"]), dtype=torch.bool)
        if self.rng.random() < self.flip:
            image, masks = image[:, ::-1], masks.flip(-1)
        if self.bgr:
            image = image[:, :, ::-1]
        h, w = image.shape[:2]
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(boxes_of(masks))
        instances.gt_classes = torch.tensor(np.asarray(row["labels"]), dtype=torch.int64) - 1
        instances.gt_masks = BitMasks(masks)
        return {"image": torch.tensor(np.ascontiguousarray(image)).permute(2, 0, 1), "height": h, "width": w,
                "image_id": row["image_id"], "instances": instances}

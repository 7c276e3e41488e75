"""torchvision Mask R-CNN (`maskrcnn_resnet50_fpn`, `maskrcnn_resnet50_fpn_v2`).

Weights: a state dict as `torch.save(model.state_dict())` writes it (the PyTorch detection
tutorial), or a torchvision references/detection checkpoint ({"model": state_dict, ...}).
The number of classes is read from the checkpoint; class index -> dataset category comes from
`label_map` (a fine-tuned model must give one), else torchvision's COCO table (index == COCO id).

Images arrive already resized on the CPU stage (same rule as GeneralizedRCNNTransform), so
the model's own resize is switched off and masks are pasted straight at original resolution.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.models import detection
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from batchseg.config import ModelConfig
from batchseg.imaging import ShortestEdge
from batchseg.predictors.base import (
    Categories, Category, Detections, ModelInput, Preprocessor, autocast, load_label_map,
)

ARCHITECTURES = {
    "maskrcnn_resnet50_fpn": (detection.maskrcnn_resnet50_fpn, detection.MaskRCNN_ResNet50_FPN_Weights),
    "maskrcnn_resnet50_fpn_v2": (detection.maskrcnn_resnet50_fpn_v2, detection.MaskRCNN_ResNet50_FPN_V2_Weights),
}
DEFAULT_ARCH = "maskrcnn_resnet50_fpn"
MIN_SIZE, MAX_SIZE = 800, 1333  # torchvision's test-time defaults
_CLS_WEIGHT = "roi_heads.box_predictor.cls_score.weight"


class _PreResizedTransform(GeneralizedRCNNTransform):
    """Normalise and batch only: resizing already happened in the decode stage."""

    def resize(self, image, target=None):
        return image, target


class TorchvisionBackend:
    def __init__(self, cfg: ModelConfig, weights: str | None, device: str, precision: str) -> None:
        builder, weights_enum = ARCHITECTURES[_arch(cfg)]
        state = _load_state(weights) if weights else None
        label_map = self.categories(cfg).things
        num_classes = state[_CLS_WEIGHT].shape[0] if state is not None else max(label_map) + 1
        if num_classes <= max(label_map):
            raise ValueError(
                f"checkpoint has {num_classes} classes but the label map names index {max(label_map)}; "
                "give a label_map that matches the checkpoint"
            )
        self._index_to_id = np.full(num_classes, -1, np.int64)  # -1: background / "N/A" slots
        for index, category in label_map.items():
            self._index_to_id[index] = category.id

        model = builder(
            weights=None, weights_backbone=None, num_classes=num_classes,
            box_score_thresh=cfg.score_threshold,
        )
        if state is not None:
            model.load_state_dict(state)
        t = model.transform
        model.transform = _PreResizedTransform(t.min_size, t.max_size, t.image_mean, t.image_std)
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.autocast = autocast(device, precision)

    @staticmethod
    def categories(cfg: ModelConfig) -> Categories:
        """From cfg.label_map (index 0 is background), else torchvision's COCO table."""
        given = load_label_map(cfg.label_map)
        return Categories(given if given is not None else _coco_label_map(ARCHITECTURES[_arch(cfg)][1]))

    @staticmethod
    def preprocessor(cfg: ModelConfig) -> Preprocessor:
        _arch(cfg)
        return ShortestEdge(cfg.min_size or MIN_SIZE, cfg.max_size or MAX_SIZE)

    @torch.inference_mode()
    def predict(self, images: list[ModelInput]) -> list[Detections]:
        tensors = [
            torch.from_numpy(x.image).to(self.device).permute(2, 0, 1).float().div_(255) for x in images
        ]
        model = self.model
        with self.autocast:
            batch, _ = model.transform(tensors)
            features = model.backbone(batch.tensors)
            proposals, _ = model.rpn(batch, features)
            found, _ = model.roi_heads(features, proposals, batch.image_sizes)
        found = model.transform.postprocess(found, batch.image_sizes, [(x.height, x.width) for x in images])
        results = []
        for d in found:
            det = Detections(
                boxes=d["boxes"].float().cpu().numpy(),
                scores=d["scores"].float().cpu().numpy(),
                category_ids=self._index_to_id[d["labels"].cpu().numpy()],
                masks=(d["masks"][:, 0] > 0.5).cpu().numpy(),
            )
            results.append(det.select(det.category_ids >= 0))  # classes outside the label map
        return results


def _arch(cfg: ModelConfig) -> str:
    arch = cfg.model or DEFAULT_ARCH
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown torchvision model {arch!r}; use one of {', '.join(ARCHITECTURES)}")
    return arch


def _load_state(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if _CLS_WEIGHT not in state:
        raise ValueError(f"{path} is not a Mask R-CNN state dict (no {_CLS_WEIGHT})")
    return state


def _coco_label_map(weights_enum) -> dict[int, Category]:
    names = weights_enum.DEFAULT.meta["categories"]  # index == COCO category id
    return {i: Category(i, n) for i, n in enumerate(names) if i > 0 and n != "N/A"}

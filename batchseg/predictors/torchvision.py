"""torchvision Mask R-CNN (`maskrcnn_resnet50_fpn`, `maskrcnn_resnet50_fpn_v2`, and the lighter
`maskrcnn_resnet18_fpn` / `maskrcnn_resnet34_fpn` that `batchseg train` can make for simple domains).

Weights: a state dict as `torch.save(model.state_dict())` writes it (the PyTorch detection
tutorial), or a torchvision references/detection checkpoint ({"model": state_dict, ...}).
The number of classes is read from the checkpoint; class index -> dataset category comes from
`label_map` (a fine-tuned model must give one), else torchvision's COCO table (index == COCO id).

Images arrive already resized on the CPU stage (same rule as GeneralizedRCNNTransform), so
the model's own resize is switched off; they cross to the device as uint8. Masks are pasted at
original resolution over their boxes only, on the device (paste_crops); only crops reach the host.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F
from torchvision.models import detection
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from batchseg.config import ModelConfig
from batchseg.inputs.imaging import ShortestEdge
from batchseg.predictors import checkpoints
from batchseg.predictors.base import (
    Categories, Category, CroppedMasks, Detections, ModelInput, Preprocessor, autocast, load_label_map,
)
from batchseg.predictors.device import compute_in_fp32, crops_to_host, image_tensor, outputs_in_fp32

LIGHT_CHANNELS = 128  # FPN and head width of the light architectures (torchvision's own: 256)


def _light_maskrcnn(depth: int):
    """A Mask R-CNN builder, called like torchvision's own, on a ResNet-`depth` FPN with
    narrower heads (FPN and mask head LIGHT_CHANNELS wide, a 512-wide box head) and trainable
    BatchNorm, which training from scratch needs (frozen statistics do not converge there).
    torchvision publishes no detection weights for it: COCO weights are refused."""
    def build(weights=None, weights_backbone=None, num_classes: int = 91, **kwargs) -> detection.MaskRCNN:
        if weights is not None:
            raise ValueError(f"no COCO weights exist for maskrcnn_resnet{depth}_fpn; train one with batchseg train")
        body = getattr(resnet, f"resnet{depth}")(weights=weights_backbone, norm_layer=torch.nn.BatchNorm2d)
        layers = {f"layer{i}": str(i - 1) for i in range(1, 5)}
        backbone = BackboneWithFPN(body, layers, [64, 128, 256, 512], LIGHT_CHANNELS)
        c = LIGHT_CHANNELS
        return detection.MaskRCNN(
            backbone, num_classes=None, box_head=TwoMLPHead(c * 7 * 7, 512),
            box_predictor=FastRCNNPredictor(512, num_classes), mask_head=MaskRCNNHeads(c, (c, c, c, c), 1),
            mask_predictor=MaskRCNNPredictor(c, c, num_classes), **kwargs)
    return build


ARCHITECTURES = {  # name -> (builder, the weights enum whose COCO table names classes without a label_map)
    "maskrcnn_resnet50_fpn": (detection.maskrcnn_resnet50_fpn, detection.MaskRCNN_ResNet50_FPN_Weights),
    "maskrcnn_resnet50_fpn_v2": (detection.maskrcnn_resnet50_fpn_v2, detection.MaskRCNN_ResNet50_FPN_V2_Weights),
    "maskrcnn_resnet18_fpn": (_light_maskrcnn(18), detection.MaskRCNN_ResNet50_FPN_Weights),
    "maskrcnn_resnet34_fpn": (_light_maskrcnn(34), detection.MaskRCNN_ResNet50_FPN_Weights),
}
DEFAULT_ARCH = "maskrcnn_resnet50_fpn"
MIN_SIZE, MAX_SIZE = 800, 1333  # torchvision's test-time defaults
CLS_WEIGHT = "roi_heads.box_predictor.cls_score.weight"


class PreResizedTransform(GeneralizedRCNNTransform):
    """Normalise and batch only: resizing already happened in the decode stage."""

    def resize(self, image, target=None):
        return image, target


class TorchvisionBackend:
    def __init__(self, cfg: ModelConfig, weights: str | None, device: str, precision: str) -> None:
        builder, weights_enum = ARCHITECTURES[_arch(cfg)]
        state = load_state(weights) if weights else None
        label_map = self.categories(cfg).things
        num_classes = state[CLS_WEIGHT].shape[0] if state is not None else max(label_map) + 1
        _check_label_map(cfg, label_map, num_classes)
        self._index_to_id = np.full(num_classes, -1, np.int64)  # -1: background / "N/A" slots
        for index, category in label_map.items():
            self._index_to_id[index] = category.id

        model = builder(
            weights=None, weights_backbone=None, num_classes=num_classes,
            box_score_thresh=cfg.score_threshold,
        )
        if state is not None:
            load_strict(model, state, weights)
        t = model.transform
        model.transform = PreResizedTransform(t.min_size, t.max_size, t.image_mean, t.image_std)
        self.model = model.eval().to(device)
        self.device, self.precision = torch.device(device), precision
        # under fp16/bf16: anchors made and RPN deltas decoded in fp32 (torchvision makes anchors
        # in the features' dtype, and its BoxCoder casts them to the deltas' dtype), the box
        # predictor computed in fp32, mask logits handed to the paste in fp32
        self.model.rpn.anchor_generator.register_forward_pre_hook(_fp32_anchors)
        outputs_in_fp32(self.model.rpn.head)
        compute_in_fp32(self.model.roi_heads.box_predictor, self.device.type)
        outputs_in_fp32(self.model.roi_heads.mask_predictor)

    @staticmethod
    def categories(cfg: ModelConfig) -> Categories:
        """From cfg.label_map (index 0 is background), else torchvision's COCO table."""
        given = load_label_map(cfg.label_map)
        return Categories(given if given is not None else _coco_label_map(ARCHITECTURES[_arch(cfg)][1]))

    @classmethod
    def check_weights(cls, cfg: ModelConfig, path: str) -> None:
        """Before any work: `path` is a Mask R-CNN checkpoint and the label map covers its classes."""
        _check_label_map(cfg, cls.categories(cfg).things, load_state(path)[CLS_WEIGHT].shape[0])

    @staticmethod
    def preprocessor(cfg: ModelConfig) -> Preprocessor:
        _arch(cfg)
        return ShortestEdge(cfg.min_size or MIN_SIZE, cfg.max_size or MAX_SIZE)

    @torch.inference_mode()
    def predict(self, images: list[ModelInput]) -> list[Detections]:
        tensors = [image_tensor(x.image, self.device).float().div_(255) for x in images]
        model = self.model
        with autocast(str(self.device), self.precision):
            batch, _ = model.transform(tensors)
            features = model.backbone(batch.tensors)
            proposals, _ = model.rpn(batch, features)
            found, _ = model.roi_heads(features, proposals, batch.image_sizes)
        results = []
        for d, image_size, x in zip(found, batch.image_sizes, images):
            probs = d.pop("masks")  # pasted below over each box only, not by postprocess at full size
            d = model.transform.postprocess([d], [image_size], [(x.height, x.width)])[0]
            det = Detections(
                boxes=d["boxes"].float().cpu().numpy(),
                scores=d["scores"].float().cpu().numpy(),
                category_ids=self._index_to_id[d["labels"].cpu().numpy()],
                masks=paste_crops(probs, d["boxes"], x.height, x.width),
            )
            results.append(det.select(det.category_ids >= 0))  # classes outside the label map
        return results


def _fp32_anchors(_module: torch.nn.Module, args: tuple) -> tuple:
    """AnchorGenerator reads only the shape, dtype and device of the feature maps: hand it
    float32 stand-ins of the same shape (zero-stride, no memory) so anchors are made in fp32."""
    image_list, features = args
    return image_list, [torch.zeros((), dtype=torch.float32, device=f.device).expand(f.shape) for f in features]


def paste_crops(probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5) -> CroppedMasks:
    """torchvision's paste_masks_in_image, over each box only, thresholded `> threshold`.

    probs: (N, 1, M, M) mask probabilities; boxes: (N, 4) x0, y0, x1, y1 in the (height, width)
    image, on the model's device. The same steps as torchvision's paste_mask_in_image
    (expand_masks / expand_boxes by one pixel, integer box, bilinear resize to the box, the part
    inside the image), which we cannot call because it allocates the full image per mask.
    """
    if len(probs) == 0:
        return CroppedMasks.empty(height, width)
    with torch.autocast(probs.device.type, enabled=False):
        padded, scale = expand_masks(probs.float(), padding=1)
        int_boxes = expand_boxes(boxes.float(), scale).to(dtype=torch.int64).tolist()
        crops, regions = [], []
        for mask, (bx0, by0, bx1, by1) in zip(padded, int_boxes):
            w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
            resized = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            x0, x1, y0, y1 = max(bx0, 0), min(bx1 + 1, width), max(by0, 0), min(by1 + 1, height)
            x1, y1 = max(x1, x0), max(y1, y0)  # a box entirely outside the image pastes nothing
            crops.append(resized[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0] > threshold)
            regions.append([y0, x0, y1 - y0, x1 - x0])
    return crops_to_host(crops, np.asarray(regions, np.int64), height, width)


def _arch(cfg: ModelConfig) -> str:
    arch = cfg.model or DEFAULT_ARCH
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown torchvision model {arch!r}; use one of {', '.join(ARCHITECTURES)}")
    return arch


def _check_label_map(cfg: ModelConfig, label_map: dict[int, Category], num_classes: int) -> None:
    """A given label_map must name every class of the checkpoint (1..num_classes-1; 0 is the
    background): an unnamed class would silently drop its detections."""
    if max(label_map) >= num_classes:
        raise ValueError(f"checkpoint has {num_classes} classes but the label_map names index {max(label_map)}; "
                         "give a label_map that matches the checkpoint")
    missing = [i for i in range(1, num_classes) if i not in label_map]
    if cfg.label_map is not None and missing:
        raise ValueError(f"label_map names {num_classes - 1 - len(missing)} of the checkpoint's {num_classes - 1} "
                         f"classes (missing indices {_ranges(missing)}); name them all, and keep some with categories")


def _ranges(indices: list[int]) -> str:
    """[3, 4, 5, 9] -> '3..5, 9'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def load_state(path: str) -> dict[str, torch.Tensor]:
    """A state dict or a references/detection checkpoint, loaded with weights_only=True."""
    state = checkpoints.load_torch(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or CLS_WEIGHT not in state:
        raise checkpoints.CheckpointError(f"{path} is not a Mask R-CNN state dict (no {CLS_WEIGHT})")
    return state


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Every parameter must come from the checkpoint: a torchvision checkpoint is a whole model's
    state dict, so a missing or misshapen key means the wrong architecture (e.g. _v2 weights for
    the v1 model). Raises CheckpointError (one line) after a WARNING naming what would be left out."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshapen = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or misshapen:
        checkpoints.warn_missing(path, missing + misshapen, len(own))
        raise checkpoints.CheckpointError(
            f"{path} does not fit {type(model).__name__}: {len(missing)} keys missing"
            f" ({checkpoints.prefixes(missing) or '-'}), {len(misshapen)} of another shape"
            f" ({checkpoints.prefixes(misshapen) or '-'}), {len(unexpected)} unexpected; is it for another architecture?"
        )
    model.load_state_dict(state)


def _coco_label_map(weights_enum) -> dict[int, Category]:
    names = weights_enum.DEFAULT.meta["categories"]  # index == COCO category id
    return {i: Category(i, n) for i, n in enumerate(names) if i > 0 and n != "N/A"}

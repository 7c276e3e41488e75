"""detectron2 models for all four tasks, from a model-zoo config name or a YAML path.

Preprocessing is DefaultPredictor's, built from the same config: channel order from
INPUT.FORMAT, then ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST). It runs in the CPU
decode stage; the actor sends uint8 images to the device and calls the model with a list of
dicts carrying the original height/width. Instance masks are pasted at original resolution
over their boxes only, on the device, with detectron2's own paste (paste_crops); only the
crops reach the host. Outputs are converted the way detectron2's own evaluators convert them;
category ids go back to dataset ids through the metadata of DATASETS.TEST[0], as
COCOEvaluator does.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from batchseg.config import ModelConfig
from batchseg.inputs.imaging import resize_tensor
from batchseg.predictors import checkpoints, densepose_configs
from batchseg.predictors.base import (
    Categories, Category, CroppedMasks, Detections, DensePose, Keypoints, ModelInput, Panoptic, PanopticSegment,
    Preprocessor, autocast, load_label_map,
)
from batchseg.predictors.device import compute_in_fp32, crops_to_host, image_tensor, outputs_in_fp32


def build_cfg(cfg: ModelConfig, device: str = "cpu", densepose: bool = False):
    """ModelConfig -> a frozen detectron2 CfgNode (no weights are touched).

    cfg.options are detectron2 config keys (e.g. {"MODEL.PANOPTIC_FPN.COMBINE.ENABLED": true}).
    """
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    d2 = get_cfg()
    if densepose:
        from densepose import add_densepose_config

        add_densepose_config(d2)
        path = densepose_configs.resolve(cfg.model)
    else:
        path = _zoo_or_file(cfg.model or "", model_zoo)
    d2.merge_from_file(path)
    if cfg.min_size:
        d2.INPUT.MIN_SIZE_TEST = cfg.min_size
    if cfg.max_size:
        d2.INPUT.MAX_SIZE_TEST = cfg.max_size
    d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST = cfg.score_threshold
    d2.merge_from_list([x for kv in cfg.options.items() for x in kv])
    d2.MODEL.DEVICE = device
    d2.MODEL.WEIGHTS = ""
    d2.freeze()
    return d2


def _zoo_or_file(name: str, model_zoo) -> str:
    if os.path.isfile(name):
        return name
    try:
        return model_zoo.get_config_file(name if name.endswith(".yaml") else name + ".yaml")
    except RuntimeError:
        raise ValueError(
            f"detectron2 config {name!r} is neither a file nor a model-zoo name "
            "(e.g. COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml)"
        ) from None


@dataclass(frozen=True)
class D2Preprocess:
    """DefaultPredictor's preprocessing; equal instances share their output across tasks."""

    min_size: int
    max_size: int
    bgr: bool

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        from detectron2.data import transforms as T

        image = rgb[:, :, ::-1] if self.bgr else rgb
        aug = T.ResizeShortestEdge([self.min_size, self.min_size], self.max_size)
        return np.ascontiguousarray(aug.get_transform(image).apply_image(image))

    def on_device(self, rgb: torch.Tensor) -> torch.Tensor:
        """The same on a (3, H, W) uint8 RGB tensor, on its device: ResizeShortestEdge's output
        size, bilinear with antialias (imaging.resize_tensor), then the channel order."""
        from detectron2.data.transforms import ResizeShortestEdge

        size = ResizeShortestEdge.get_output_shape(*rgb.shape[-2:], self.min_size, self.max_size)
        image = resize_tensor(rgb, size)
        return image.flip(0) if self.bgr else image


class Detectron2Model:
    """Builds the model from the config, loads weights, runs list-of-dicts batched forwards.

    Under fp16/bf16 autocast the box predictor (class scores, box regression) computes in
    fp32, and mask/keypoint head outputs are cast to fp32 before they are decoded and pasted.
    """

    densepose = False

    def __init__(self, cfg: ModelConfig, weights: str | None, device: str, precision: str) -> None:
        from detectron2.modeling import build_model

        self.d2cfg = build_cfg(cfg, device, self.densepose)
        self.model = build_model(self.d2cfg).eval()
        if weights:
            load_weights(self.model, weights)
        self.cats = self.categories(cfg)
        self.device, self.precision = torch.device(device), precision
        _keep_decoding_in_fp32(self.model, self.device.type)

    @classmethod
    def preprocessor(cls, cfg: ModelConfig) -> Preprocessor:
        return _preprocessor(cls.densepose, cfg.model_dump_json())

    @classmethod
    def check_weights(cls, cfg: ModelConfig, path: str) -> None:
        """Before any work: `path` loads as a checkpoint (a dict), without running code."""
        data = checkpoints.load_pickle(path) if path.endswith(".pkl") else checkpoints.load_torch(path)
        if not isinstance(data, dict):
            raise checkpoints.CheckpointError(f"{path} is not a checkpoint (a {type(data).__name__})")

    @classmethod
    def default_weights(cls, cfg: ModelConfig) -> str:
        """The official model-zoo checkpoint for the configured zoo name."""
        from detectron2 import model_zoo

        if cls.densepose:
            return densepose_configs.default_weights(cfg.model)
        name = cfg.model or ""
        try:
            return model_zoo.get_checkpoint_url(name if name.endswith(".yaml") else name + ".yaml")
        except RuntimeError:
            raise ValueError(f"{name!r} is not a model-zoo name, so it has no default weights; set weights") from None

    @classmethod
    def categories(cls, cfg: ModelConfig) -> Categories:
        d2cfg = build_cfg(cfg, densepose=cls.densepose)
        return Categories(_things(d2cfg, load_label_map(cfg.label_map)))

    def _inputs(self, images: list[ModelInput]) -> list[dict[str, Any]]:
        """uint8 (3, h, w) tensors on the device: the model's normalisation (x - pixel_mean) /
        pixel_std turns them into float32 there, the same floats as converting on the host."""
        return [{"image": image_tensor(x.image, self.device), "height": x.height, "width": x.width} for x in images]

    @torch.no_grad()
    def forward(self, images: list[ModelInput]) -> list[dict[str, Any]]:
        """The model's own forward, postprocess included (panoptic)."""
        with autocast(str(self.device), self.precision):
            return self.model(self._inputs(images))

    @torch.no_grad()
    def instances(self, images: list[ModelInput]) -> list[Any]:
        """GeneralizedRCNN inference, then detectron2's detector_postprocess (scale, clip and
        filter boxes exactly as DefaultPredictor does) with the masks set aside, so nothing is
        pasted at full resolution: ROI mask probabilities come back in `roi_masks` (N, 1, M, M).
        Instances stay on the model's device.
        """
        from detectron2.modeling.postprocessing import detector_postprocess

        with autocast(str(self.device), self.precision):
            raw = self.model.inference(self._inputs(images), do_postprocess=False)
        out = []
        for inst, x in zip(raw, images):
            if inst.has("pred_masks"):
                inst.roi_masks = inst.pred_masks
                inst.remove("pred_masks")
            out.append(detector_postprocess(inst, x.height, x.width))
        return out

    def detected(self, inst) -> dict[str, np.ndarray]:
        """boxes, scores and dataset category ids of an Instances, as host result fields."""
        return {
            "boxes": inst.pred_boxes.tensor.float().cpu().numpy(),
            "scores": inst.scores.float().cpu().numpy(),
            "category_ids": np.array([self.cats.things[int(c)].id for c in inst.pred_classes.tolist()], np.int64),
        }


@functools.lru_cache(maxsize=8)
def _preprocessor(densepose: bool, cfg_json: str) -> D2Preprocess:
    d2 = build_cfg(ModelConfig.model_validate_json(cfg_json), densepose=densepose)
    return D2Preprocess(d2.INPUT.MIN_SIZE_TEST, d2.INPUT.MAX_SIZE_TEST, d2.INPUT.FORMAT == "BGR")


def _keep_decoding_in_fp32(model: torch.nn.Module, device_type: str) -> None:
    """Box predictors compute in fp32; mask and keypoint head outputs are cast to fp32."""
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

    for module in model.modules():
        if isinstance(module, FastRCNNOutputLayers):
            compute_in_fp32(module, device_type)
    heads = getattr(model, "roi_heads", None)
    for head, last_layer in (("mask_head", "predictor"), ("keypoint_head", "score_lowres")):
        layer = getattr(getattr(heads, head, None), last_layer, None)
        if isinstance(layer, torch.nn.Module):  # the head's last layer: its logits get decoded/pasted
            outputs_in_fp32(layer)


def paste_crops(roi_masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                threshold: float = 0.5, chunk: int | None = None) -> CroppedMasks:
    """Paste ROI masks over their boxes only, as detectron2's CPU path does, and move the crops.

    roi_masks: (N, 1, M, M) mask probabilities; boxes: (N, 4) x0, y0, x1, y1 in the
    (height, width) image; both on the model's device. Each mask is pasted by detectron2's
    own `_do_paste_mask(skip_empty=True)` and thresholded `>= threshold` as
    `paste_masks_in_image` does, so every pixel equals DefaultPredictor's full mask; the
    crop is the box plus one pixel, clipped ((floor(x0) - 1, ceil(x1) + 1), as it pastes).

    chunk: masks pasted per call. 1 on CPU (detectron2's choice: minimal work); on a GPU one
    call per chunk over the chunk's union box, sized like detectron2's GPU_MEM_LIMIT, so
    launches stay few; crops are then views into that region. Both give identical pixels:
    each pixel's sampling grid is computed by the same float32 formula.
    """
    from detectron2.layers.mask_ops import BYTES_PER_FLOAT, GPU_MEM_LIMIT, _do_paste_mask

    n = len(roi_masks)
    if n == 0:
        return CroppedMasks.empty(height, width)
    with torch.autocast(roi_masks.device.type, enabled=False):
        roi_masks, boxes = roi_masks.float(), boxes.float()
        host = boxes.cpu().numpy()
        x0 = np.maximum(np.floor(host[:, 0]) - 1, 0).astype(np.int64)
        y0 = np.maximum(np.floor(host[:, 1]) - 1, 0).astype(np.int64)
        x1 = np.minimum(np.ceil(host[:, 2]) + 1, width).astype(np.int64)
        y1 = np.minimum(np.ceil(host[:, 3]) + 1, height).astype(np.int64)
        if chunk is None:
            union = (y1.max() - y0.min()) * (x1.max() - x0.min())
            chunk = 1 if roi_masks.device.type == "cpu" else max(1, int(GPU_MEM_LIMIT // (union * BYTES_PER_FLOAT)))
        crops = []
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            pasted, _ = _do_paste_mask(roi_masks[part], boxes[part], height, width, skip_empty=True)
            pasted = pasted >= threshold
            uy, ux = y0[part].min(), x0[part].min()
            for k in range(start, min(start + chunk, n)):
                crops.append(pasted[k - start, y0[k] - uy:y1[k] - uy, x0[k] - ux:x1[k] - ux])
    regions = np.stack([y0, x0, y1 - y0, x1 - x0], axis=1)
    return crops_to_host(crops, regions, height, width)


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load a detectron2 checkpoint without executing code from it.

    `.pkl` (model zoo, Caffe2/Detectron1): checkpoints.load_pickle (numpy arrays only); anything
    else: torch.load(weights_only=True). Then detectron2's own loading (name-matching heuristics,
    Caffe2 conversion, shape checks). Parameters left unloaded are logged as a WARNING naming
    how many and under which prefixes; a file that is not a checkpoint raises CheckpointError.
    """
    from detectron2.checkpoint import DetectionCheckpointer

    class SafeCheckpointer(DetectionCheckpointer):
        def _load_file(self, filename: str) -> dict[str, Any]:
            if not filename.endswith(".pkl"):  # .pth -> _torch_load below; pycls .pyth: torch's default,
                return super()._load_file(filename)  # weights_only=True since torch 2.6
            data = checkpoints.load_pickle(filename)
            if not isinstance(data, dict):
                raise checkpoints.CheckpointError(f"{filename} is not a checkpoint (a pickled {type(data).__name__})")
            # the same reading of the two .pkl layouts as DetectionCheckpointer._load_file
            if "model" in data and "__author__" in data:
                return data
            data = data.get("blobs", data)
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

        def _torch_load(self, f: str) -> dict[str, Any]:
            data = checkpoints.load_torch(f)
            if not isinstance(data, dict):
                raise checkpoints.CheckpointError(f"{f} is not a checkpoint (a {type(data).__name__})")
            return data

        def _log_incompatible_keys(self, incompatible) -> None:
            super()._log_incompatible_keys(incompatible)
            unloaded = [*incompatible.missing_keys, *(k for k, *_ in incompatible.incorrect_shapes)]
            checkpoints.warn_missing(path, unloaded, len(self.model.state_dict()))

    SafeCheckpointer(model).load(path)


class Detectron2Backend(Detectron2Model):
    """instance: boxes, scores, dataset ids and masks cropped to their boxes."""

    def predict(self, images: list[ModelInput]) -> list[Detections]:
        results = []
        for inst in self.instances(images):
            height, width = inst.image_size
            masks = paste_crops(inst.roi_masks, inst.pred_boxes.tensor, height, width)
            results.append(Detections(**self.detected(inst), masks=masks))
        return results


class Detectron2KeypointBackend(Detectron2Model):
    """keypoint: people with (K, 3) keypoints [x, y, score] and the keypoint tables."""

    @classmethod
    def categories(cls, cfg: ModelConfig) -> Categories:
        from detectron2.data import MetadataCatalog

        d2cfg = build_cfg(cfg)
        meta = MetadataCatalog.get(d2cfg.DATASETS.TEST[0]) if d2cfg.DATASETS.TEST else None
        names = tuple(meta.get("keypoint_names", ())) if meta else ()
        if len(names) != d2cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS:
            raise ValueError("config's dataset metadata names no keypoints for this model")
        index = {n: i + 1 for i, n in enumerate(names)}
        skeleton = tuple((index[a], index[b]) for a, b, *_ in meta.get("keypoint_connection_rules", ()))
        return Categories(_things(d2cfg, load_label_map(cfg.label_map)), keypoint_names=names, skeleton=skeleton)

    def predict(self, images: list[ModelInput]) -> list[Keypoints]:
        return [
            Keypoints(**self.detected(inst), keypoints=inst.pred_keypoints.float().cpu().numpy())
            for inst in self.instances(images)
        ]


class Detectron2PanopticBackend(Detectron2Model):
    """panoptic: the id map and segments, ids mapped as COCOPanopticEvaluator maps them.

    detectron2 combines full-resolution instance masks with the semantic map on the device;
    only the id map comes to the host, in the narrowest dtype that holds its ids, column-major.
    """

    @classmethod
    def categories(cls, cfg: ModelConfig) -> Categories:
        from detectron2.data import MetadataCatalog

        d2cfg = build_cfg(cfg)
        meta = MetadataCatalog.get(d2cfg.DATASETS.TEST[0])
        stuff_names = meta.get("stuff_classes", None)
        to_contiguous = meta.get("stuff_dataset_id_to_contiguous_id", None)
        if stuff_names is None or to_contiguous is None:
            raise ValueError(f"metadata of {d2cfg.DATASETS.TEST[0]!r} has no stuff categories; is this a panoptic config?")
        stuff = {index: Category(int(ds_id), stuff_names[index]) for ds_id, index in to_contiguous.items()}
        return Categories(_things(d2cfg, load_label_map(cfg.label_map)), stuff=stuff)

    def predict(self, images: list[ModelInput]) -> list[Panoptic]:
        results = []
        for out in self.forward(images):
            id_map, segments_info = out["panoptic_seg"]
            segments = []
            for seg in segments_info:
                table = self.cats.things if seg["isthing"] else self.cats.stuff
                segments.append(PanopticSegment(
                    id=int(seg["id"]), category_id=table[int(seg["category_id"])].id,
                    isthing=bool(seg["isthing"]), score=float(seg["score"]) if "score" in seg else None,
                ))
            largest = max((s.id for s in segments), default=0)
            narrow = torch.uint8 if largest < 2**8 else torch.int16 if largest < 2**15 else torch.int32
            column_major = id_map.to(narrow).t().contiguous().cpu().numpy().T  # transposed on the device
            results.append(Panoptic(id_map=column_major, segments=segments))
        return results


class DensePoseBackend(Detectron2Model):
    """densepose: chart results quantized as DensePose's evaluator quantizes them.

    Charts are resampled over each box and quantized on the device (in fp32); only the
    (3, h, w) uint8 charts come to the host, and the foreground mask is their I > 0 placed
    where DensePose's ToMaskConverter pastes it: at the integer box (x, y, w, h), clipped to
    the image.
    """

    densepose = True

    @classmethod
    def categories(cls, cfg: ModelConfig) -> Categories:
        given = load_label_map(cfg.label_map)
        return Categories(given or {0: Category(1, "person")})  # DensePose R-CNN is a person model

    def predict(self, images: list[ModelInput]) -> list[DensePose]:
        results = []
        for inst in self.instances(images):
            height, width = inst.image_size
            if not len(inst):  # DensePose's head adds no pred_densepose to an empty result
                results.append(DensePose.empty(height, width))
                continue
            detected = self.detected(inst)
            iuv = _charts_to_host(_float_fields(inst.pred_densepose), inst.pred_boxes)
            results.append(DensePose(**detected, iuv=iuv, masks=_foregrounds(iuv, detected["boxes"], height, width)))
        return results


def _float_fields(output: Any) -> Any:
    """A DensePose predictor output (a dataclass of tensors) with its floating fields in fp32."""
    values = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    return dataclasses.replace(output, **{
        k: v.float() for k, v in values.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
    })


def _charts_to_host(pred_densepose: Any, boxes: Any) -> list[np.ndarray]:
    """DensePose's ToChartResultConverter + quantize_densepose_chart_result per person, on the
    device; the (3, h_k, w_k) uint8 charts cross to the host in one copy."""
    from densepose.converters import ToChartResultConverter
    from densepose.structures import quantize_densepose_chart_result

    charts = [
        quantize_densepose_chart_result(ToChartResultConverter.convert(pred_densepose[k], boxes[k])).labels_uv_uint8
        for k in range(len(boxes))
    ]
    flat = torch.cat([c.reshape(-1) for c in charts]).cpu().numpy()
    ends = np.cumsum([c.numel() for c in charts])[:-1]
    return [part.reshape(c.shape) for part, c in zip(np.split(flat, ends), charts)]


def _foregrounds(iuv: list[np.ndarray], boxes: np.ndarray, height: int, width: int) -> CroppedMasks:
    """Where ToMaskConverter (predictor_output_with_fine_and_coarse_segm_to_mask) pastes each
    chart's I > 0: masks[y:y + h, x:x + w] with (x, y, w, h) = make_int_box of the XYWH box
    (float32 w = x1 - x0, truncated toward zero), so rows/columns past the image are dropped
    and a box under one pixel wide or high pastes nothing (its chart is still 1 pixel)."""
    xywh = boxes.astype(np.float32).copy()
    xywh[:, 2:] -= xywh[:, :2]
    offsets, crops = [], []
    for (x, y, w, h), chart in zip(np.trunc(xywh).astype(np.int64).tolist(), iuv):
        h, w = max(min(h, height - y), 0), max(min(w, width - x), 0)
        offsets.append([y, x])
        crops.append(np.asfortranarray(chart[0, :h, :w] > 0))
    return CroppedMasks(height, width, np.asarray(offsets, np.int64).reshape(-1, 2), tuple(crops))


def _things(d2cfg, label_map: dict[int, Category] | None) -> dict[int, Category]:
    """Model thing index 0..N-1 -> dataset category: the label map, else the config's metadata."""
    num_classes = d2cfg.MODEL.ROI_HEADS.NUM_CLASSES
    label_map = label_map or _things_from_metadata(d2cfg, num_classes)
    missing = [i for i in range(num_classes) if i not in label_map]
    if missing:
        raise ValueError(f"label_map lacks model class indices {missing[:5]}; it must cover 0..{num_classes - 1}")
    return label_map


def _things_from_metadata(d2cfg, num_classes: int) -> dict[int, Category]:
    """thing_dataset_id_to_contiguous_id when the metadata has it; else the class names looked
    up in COCO's table (keypoint metadata only names 'person' until its JSON is loaded)."""
    from detectron2.data import MetadataCatalog

    if not d2cfg.DATASETS.TEST:
        raise ValueError("config names no DATASETS.TEST to take categories from; give a label_map")
    meta = MetadataCatalog.get(d2cfg.DATASETS.TEST[0])
    names = meta.get("thing_classes", None)
    if names is None or len(names) != num_classes:
        raise ValueError(f"metadata of {d2cfg.DATASETS.TEST[0]!r} has no thing_classes for {num_classes} classes; give a label_map")
    to_contiguous = meta.get("thing_dataset_id_to_contiguous_id", None)
    if to_contiguous is None:
        coco = MetadataCatalog.get("coco_2017_val")
        coco_ids = {coco.thing_classes[i]: ds_id for ds_id, i in coco.thing_dataset_id_to_contiguous_id.items()}
        if not all(n in coco_ids for n in names):
            raise ValueError(f"cannot map classes {names} of {d2cfg.DATASETS.TEST[0]!r} to dataset ids; give a label_map")
        to_contiguous = {coco_ids[n]: i for i, n in enumerate(names)}
    return {index: Category(int(ds_id), names[index]) for ds_id, index in to_contiguous.items()}

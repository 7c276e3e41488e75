"""detectron2 models for all four tasks, from a model-zoo config name or a YAML path.

Preprocessing is DefaultPredictor's, built from the same config: channel order from
INPUT.FORMAT, then ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST). It runs in the CPU
decode stage; the actor only turns arrays into tensors and calls the model with a list of
dicts carrying the original height/width, so detectron2 pastes masks at original resolution.
Outputs are converted the way detectron2's own evaluators convert them; category ids go back
to dataset ids through the metadata of DATASETS.TEST[0], as COCOEvaluator does.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from batchseg.config import ModelConfig
from batchseg.predictors import densepose_configs
from batchseg.predictors.base import (
    Categories, Category, Detections, DensePose, Keypoints, ModelInput, Panoptic, PanopticSegment,
    Preprocessor, autocast, load_label_map,
)


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


class Detectron2Model:
    """Builds the model from the config, loads weights, runs list-of-dicts batched forwards."""

    densepose = False

    def __init__(self, cfg: ModelConfig, weights: str | None, device: str, precision: str) -> None:
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.modeling import build_model

        self.d2cfg = build_cfg(cfg, device, self.densepose)
        self.model = build_model(self.d2cfg).eval()
        if weights:
            DetectionCheckpointer(self.model).load(weights)
        self.cats = self.categories(cfg)
        self.autocast = autocast(device, precision)

    @classmethod
    def preprocessor(cls, cfg: ModelConfig) -> Preprocessor:
        return _preprocessor(cls.densepose, cfg.model_dump_json())

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

    @torch.no_grad()
    def forward(self, images: list[ModelInput]) -> list[dict[str, Any]]:
        inputs = [
            {"image": torch.as_tensor(x.image.astype("float32").transpose(2, 0, 1)), "height": x.height, "width": x.width}
            for x in images
        ]
        with self.autocast:
            return self.model(inputs)

    def detected(self, inst) -> dict[str, np.ndarray]:
        """boxes, scores and dataset category ids of a CPU Instances, as result fields."""
        return {
            "boxes": inst.pred_boxes.tensor.float().numpy(),
            "scores": inst.scores.float().numpy(),
            "category_ids": np.array([self.cats.things[int(c)].id for c in inst.pred_classes], np.int64),
        }


@functools.lru_cache(maxsize=8)
def _preprocessor(densepose: bool, cfg_json: str) -> D2Preprocess:
    d2 = build_cfg(ModelConfig.model_validate_json(cfg_json), densepose=densepose)
    return D2Preprocess(d2.INPUT.MIN_SIZE_TEST, d2.INPUT.MAX_SIZE_TEST, d2.INPUT.FORMAT == "BGR")


class Detectron2Backend(Detectron2Model):
    """instance: boxes, scores, dataset ids and full-resolution masks."""

    def predict(self, images: list[ModelInput]) -> list[Detections]:
        results = []
        for out in self.forward(images):
            inst = out["instances"].to("cpu")
            results.append(Detections(**self.detected(inst), masks=inst.pred_masks.numpy().astype(bool)))
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
        results = []
        for out in self.forward(images):
            inst = out["instances"].to("cpu")
            results.append(Keypoints(**self.detected(inst), keypoints=inst.pred_keypoints.float().numpy()))
        return results


class Detectron2PanopticBackend(Detectron2Model):
    """panoptic: the id map and segments, ids mapped as COCOPanopticEvaluator maps them."""

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
            results.append(Panoptic(id_map=id_map.cpu().numpy().astype(np.int32), segments=segments))
        return results


class DensePoseBackend(Detectron2Model):
    """densepose: chart results quantized as DensePose's evaluator quantizes them."""

    densepose = True

    @classmethod
    def categories(cls, cfg: ModelConfig) -> Categories:
        given = load_label_map(cfg.label_map)
        return Categories(given or {0: Category(1, "person")})  # DensePose R-CNN is a person model

    def predict(self, images: list[ModelInput]) -> list[DensePose]:
        from densepose.converters import ToChartResultConverter, ToMaskConverter
        from densepose.structures import quantize_densepose_chart_result

        results = []
        for out in self.forward(images):
            inst = out["instances"].to("cpu")
            if not len(inst):  # DensePose's head adds no pred_densepose to an empty result
                results.append(DensePose.empty(*inst.image_size))
                continue
            masks = ToMaskConverter.convert(inst.pred_densepose, inst.pred_boxes, inst.image_size).tensor.numpy()
            results.append(DensePose(
                **self.detected(inst),
                iuv=[
                    quantize_densepose_chart_result(
                        ToChartResultConverter.convert(inst.pred_densepose[k], inst.pred_boxes[k])
                    ).labels_uv_uint8.numpy()
                    for k in range(len(inst))
                ],
                masks=masks.astype(bool),
            ))
        return results


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


BACKENDS = {
    "instance": Detectron2Backend,
    "panoptic": Detectron2PanopticBackend,
    "keypoint": Detectron2KeypointBackend,
    "densepose": DensePoseBackend,
}

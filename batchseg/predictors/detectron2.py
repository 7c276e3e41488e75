"""detectron2 models from a model-zoo config name or a YAML path.

Preprocessing is DefaultPredictor's, built from the same config: channel order from
INPUT.FORMAT, then ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST). It runs in the CPU
decode stage; the actor only stacks tensors and calls the model with a list of dicts carrying
the original height/width, so detectron2 pastes masks at original resolution itself.
Category ids are mapped back to dataset ids through the metadata of DATASETS.TEST[0]
(`thing_dataset_id_to_contiguous_id`), as detectron2's COCOEvaluator does.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from batchseg.config import ModelConfig
from batchseg.predictors.base import Category, Detections, ModelInput, Preprocessor, autocast, load_label_map


def build_cfg(cfg: ModelConfig, device: str = "cpu"):
    """ModelConfig -> a frozen detectron2 CfgNode (no weights are touched)."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    name = cfg.model or ""
    d2 = get_cfg()
    if os.path.isfile(name):
        d2.merge_from_file(name)
    else:
        zoo_name = name if name.endswith(".yaml") else name + ".yaml"
        try:
            d2.merge_from_file(model_zoo.get_config_file(zoo_name))
        except RuntimeError:
            raise ValueError(
                f"detectron2 config {name!r} is neither a file nor a model-zoo name "
                "(e.g. COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml)"
            ) from None
    if cfg.min_size:
        d2.INPUT.MIN_SIZE_TEST = cfg.min_size
    if cfg.max_size:
        d2.INPUT.MAX_SIZE_TEST = cfg.max_size
    d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST = cfg.score_threshold
    d2.MODEL.DEVICE = device
    d2.MODEL.WEIGHTS = ""
    d2.freeze()
    return d2


@functools.lru_cache(maxsize=8)
def _preprocessor_for(cfg_json: str) -> Preprocessor:
    from detectron2.data import transforms as T

    d2 = build_cfg(ModelConfig.model_validate_json(cfg_json))
    aug = T.ResizeShortestEdge([d2.INPUT.MIN_SIZE_TEST, d2.INPUT.MIN_SIZE_TEST], d2.INPUT.MAX_SIZE_TEST)
    bgr = d2.INPUT.FORMAT == "BGR"

    def preprocess(rgb: np.ndarray) -> np.ndarray:
        image = rgb[:, :, ::-1] if bgr else rgb
        return np.ascontiguousarray(aug.get_transform(image).apply_image(image))

    return preprocess


class Detectron2Backend:
    def __init__(self, cfg: ModelConfig, weights: str | None, device: str, precision: str) -> None:
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.modeling import build_model

        self.d2cfg = build_cfg(cfg, device)
        self.model = build_model(self.d2cfg).eval()
        if weights:
            DetectionCheckpointer(self.model).load(weights)
        label_map = self.label_map(cfg)
        self._index_to_id = np.array([label_map[i].id for i in range(len(label_map))], np.int64)
        self.device = device
        self.autocast = autocast(device, precision)

    @staticmethod
    def label_map(cfg: ModelConfig) -> dict[int, Category]:
        """From cfg.label_map (contiguous index 0..N-1), else the metadata of DATASETS.TEST[0]."""
        d2cfg = build_cfg(cfg)
        num_classes = d2cfg.MODEL.ROI_HEADS.NUM_CLASSES
        label_map = load_label_map(cfg.label_map) or _label_map_from_metadata(d2cfg, num_classes)
        missing = [i for i in range(num_classes) if i not in label_map]
        if missing:
            raise ValueError(f"label_map lacks model class indices {missing[:5]}; it must cover 0..{num_classes - 1}")
        return label_map

    @staticmethod
    def preprocessor(cfg: ModelConfig) -> Preprocessor:
        return _preprocessor_for(cfg.model_dump_json())

    @torch.no_grad()
    def predict(self, images: list[ModelInput]) -> list[Detections]:
        inputs = [
            {
                "image": torch.as_tensor(x.image.astype("float32").transpose(2, 0, 1)),
                "height": x.height,
                "width": x.width,
            }
            for x in images
        ]
        with self.autocast:
            outputs = self.model(inputs)
        results = []
        for out in outputs:
            inst = out["instances"].to("cpu")
            results.append(
                Detections(
                    boxes=inst.pred_boxes.tensor.float().numpy(),
                    scores=inst.scores.float().numpy(),
                    category_ids=self._index_to_id[inst.pred_classes.numpy()],
                    masks=inst.pred_masks.numpy().astype(bool),
                )
            )
        return results


def _label_map_from_metadata(d2cfg, num_classes: int) -> dict[int, Category]:
    from detectron2.data import MetadataCatalog

    if not d2cfg.DATASETS.TEST:
        raise ValueError("config names no DATASETS.TEST to take categories from; give a label_map")
    meta = MetadataCatalog.get(d2cfg.DATASETS.TEST[0])
    names = meta.get("thing_classes", None)
    if names is None or len(names) != num_classes:
        raise ValueError(f"metadata of {d2cfg.DATASETS.TEST[0]!r} has no thing_classes for {num_classes} classes; give a label_map")
    to_contiguous = meta.get("thing_dataset_id_to_contiguous_id", None) or {i: i for i in range(num_classes)}
    return {index: Category(int(ds_id), names[index]) for ds_id, index in to_contiguous.items()}

"""Panoptic, keypoint and DensePose parity with detectron2, converted as its evaluators convert.

Random-init weights saved to a file and loaded by both sides; skipped without detectron2 /
DensePose. Thresholds are opened up (score 0, combine limits 0) so random models output
plenty to compare.
"""

import numpy as np
import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed (see docs/backends.md: detectron2 and DensePose)")

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.evaluation.coco_evaluation import instances_to_coco_json  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from batchseg.config import ModelConfig  # noqa: E402
from batchseg.rows.encoding import decode_iuv, decode_panoptic, encode_densepose, encode_keypoints, encode_panoptic  # noqa: E402
from batchseg.inputs.imaging import decode_rgb  # noqa: E402
from batchseg.predictors.base import ModelInput  # noqa: E402
from batchseg.predictors.base import backend_class  # noqa: E402
from batchseg.predictors.detectron2 import build_cfg  # noqa: E402
from tests.conftest import random_boxes  # noqa: E402

IMAGES = ["street/scene_a.png", "park/scene_c.bmp", "odd/rotated_exif6.png"]
SMALL = {"min_size": 160, "max_size": 256, "score_threshold": 0.0, "random_init": True}
PANOPTIC_OPEN = {
    "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH": 0.0,
    "MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT": 0,
}
MODELS = {
    "instance": ModelConfig(backend="detectron2", model="COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", **SMALL),
    "panoptic": ModelConfig(backend="detectron2", model="COCO-PanopticSegmentation/panoptic_fpn_R_50_3x.yaml",
                            options=PANOPTIC_OPEN, **SMALL),
    "keypoint": ModelConfig(backend="detectron2", model="COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml", **SMALL),
    "densepose": ModelConfig(backend="detectron2", model="densepose_rcnn_R_50_FPN_s1x", **SMALL),
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """task -> random-init weights file, saved the way detectron2 saves checkpoints."""
    out = {}
    for task, cfg in MODELS.items():
        if task == "densepose":
            pytest.importorskip("densepose")
        torch.manual_seed(0)
        model = build_model(build_cfg(cfg, densepose=task == "densepose"))
        # random box heads give scores near 0 and degenerate boxes; zeroed, every proposal
        # becomes a detection with even scores, so both sides (same file) have plenty to compare
        for layer in (model.roi_heads.box_predictor.cls_score, model.roi_heads.box_predictor.bbox_pred):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
        if hasattr(model.roi_heads, "keypoint_head"):  # random heatmaps overflow exp() when decoded
            torch.nn.init.normal_(model.roi_heads.keypoint_head.score_lowres.weight, std=1e-4)
        folder = tmp_path_factory.mktemp(f"{task}_weights")
        DetectionCheckpointer(model, save_dir=str(folder)).save("random_init")
        out[task] = str(folder / "random_init.pth")
    return out


def _ours(task, weights, rgb):
    backend_cls = backend_class("detectron2", task)
    cfg = MODELS[task]
    backend = backend_cls(cfg, weights[task], "cpu", "fp32")
    x = ModelInput("x", backend_cls.preprocessor(cfg)(rgb), *rgb.shape[:2])
    return backend.predict([x])[0], backend


def _theirs(task, weights, rgb):
    d2cfg = build_cfg(MODELS[task], densepose=task == "densepose").clone()
    d2cfg.defrost()
    d2cfg.MODEL.WEIGHTS = weights[task]
    return DefaultPredictor(d2cfg)(np.ascontiguousarray(rgb[:, :, ::-1])), d2cfg


def _rgb(samples, name):
    return decode_rgb((samples.root / name).read_bytes(), 10**8)


@pytest.mark.parametrize("name", IMAGES)
def test_keypoints_equal_instances_to_coco_json(samples, weights, name):
    rgb = _rgb(samples, name)
    outputs, _ = _theirs("keypoint", weights, rgb)
    expected = instances_to_coco_json(outputs["instances"].to("cpu"), 0)
    result, _ = _ours("keypoint", weights, rgb)
    got = encode_keypoints(result, 0.0)
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        assert g["category_id"] == 1 and e["category_id"] == 0  # dataset id vs contiguous index
        assert g["score"] == pytest.approx(e["score"], abs=1e-6)
        assert g["bbox"] == pytest.approx(e["bbox"], abs=1e-3)
        assert g["keypoints"] == pytest.approx(e["keypoints"], abs=1e-3)


def test_keypoint_tables_in_coco_order(weights):
    cats = backend_class("detectron2", "keypoint").categories(MODELS["keypoint"])
    assert cats.keypoint_names[:3] == ("nose", "left_eye", "right_eye") and len(cats.keypoint_names) == 17
    assert (cats.keypoint_names.index("left_shoulder") + 1, cats.keypoint_names.index("left_elbow") + 1) in cats.skeleton
    assert cats.table()["things"] == [{"id": 1, "name": "person"}]


@pytest.mark.parametrize("name", IMAGES)
def test_panoptic_equals_coco_panoptic_evaluator_conversion(samples, weights, name):
    rgb = _rgb(samples, name)
    outputs, d2cfg = _theirs("panoptic", weights, rgb)
    id_map, segments_info = outputs["panoptic_seg"]
    meta = MetadataCatalog.get(d2cfg.DATASETS.TEST[0])  # COCOPanopticEvaluator's own mapping
    things = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    stuff = {v: k for k, v in meta.stuff_dataset_id_to_contiguous_id.items()}
    expected = sorted(
        ({"id": s["id"], "isthing": s["isthing"],
          "category_id": (things if s["isthing"] else stuff)[s["category_id"]]} for s in segments_info),
        key=lambda s: s["id"],
    )
    result, _ = _ours("panoptic", weights, rgb)
    got = encode_panoptic(result)
    assert len(got) == len(expected) > 0
    assert [{k: g[k] for k in ("id", "isthing", "category_id")} for g in got] == expected
    assert any(g["isthing"] for g in got) and any(not g["isthing"] for g in got)
    assert np.array_equal(decode_panoptic(got, *rgb.shape[:2]), id_map.numpy())


@pytest.mark.parametrize("name", IMAGES)
def test_densepose_equals_the_densepose_evaluator_result(samples, weights, name):
    pytest.importorskip("densepose")
    from densepose.evaluation.evaluator import prediction_to_dict

    rgb = _rgb(samples, name)
    outputs, _ = _theirs("densepose", weights, rgb)
    expected = prediction_to_dict(outputs["instances"].to("cpu"), 0, None, None, False)
    result, _ = _ours("densepose", weights, rgb)
    got = encode_densepose(result, 0.0)
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        assert g["category_id"] == 1 and g["score"] == pytest.approx(e["score"], abs=1e-6)
        assert g["bbox"] == pytest.approx(e["bbox"], abs=1e-3)
        assert np.array_equal(decode_iuv(g["iuv_png"]), e["densepose"].labels_uv_uint8.numpy())
        assert g["segmentation"]["counts"] == e["segmentation"]["counts"]


def test_densepose_foreground_crops_equal_to_mask_converter_for_boxes_on_every_border():
    """Our foreground crops (I > 0 of the quantized chart, at the integer box, clipped) equal
    DensePose's ToMaskConverter full-image masks, for boxes on every border and under a pixel."""
    pytest.importorskip("densepose")
    from densepose.converters import ToMaskConverter
    from densepose.structures import DensePoseChartPredictorOutput
    from detectron2.structures import Boxes

    from batchseg.predictors.detectron2 import _charts_to_host, _foregrounds

    rng = np.random.default_rng(0)
    height, width, n = 41, 57, 60
    boxes = random_boxes(rng, height, width, n)
    boxes[:5] = [[0, 0, width, height], [3.5, 4.2, 3.9, 30], [10, 10, 40, 10.7], [0.2, 0.3, 0.9, 0.95],
                 [width - 0.4, height - 0.6, width, height]]
    boxes = Boxes(torch.from_numpy(boxes).float())
    output = DensePoseChartPredictorOutput(
        coarse_segm=torch.randn(n, 2, 16, 16), fine_segm=torch.randn(n, 25, 16, 16),
        u=torch.rand(n, 25, 16, 16), v=torch.rand(n, 25, 16, 16),
    )
    expected = ToMaskConverter.convert(output, boxes, (height, width)).tensor.numpy()
    got = _foregrounds(_charts_to_host(output, boxes), boxes.tensor.numpy(), height, width)
    for i in range(n):
        assert np.array_equal(got.full(i), expected[i]), i

"""detectron2 backend: parity with DefaultPredictor, and a pipeline run. Skipped without detectron2."""

import numpy as np
import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed (see README: detectron2 and DensePose)")

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.evaluation.coco_evaluation import instances_to_coco_json  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from batchseg.config import ModelConfig  # noqa: E402
from batchseg.encoding import encode_instances  # noqa: E402
from batchseg.imaging import decode_rgb  # noqa: E402
from batchseg.predictors.base import ModelInput  # noqa: E402
from batchseg.predictors.detectron2 import Detectron2Backend, build_cfg  # noqa: E402
from tests.conftest import read_rows, run_job  # noqa: E402

ZOO = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
IMAGES = ["street/scene_a.png", "park/scene_c.bmp", "odd/rotated_exif6.png", "odd/wide_strip.png"]


@pytest.fixture(scope="module")
def d2_model(tmp_path_factory):
    """(ModelConfig, weights path): random-init R50-FPN Mask R-CNN saved the way detectron2 saves."""
    cfg = ModelConfig(backend="detectron2", model=ZOO, score_threshold=0.0, min_size=160, max_size=256, random_init=True)
    torch.manual_seed(0)
    model = build_model(build_cfg(cfg))
    save_dir = tmp_path_factory.mktemp("d2weights")
    DetectionCheckpointer(model, save_dir=str(save_dir)).save("random_init")
    return cfg, str(save_dir / "random_init.pth")


def _reference(cfg, weights, rgb):
    """What detectron2 itself gives: DefaultPredictor on BGR, then instances_to_coco_json."""
    d2cfg = build_cfg(cfg).clone()
    d2cfg.defrost()
    d2cfg.MODEL.WEIGHTS = weights
    predictor = DefaultPredictor(d2cfg)
    instances = predictor(np.ascontiguousarray(rgb[:, :, ::-1]))["instances"].to("cpu")
    to_dataset = {v: k for k, v in predictor.metadata.thing_dataset_id_to_contiguous_id.items()}
    results = instances_to_coco_json(instances, img_id=0)
    for r in results:
        r["category_id"] = to_dataset[r["category_id"]]
    return results


@pytest.mark.parametrize("name", IMAGES)
def test_rows_equal_default_predictor(samples, d2_model, name):
    cfg, weights = d2_model
    rgb = decode_rgb((samples.root / name).read_bytes(), 10**8)
    expected = _reference(cfg, weights, rgb)

    backend = Detectron2Backend(cfg, weights, "cpu", "fp32")
    x = ModelInput(name, Detectron2Backend.preprocessor(cfg)(rgb), *rgb.shape[:2])
    got = encode_instances(backend.predict([x])[0], cfg.score_threshold)

    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        assert g["category_id"] == e["category_id"]
        assert g["score"] == pytest.approx(e["score"], abs=1e-6)
        assert g["bbox"] == pytest.approx(e["bbox"], abs=1e-3)
        assert g["segmentation"]["counts"] == e["segmentation"]["counts"]  # detectron2 decodes to str too
        assert g["segmentation"]["size"] == list(e["segmentation"]["size"])


def test_label_map_comes_from_coco_metadata(d2_model):
    label_map = Detectron2Backend.categories(d2_model[0]).things
    assert len(label_map) == 80
    assert label_map[0].id == 1 and label_map[0].name == "person" and label_map[79].id == 90


def test_detectron2_through_the_pipeline(ray_cluster, samples, d2_model, tmp_path):
    cfg, weights = d2_model
    model = {**cfg.model_dump(), "weights": weights, "random_init": False, "score_threshold": 0.05}
    _, summary = run_job(
        inputs=[str(samples.root / "street"), str(samples.root / "bad")], output=str(tmp_path),
        models={"instance": model}, batch_size=2,
    )
    rows = read_rows(str(tmp_path / "annotations"))
    assert len(rows) == 6 and summary["images"] == {"in": 6, "annotated": 2, "failed": 4}
    coco_ids = {c["id"] for c in summary["categories"]["instance"]["things"]}
    assert all(i["category_id"] in coco_ids for r in rows for i in r["instances"] or [])
    assert summary["versions"]["detectron2"]


def test_unknown_zoo_config_fails_preflight():
    from batchseg.config import ConfigError

    with pytest.raises(ConfigError, match="neither a file nor a model-zoo name"):
        run_job(inputs=["/tmp"], output="/tmp/never", models={"instance": {"backend": "detectron2", "model": "Nope/x.yaml", "random_init": True}})

"""detectron2 backend: parity with DefaultPredictor, and a pipeline run. Skipped without detectron2."""

import numpy as np
import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed (see docs/backends.md: detectron2 and DensePose)")

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.evaluation.coco_evaluation import instances_to_coco_json  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from batchseg.config import ModelConfig  # noqa: E402
from batchseg.rows.encoding import encode_instances  # noqa: E402
from batchseg.inputs.imaging import decode_rgb  # noqa: E402
from batchseg.predictors.base import ModelInput  # noqa: E402
from batchseg.predictors.detectron2 import Detectron2Backend, build_cfg  # noqa: E402
from tests.conftest import random_boxes, read_rows, run_job  # noqa: E402

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


def _one_input(samples, cfg, name="street/scene_a.png"):
    rgb = decode_rgb((samples.root / name).read_bytes(), 10**8)
    return ModelInput(name, Detectron2Backend.preprocessor(cfg)(rgb), *rgb.shape[:2])


def test_uint8_images_normalise_to_the_same_floats_as_float32_ones(samples, d2_model):
    """The actor sends uint8 to the device; detectron2's (x - pixel_mean) / pixel_std gives the
    same float32 tensor as DefaultPredictor's float32 conversion on the host."""
    cfg, weights = d2_model
    backend = Detectron2Backend(cfg, weights, "cpu", "fp32")
    x = _one_input(samples, cfg)
    ours = backend.model.preprocess_image(backend._inputs([x]))
    theirs = backend.model.preprocess_image([{"image": torch.as_tensor(x.image.astype("float32").transpose(2, 0, 1))}])
    assert backend._inputs([x])[0]["image"].dtype == torch.uint8
    assert torch.equal(ours.tensor, theirs.tensor)


def test_paste_over_boxes_equals_detectron2s_full_paste_in_any_chunking(samples, d2_model):
    """paste_crops one mask per call (detectron2's CPU path) and all masks in one call over their
    union box (the GPU chunking) give the pixels of detectron2's paste_masks_in_image: for the
    model's own output and for random masks in boxes touching every border."""
    from detectron2.layers.mask_ops import paste_masks_in_image

    from batchseg.predictors.detectron2 import paste_crops

    cfg, weights = d2_model
    backend = Detectron2Backend(cfg, weights, "cpu", "fp32")
    inst = backend.instances([_one_input(samples, cfg, "park/scene_c.bmp")])[0]
    rng = np.random.default_rng(0)
    height, width, n = 37, 53, 300
    boxes = random_boxes(rng, height, width, n)
    boxes[:4] = [[0, 0, width, height], [0.3, 0.2, 0.9, 0.8], [width - 0.6, height - 0.7, width, height], [5, 5, 5.01, 30]]
    cases = [
        (inst.roi_masks, inst.pred_boxes.tensor, *inst.image_size),
        (torch.from_numpy(rng.random((n, 1, 28, 28))).float(), torch.from_numpy(boxes).float(), height, width),
    ]
    for roi_masks, boxes, height, width in cases:
        full = paste_masks_in_image(roi_masks[:, 0], boxes, (height, width)).numpy()
        one, all_at_once = (paste_crops(roi_masks, boxes, height, width, chunk=c) for c in (1, len(boxes)))
        assert len(one) == len(all_at_once) == len(full) > 0
        for i in range(len(full)):
            assert np.array_equal(one.full(i), full[i]) and np.array_equal(all_at_once.full(i), full[i]), i
        assert one.nbytes < full.nbytes / 2  # only the crops moved


def test_fp16_bf16_keep_box_decoding_and_paste_in_fp32(samples, d2_model, monkeypatch):
    """No GPU here: CPU bf16 autocast stands in for CUDA autocast. The backbone and heads run in
    bf16, while the box predictor (scores, box regression and its decoding) and the mask paste
    stay fp32, as do the mask head's logits before they are pasted."""
    import detectron2.layers.mask_ops as mask_ops

    from batchseg.predictors import detectron2 as d2

    cfg, weights = d2_model
    backend = Detectron2Backend(cfg, weights, "cpu", "bf16")
    monkeypatch.setattr(d2, "autocast", lambda device, precision: torch.autocast("cpu", dtype=torch.bfloat16))
    model, seen = backend.model, {}

    def record(name):
        def hook(_module, _inputs, output):
            seen.setdefault(name, output)
        return hook

    model.backbone.bottom_up.stem.register_forward_hook(record("backbone"))
    model.roi_heads.box_head.register_forward_hook(record("box head"))
    model.roi_heads.box_predictor.bbox_pred.register_forward_hook(record("box regression"))
    model.roi_heads.box_predictor.cls_score.register_forward_hook(record("class scores"))
    model.roi_heads.mask_head.predictor.register_forward_hook(record("mask logits"))
    paste = mask_ops._do_paste_mask

    def recorded_paste(masks, boxes, *args, **kwargs):
        seen.setdefault("paste", (masks.dtype, boxes.dtype, torch.is_autocast_enabled("cpu")))
        return paste(masks, boxes, *args, **kwargs)

    monkeypatch.setattr(mask_ops, "_do_paste_mask", recorded_paste)
    det = backend.predict([_one_input(samples, cfg)])[0]
    assert seen["backbone"].dtype == seen["box head"].dtype == torch.bfloat16  # autocast is on
    assert seen["box regression"].dtype == seen["class scores"].dtype == torch.float32
    assert seen["mask logits"].dtype == torch.float32
    assert seen["paste"] == (torch.float32, torch.float32, False)
    assert det.boxes.dtype == np.float32 and len(det.scores) > 0


def test_zoo_pkl_checkpoint_loads_through_the_restricted_unpickler(d2_model, tmp_path):
    """A model-zoo style .pkl ({"model": numpy arrays, "__author__": ...}) loads; one that would
    run code is refused with one line, and the code does not run."""
    import os
    import pickle

    from batchseg.predictors.checkpoints import CheckpointError

    cfg, weights = d2_model
    state = torch.load(weights, weights_only=True)["model"]
    pkl = tmp_path / "model_final.pkl"
    pkl.write_bytes(pickle.dumps({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "Detectron2 Model Zoo"},
                                 protocol=2))
    backend = Detectron2Backend(cfg, str(pkl), "cpu", "fp32")
    assert all(torch.equal(v, state[k]) for k, v in backend.model.state_dict().items() if k in state)

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {}, "__author__": Payload()}))
    with pytest.raises(CheckpointError, match="refusing to load global .*system") as e:
        Detectron2Backend(cfg, str(evil), "cpu", "fp32")
    assert "\n" not in str(e.value) and not marker.exists()


def test_partial_or_foreign_checkpoints_warn_or_fail_in_one_line(d2_model, tmp_path, caplog):
    from batchseg.predictors.checkpoints import CheckpointError

    cfg, weights = d2_model
    state = torch.load(weights, weights_only=True)["model"]
    partial = tmp_path / "backbone_only.pth"
    torch.save({"model": {k: v for k, v in state.items() if k.startswith("backbone.")}}, partial)
    with caplog.at_level("WARNING", logger="batchseg"):
        Detectron2Backend(cfg, str(partial), "cpu", "fp32")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("batchseg")]
    assert len(warnings) == 1 and "unloaded" in warnings[0]
    assert "roi_heads.box_predictor" in warnings[0] and "proposal_generator.rpn_head" in warnings[0]

    for name, content in (("notes.pth", b"not a checkpoint"), ("notes.pkl", b"not a pickle"), ("list.pth", None)):
        path = tmp_path / name
        torch.save([1, 2], path) if content is None else path.write_bytes(content)
        with pytest.raises(CheckpointError, match="not a") as e:
            Detectron2Backend(cfg, str(path), "cpu", "fp32")
        assert "\n" not in str(e.value)

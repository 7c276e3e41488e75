"""torchvision Mask R-CNN with random weights (saved to a file, loaded back) through the pipeline."""

import numpy as np
import pytest
import torch
import yaml
from torchvision.models.detection import maskrcnn_resnet50_fpn

from batchseg.rows.encoding import decode_mask
from tests.conftest import read_rows, run_job

SMALL = {"min_size": 128, "max_size": 256}


def test_random_weights_through_the_pipeline(ray_cluster, samples, tv_weights, tmp_path):
    model = {"backend": "torchvision", "weights": str(tv_weights), "score_threshold": 0.0, **SMALL}
    _, summary = run_job(
        inputs=[str(samples.root / "street"), str(samples.root / "park")], output=str(tmp_path),
        models={"instance": model}, batch_size=2,
    )
    rows = read_rows(str(tmp_path / "annotations"))
    assert len(rows) == 5 and all(r["error"] is None for r in rows)
    coco_ids = {c["id"] for c in summary["categories"]["instance"]["things"]}
    assert len(coco_ids) == 80 and max(coco_ids) == 90
    assert summary["found"]["instances"]["total"] > 0
    for r in rows:
        for inst in r["instances"]:
            assert inst["category_id"] in coco_ids
            assert inst["segmentation"]["size"] == [r["height"], r["width"]]  # original resolution
            assert decode_mask(inst["segmentation"]).sum() == inst["area"]
            x, y, w, h = inst["bbox"]
            assert -1e-3 <= x <= x + w <= r["width"] + 1e-3 and -1e-3 <= y <= y + h <= r["height"] + 1e-3


def test_finetuned_checkpoint_with_label_map(ray_cluster, samples, tmp_path):
    """A references/detection style checkpoint ({"model": ...}) with 3 classes and a label map file."""
    torch.manual_seed(1)
    net = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    torch.save({"model": net.state_dict(), "epoch": 9}, tmp_path / "ckpt.pth")
    (tmp_path / "labels.yaml").write_text(yaml.safe_dump({1: {"id": 7, "name": "widget"}, 2: {"id": 9, "name": "gadget"}}))
    model = {
        "backend": "torchvision", "weights": str(tmp_path / "ckpt.pth"), "label_map": str(tmp_path / "labels.yaml"),
        "score_threshold": 0.0, **SMALL,
    }
    _, summary = run_job(inputs=[str(samples.root / "street")], output=str(tmp_path / "out"), models={"instance": model})
    assert summary["categories"]["instance"]["things"] == [{"id": 7, "name": "widget"}, {"id": 9, "name": "gadget"}]
    ids = {i["category_id"] for r in read_rows(str(tmp_path / "out/annotations")) for i in r["instances"]}
    assert ids and ids <= {7, 9}


def test_staged_forward_equals_torchvision_forward(samples, tv_weights):
    """Our forward (resize on the CPU stage, masks pasted at original size) equals torchvision's
    own forward on the same resized image, up to the box scale back to original pixels."""
    from batchseg.config import ModelConfig
    from batchseg.inputs.imaging import decode_rgb
    from batchseg.predictors.base import ModelInput
    from batchseg.predictors.torchvision import TorchvisionBackend

    cfg = ModelConfig(backend="torchvision", weights=str(tv_weights), score_threshold=0.0, **SMALL)
    ours = TorchvisionBackend(cfg, str(tv_weights), "cpu", "fp32")
    rgb = decode_rgb((samples.root / "street/scene_a.png").read_bytes(), 10**8)  # 240 x 320
    resized = TorchvisionBackend.preprocessor(cfg)(rgb)  # 128 x 171
    det = ours.predict([ModelInput("x", resized, *rgb.shape[:2])])[0]

    ref = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, box_score_thresh=0.0, **SMALL)
    ref.load_state_dict(torch.load(tv_weights, weights_only=True))
    with torch.no_grad():
        expected = ref.eval()([torch.from_numpy(resized).permute(2, 0, 1).float() / 255])[0]
    mapped = ours._index_to_id[expected["labels"].numpy()] >= 0
    assert mapped.sum() == len(det.scores) > 0
    scale = np.array([rgb.shape[1] / resized.shape[1], rgb.shape[0] / resized.shape[0]] * 2)
    np.testing.assert_allclose(det.boxes, expected["boxes"].numpy()[mapped] * scale, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(det.scores, expected["scores"].numpy()[mapped], rtol=1e-5)
    assert (det.masks.height, det.masks.width) == rgb.shape[:2]


def _backend(tv_weights, precision="fp32"):
    from batchseg.config import ModelConfig
    from batchseg.predictors.torchvision import TorchvisionBackend

    cfg = ModelConfig(backend="torchvision", weights=str(tv_weights), score_threshold=0.0, **SMALL)
    return cfg, TorchvisionBackend(cfg, str(tv_weights), "cpu", precision)


def _input(samples, cfg, name="street/scene_a.png"):
    from batchseg.inputs.imaging import decode_rgb
    from batchseg.predictors.base import ModelInput
    from batchseg.predictors.torchvision import TorchvisionBackend

    rgb = decode_rgb((samples.root / name).read_bytes(), 10**8)
    return ModelInput("x", TorchvisionBackend.preprocessor(cfg)(rgb), *rgb.shape[:2])


def test_crops_equal_torchvisions_full_resolution_paste(samples, tv_weights):
    """Our masks, pasted over each box only, equal torchvision's own postprocess (full-image
    paste, > 0.5) of the same forward: what the backend returned before crops."""
    cfg, backend = _backend(tv_weights)
    x = _input(samples, cfg)
    det = backend.predict([x])[0]

    model = backend.model
    with torch.inference_mode():
        tensor = torch.from_numpy(x.image).permute(2, 0, 1).float().div(255)
        batch, _ = model.transform([tensor])
        features = model.backbone(batch.tensors)
        found, _ = model.roi_heads(features, model.rpn(batch, features)[0], batch.image_sizes)
        full = model.transform.postprocess(found, batch.image_sizes, [(x.height, x.width)])[0]
    keep = backend._index_to_id[full["labels"].numpy()] >= 0
    expected = (full["masks"][:, 0] > 0.5).numpy()[keep]
    assert len(det.masks) == len(expected) > 0
    for i, mask in enumerate(expected):
        assert np.array_equal(det.masks.full(i), mask)
    np.testing.assert_array_equal(det.boxes, full["boxes"].numpy()[keep])


def test_paste_crops_equals_paste_masks_in_image_for_boxes_touching_every_border():
    """Boxes as torchvision hands them to the paste (clipped to the image): its one-pixel
    expansion makes those on a border cross it."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from batchseg.predictors.torchvision import paste_crops

    rng = np.random.default_rng(0)
    height, width, n = 37, 53, 200
    corners = np.sort(rng.uniform(0, 1, (n, 2, 2)), axis=1) * [width, height]
    boxes = np.concatenate([corners[:, 0], corners[:, 1]], axis=1)
    border = np.array([0, 0, width, height], float)
    for i, side in enumerate(rng.integers(0, 4, n // 2)):  # half of them on one border, each border
        boxes[i, side] = border[side]
    boxes[:6] = [[0, 0, width, height], [0, 3, 9, height], [width - 9, 0, width, 9], [2, 2, 2.4, 2.3],
                 [0, 0, 0.5, 0.5], [width - 0.5, height - 0.5, width, height]]
    probs = torch.from_numpy(rng.random((n, 1, 28, 28))).float()
    boxes = torch.from_numpy(boxes).float()
    expected = (paste_masks_in_image(probs, boxes, (height, width))[:, 0] > 0.5).numpy()
    crops = paste_crops(probs, boxes, height, width)
    for i in range(n):
        assert np.array_equal(crops.full(i), expected[i]), i


def test_fp16_bf16_keep_box_decoding_and_paste_in_fp32(samples, tv_weights, monkeypatch):
    """No GPU here: CPU bf16 autocast stands in for CUDA autocast. The convolutions run in bf16,
    while the RPN deltas, the box predictor, the decoded boxes and the paste stay fp32."""
    from batchseg.predictors import torchvision as tv

    cfg, backend = _backend(tv_weights, "bf16")
    monkeypatch.setattr(tv, "autocast", lambda device, precision: torch.autocast("cpu", dtype=torch.bfloat16))
    model, seen = backend.model, {}

    def record(name):  # the first output of each module, left unchanged
        def hook(_module, _inputs, output):
            seen.setdefault(name, output)
        return hook

    model.backbone.body.conv1.register_forward_hook(record("backbone"))
    model.rpn.head.conv.register_forward_hook(record("rpn conv"))
    model.rpn.head.register_forward_hook(record("rpn deltas"))
    model.rpn.anchor_generator.register_forward_hook(record("anchors"))
    model.roi_heads.box_head.register_forward_hook(record("box head"))
    model.roi_heads.box_predictor.bbox_pred.register_forward_hook(record("box regression"))
    paste = tv.paste_crops

    def recorded_paste(probs, boxes, *args):
        seen.setdefault("paste", (probs, boxes))
        return paste(probs, boxes, *args)

    monkeypatch.setattr(tv, "paste_crops", recorded_paste)

    det = backend.predict([_input(samples, cfg)])[0]
    assert seen["backbone"].dtype == seen["box head"].dtype == torch.bfloat16  # autocast is on
    assert seen["rpn conv"][0].dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for part in seen["rpn deltas"] for t in part)
    assert all(a.dtype == torch.float32 for a in seen["anchors"])
    assert seen["box regression"].dtype == torch.float32
    assert seen["paste"][0].dtype == seen["paste"][1].dtype == torch.float32
    assert det.boxes.dtype == np.float32 and len(det.scores) > 0


def test_checkpoint_errors_are_one_line(tmp_path, tv_weights, caplog):
    from batchseg.config import ModelConfig
    from batchseg.predictors.checkpoints import CheckpointError
    from batchseg.predictors.torchvision import TorchvisionBackend

    cfg = ModelConfig(backend="torchvision", weights=str(tv_weights), score_threshold=0.0, **SMALL)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a loadable torch checkpoint") as e:
        TorchvisionBackend(cfg, str(text), "cpu", "fp32")
    assert "\n" not in str(e.value)

    state = torch.load(tv_weights, weights_only=True)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("roi_heads.mask")}, partial)
    with caplog.at_level("WARNING"), pytest.raises(CheckpointError, match="keys missing .*roi_heads.mask_head") as e:
        TorchvisionBackend(cfg, str(partial), "cpu", "fp32")
    assert "\n" not in str(e.value)
    assert any(r.levelname == "WARNING" and "unloaded" in r.getMessage() and "roi_heads.mask_predictor" in r.getMessage()
               for r in caplog.records)

"""torchvision Mask R-CNN with random weights (saved to a file, loaded back) through the pipeline."""

import numpy as np
import torch
import yaml
from torchvision.models.detection import maskrcnn_resnet50_fpn

from batchseg.encoding import decode_mask
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
    from batchseg.imaging import decode_rgb
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
    assert det.masks.shape[1:] == rgb.shape[:2]

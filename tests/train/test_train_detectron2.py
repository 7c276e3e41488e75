"""`batchseg train --backend detectron2`: detectron2's SimpleTrainer and data loader on Ray Train
(one CPU worker), then `batchseg run --model-dir` with detectron2's predictor. Real detectron2;
skipped where it is not installed (CI)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.detectron2
pytest.importorskip("detectron2")

ZOO = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"


@pytest.mark.timeout(900)
def test_detectron2_trains_through_its_own_trainer_and_the_run_loads_it(tmp_path):
    from batchseg.samples import write_samples

    write_samples(tmp_path / "scenes", scenes=20, seed=2)
    model = tmp_path / "model"
    cmd = [sys.executable, "-m", "batchseg", "train", "--backend", "detectron2", "--arch", ZOO,
           "--data", str(tmp_path / "scenes" / "ground_truth.json"), "--images", str(tmp_path / "scenes" / "images"),
           "--output", str(model), "--iterations", "4", "--checkpoint-every", "2", "--min-size", "96",
           "--max-size", "160", "--min-images", "8"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads((model / "model_card.json").read_text())
    assert card["backend"] == "detectron2" and card["options"] == {"MODEL.ROI_HEADS.NUM_CLASSES": 4}
    assert json.loads((model / "label_map.json").read_text())["0"] == {"id": 1, "name": "person"}
    assert [r["iteration"] for r in map(json.loads, (model / "metrics.jsonl").read_text().splitlines())] == [0, 2, 4]

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "batchseg", "run", "--input", str(tmp_path / "scenes" / "images" / "shapes"),
                           "--output", str(out), "--model-dir", str(model), "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    task = json.loads((out / "run.json").read_text())["provenance"]["tasks"]["instance"]
    assert task["backend"] == "detectron2" and task["model_card"] == f"{model}/model_card.json"

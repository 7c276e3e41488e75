"""benchmarks/gpu.py in its CPU smoke form, so that it cannot rot before a GPU runs it, and the
promise it rests on: the predictor, encoding and decoding code, and the predictor stage, import
without Ray (a bare GPU machine has none). Both run in a subprocess whose `import ray` fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NO_RAY = "import sys; sys.modules['ray'] = None\n"  # `import ray` (and ray.*) raises ImportError


def _python(code: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_RAY + code], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(120)
def test_predictors_encoding_decoding_and_the_predictor_stage_import_without_ray():
    done = _python(
        "import batchseg.predictors.base, batchseg.predictors.torchvision, batchseg.predictors.device\n"
        "import batchseg.rows.encoding, batchseg.rows.tasks, batchseg.inputs.imaging, batchseg.run.stages\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray' and sys.modules[m] is not None))\n",
        timeout=110)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


MODEL_ONLY = {"batch", "precision", "channels_last", "images_per_s", "cpu_ms_per_image", "peak_memory_mib", "gpu_busy"}
STAGE = {"batch", "precision", "images_per_call", "images_per_s", "cpu_ms_per_image", "peak_memory_mib", "gpu_busy",
         "ratio_to_model_only", "host_cpu_ms_per_image_outside_forward", "instances_per_image"}
FIDELITY = {"matched", "unmatched", "score_delta_mean", "score_delta_max", "mask_iou_mean", "mask_iou_min"}
TOP = {"benchmark", "smoke", "device", "device_name", "torch", "torchvision", "commit", "amp_applies",
       "gpu_busy_source", "installed_from_wheels", "image", "decode", "models", "elapsed_s"}


@pytest.mark.timeout(420)
def test_gpu_benchmark_smoke_form_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    done = _python(f"import runpy; sys.argv = ['gpu.py', '--smoke', '--device', 'cpu', '--budget-s', '400', "
                   f"'--models', 'maskrcnn_resnet50_fpn,maskrcnn_resnet50_fpn_v2,keypointrcnn_resnet50_fpn', "
                   f"'--json', {str(out)!r}]\n"
                   "runpy.run_path('benchmarks/gpu.py', run_name='__main__')\n", timeout=410)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "## torchvision maskrcnn_resnet50_fpn (forced detections)" in done.stdout
    report = json.loads(out.read_text())
    assert set(report) == TOP
    assert report["smoke"] is True and report["device"] == "cpu" and report["amp_applies"] is False
    instances = report["image"]["instances"]
    assert set(report["image"]) == {"height", "width", "jpeg_kib_mean", "instances", "model_input_short_edge"}
    assert report["decode"]["cpu_ms_per_image"] > 0 and report["decode"]["device_decode"]["images_per_s"] > 0
    assert [m["model"] for m in report["models"]] == [
        "torchvision maskrcnn_resnet50_fpn", "torchvision maskrcnn_resnet50_fpn_v2", "torchvision keypointrcnn_resnet50_fpn"]
    for model in report["models"]:
        assert model["forced"] is True
        measured = [e for e in model["model_only"] if "skipped" not in e]
        assert {(e["precision"], e["channels_last"]) for e in measured} == {
            (p, cl) for p in ("fp32", "fp16", "bf16") for cl in (False, True)}, model["model_only"]
        for entry in measured:
            assert set(entry) == MODEL_ONLY | ({"helps"} if entry["channels_last"] else set()), entry
            assert entry["images_per_s"] > 0 and entry["cpu_ms_per_image"] > 0
            assert entry["peak_memory_mib"] is None and entry["gpu_busy"] is None  # CPU: no device memory, no NVML
    for model in report["models"][:2]:  # the Mask R-CNNs run in the predictor stage, forced to detect
        assert [e["precision"] for e in model["stage"]] == ["fp32", "fp16", "bf16"]
        for entry in model["stage"]:
            assert set(entry) == STAGE, entry
            assert entry["instances_per_image"] == instances
            assert entry["ratio_to_model_only"] > 0
        assert set(model["fidelity"]) == {"fp16", "bf16"}
        for figures in model["fidelity"].values():
            assert set(figures) == FIDELITY
            # autocast is CUDA only: on CPU every precision computes in fp32, so rows agree exactly
            assert figures["matched"] == instances * model["stage"][0]["images_per_call"]
            assert figures["unmatched"] == 0 and figures["mask_iou_min"] == 1.0 and figures["score_delta_max"] == 0.0
    assert report["models"][2]["stage"] == [] and report["models"][2]["stage_note"]

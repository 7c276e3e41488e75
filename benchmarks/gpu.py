"""The GPU benchmark: one command, at most five minutes, on a bare GPU machine. Prints figures
and writes them as JSON; asserts nothing.

    python benchmarks/gpu.py [--json out.json] [--budget-s 280] [--smoke] [--models a,b] [--device cuda|cpu]

Needs torch, torchvision, numpy, pillow and pyarrow, and batchseg's own code, imported without
Ray. What else batchseg's hot path imports (pycocotools for RLE; pydantic and PyYAML for the
config; fsspec and filelock for the input and weights modules the stage imports) is installed
with `pip --no-index` from benchmarks/wheels/ (made by benchmarks/gpu_wheels.sh on a machine
with a registry) into benchmarks/wheels/site/, never into the machine's Python.

Models: the real architectures with random weights (nothing downloaded): torchvision Mask
R-CNN v1 and v2 (batchseg's torchvision backend), keypoint R-CNN (torchvision only: batchseg
has no torchvision keypoint backend, so model-only figures), and detectron2's four tasks where
detectron2 is installed (the stage only, not forced: see `detectron2_figures`).
Images: synthetic JPEGs (1920x1080 on a GPU) of INSTANCES objects each.

Forced detections: random weights detect nothing, so a zero-cost head beside the real model
(`ForcedDetections`, forward hooks) makes every image yield INSTANCES detections while all of
the real model still runs: the first INSTANCES of the real RPN's proposals are replaced by the
objects' boxes (the proposal count is unchanged, so the box head does the same work); the real
box predictor's outputs are scaled by REAL_SCALE and the class logits of those proposals get a
constant +FORCE_LOGIT on their class; the real mask predictor's logits are scaled the same and
a constant disk added. Boxes, scores and mask edges still move with the real outputs (and so
with the precision), by a little.

For each model, in one run:
  - model-only images/s (transform, backbone, RPN, ROI heads on uint8 tensors already on the
    device) at batch 1, 4, 8, 16, in fp32 and with AMP fp16 and bf16; channels_last at each
    precision's best batch, kept where it helps;
  - the predictor stage end to end as the actor runs it (batchseg.run.stages.Annotate on what
    decode_batch hands it with decode_on_device: one batched decode_jpeg on the device, orient,
    resize, forward, paste, crop RLE, rows), its images/s and its ratio to model-only;
  - peak device memory; the GPU busy fraction (NVML via pynvml, else nvidia-smi) during each
    measurement; host CPU ms per image (process CPU time), and outside the forward (stage
    minus model-only at the same batch and precision);
  - fp16 and bf16 against fp32 on the stage's rows: instances matched one to one (same class,
    box IoU >= 0.5, highest first, as benchmarks/hot_path.py matches them), score deltas and
    mask IoU.
On a CPU (no CUDA, or --smoke) the same code runs at small sizes in under a minute; AMP is a
no-op there (batchseg's autocast is CUDA only), so the precisions differ only on a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "benchmarks" / "wheels"
# what batchseg's hot path imports beyond the bare set: import name -> distribution
EXTRA = {"pycocotools": "pycocotools", "pydantic": "pydantic", "yaml": "PyYAML", "fsspec": "fsspec",
         "filelock": "filelock"}
PRECISIONS = ("fp32", "fp16", "bf16")
REAL_SCALE = 0.1  # the random heads' outputs, scaled down under the forced ones (they still move them)
FORCE_LOGIT = 6.0  # softmax over 91 classes: a forced class scores about 0.8
MASK_DISK = 4.0  # forced mask logits: +-MASK_DISK inside/outside a disk


def ensure_extras() -> list[str]:
    """Make EXTRA importable: from benchmarks/wheels/site/, installed there first if needed with
    `pip --no-index --no-deps` from every distribution in the wheel folder (gpu_wheels.sh put
    exactly the needed ones there, pinned). Returns the distributions installed."""
    site = WHEELS / "site"
    if site.is_dir():
        sys.path.insert(0, str(site))
    missing = [dist for module, dist in EXTRA.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return []
    dists = sorted({wheel.name.split("-")[0] for wheel in WHEELS.glob("*.whl")})
    if not dists:
        sys.exit(f"gpu.py: {', '.join(missing)} not installed and no wheels in {WHEELS}; "
                 "run benchmarks/gpu_wheels.sh on a machine with a registry and bring that folder")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--find-links",
                    str(WHEELS), "--target", str(site), *dists], check=True)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    return dists


sys.path.insert(0, str(REPO))
INSTALLED = ensure_extras()

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from benchmarks.matching import greedy_pairs  # noqa: E402

from batchseg.config import JobConfig, ModelConfig  # noqa: E402
from batchseg.inputs.imaging import ShortestEdge  # noqa: E402
from batchseg.predictors.base import autocast  # noqa: E402
from batchseg.predictors.torchvision import PreResizedTransform  # noqa: E402
from batchseg.run import stages  # noqa: E402
from batchseg.store.ledger import done_key  # noqa: E402


# --- synthetic inputs ---------------------------------------------------------------------------

def object_boxes(height: int, width: int, count: int, seed: int = 0) -> np.ndarray:
    """(count, 4) float32 x0, y0, x1, y1: one object per cell of a near-square grid, 40..90 % of
    its cell, so no two overlap (NMS keeps every forced detection)."""
    rng = np.random.default_rng(seed)
    cols = int(np.ceil(np.sqrt(count * width / height)))
    rows = int(np.ceil(count / cols))
    ch, cw = height / rows, width / cols
    boxes = []
    for k in range(count):
        r, c = divmod(k, cols)
        bh, bw = ch * rng.uniform(0.4, 0.9), cw * rng.uniform(0.4, 0.9)
        y0, x0 = r * ch + rng.uniform(0, ch - bh), c * cw + rng.uniform(0, cw - bw)
        boxes.append([x0, y0, x0 + bw, y0 + bh])
    return np.asarray(boxes, np.float32)


def synthetic_jpegs(count: int, height: int, width: int, boxes: np.ndarray, seed: int = 0) -> list[bytes]:
    """Baseline JPEGs (quality 90) of smooth noise with a coloured ellipse in each box: about
    the bytes per pixel of a photo, so decode costs what it costs on real images."""
    import io

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        fine = rng.integers(-12, 13, (height, width, 3))
        image = Image.fromarray(np.clip(np.asarray(image, np.int16) + fine, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for box in boxes:
            draw.ellipse([float(v) for v in box], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def read_batch_of(jpegs: list[bytes], first: int) -> dict[str, np.ndarray]:
    """The columns read_batch hands decode_batch, for these files."""
    uris = [f"bench://{first + i:06d}.jpg" for i in range(len(jpegs))]
    obj = lambda values: np.array(values + [None], dtype=object)[:-1]  # noqa: E731  (1-d even for bytes)
    return {
        "uri": obj(uris), "size": np.array([len(j) for j in jpegs], np.int64), "version": obj(["1"] * len(jpegs)),
        "key": np.array([done_key(u, "1") for u in uris], np.int64), "members": np.full(len(jpegs), -1, np.int32),
        "data": obj(list(jpegs)), "error": obj([None] * len(jpegs)), "error_kind": obj([None] * len(jpegs)),
    }


# --- the zero-cost head that forces detections ------------------------------------------------

class ForcedDetections:
    """Forward hooks on a torchvision R-CNN that make each image yield one detection per
    object box (module docstring). boxes: (K, 4) x0, y0, x1, y1 in the original (height, width)
    image; labels: (K,) the model's class indices. Every added tensor is a constant or a
    gather: nothing that costs next to the model."""

    def __init__(self, model: torch.nn.Module, boxes: np.ndarray, size: tuple[int, int], labels: list[int]) -> None:
        self.boxes, self.size, self.labels = torch.as_tensor(boxes), size, torch.as_tensor(labels)
        self.counts: list[int] = []
        heads = model.roi_heads
        self.handles = [model.rpn.register_forward_hook(self._proposals),
                        heads.box_predictor.register_forward_hook(self._class_logits)]
        if getattr(heads, "mask_predictor", None) is not None:
            self.handles.append(heads.mask_predictor.register_forward_hook(self._mask_logits))

    def _proposals(self, _module, args, output):
        images = args[0]
        proposals, losses = output
        forced = []
        for p, (h, w) in zip(proposals, images.image_sizes):
            scale = torch.tensor([w / self.size[1], h / self.size[0]] * 2, dtype=p.dtype)
            k = min(len(self.boxes), len(p))
            forced.append(torch.cat([(self.boxes[:k] * scale).to(p.device), p[k:]]))
        self.counts = [len(p) for p in forced]
        return forced, losses

    def _class_logits(self, _module, _args, output):
        logits, deltas = output
        rows, cols, start = [], [], 0
        for n in self.counts:
            k = min(len(self.boxes), n)
            rows.append(torch.arange(start, start + k))
            cols.append(self.labels[:k])
            start += n
        if start != len(logits):  # not a call this hook forced (e.g. a proposal-free image)
            return output
        bias = torch.zeros(logits.shape, dtype=logits.dtype)
        bias[torch.cat(rows), torch.cat(cols)] = FORCE_LOGIT
        return logits * REAL_SCALE + bias.to(logits.device), deltas * REAL_SCALE

    def _mask_logits(self, _module, _args, logits):
        m = logits.shape[-1]
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, m), torch.linspace(-1, 1, m), indexing="ij")
        disk = torch.where(xx ** 2 + yy ** 2 < 0.8, MASK_DISK, -MASK_DISK).to(logits.device, logits.dtype)
        return logits * REAL_SCALE + disk


# --- measuring ----------------------------------------------------------------------------------

class Device:
    """Synchronisation, peak memory and the GPU busy fraction for one device."""

    def __init__(self, name: str) -> None:
        self.name, self.cuda = name, name.startswith("cuda")
        self.index = torch.device(name).index or 0 if self.cuda else None
        self.busy_source = _busy_source() if self.cuda else None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def measured(self, into: dict[str, Any]):
        """Around a timed loop: adds peak_memory_mib, gpu_busy and cpu_s to `into`."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        sampler = BusySampler(self.busy_source, self.index) if self.busy_source else None
        cpu = time.process_time()
        try:
            yield
        finally:
            self.sync()
            into["cpu_s"] = time.process_time() - cpu
            into["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if self.cuda else None
            into["gpu_busy"] = sampler.stop() if sampler else None


def _busy_source() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return "pynvml"
    except Exception:
        return "nvidia-smi" if shutil.which("nvidia-smi") else None


class BusySampler:
    """The mean NVML utilisation (percent of time a kernel ran) over its life, as a fraction."""

    def __init__(self, source: str, index: int) -> None:
        self.samples: list[float] = []
        self.done = threading.Event()
        if source == "pynvml":
            import pynvml

            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.thread = threading.Thread(target=self._poll, args=(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,))
            self.proc = None
        else:
            self.proc = subprocess.Popen(["nvidia-smi", "-i", str(index), "--query-gpu=utilization.gpu",
                                          "--format=csv,noheader,nounits", "-lms", "100"],
                                         stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read)
        self.thread.daemon = True
        self.thread.start()

    def _poll(self, read) -> None:
        while not self.done.wait(0.05):
            self.samples.append(float(read()))

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line))

    def stop(self) -> float | None:
        self.done.set()
        if self.proc:
            self.proc.terminate()
        self.thread.join(2)
        return round(sum(self.samples) / len(self.samples) / 100, 3) if self.samples else None


def timed(step, images_per_step: int, device: Device, sizes: Any) -> tuple[dict[str, Any], Any]:
    """sizes.warmup steps, then steps until sizes.min_s and sizes.min_steps: ({images_per_s,
    cpu_ms_per_image, peak_memory_mib, gpu_busy}, the last step's result)."""
    for _ in range(sizes.warmup):
        step()
    device.sync()
    figures: dict[str, Any] = {}
    steps = 0
    with device.measured(figures):
        start = time.perf_counter()
        while steps < sizes.min_steps or time.perf_counter() - start < sizes.min_s:
            result = step()
            steps += 1
        device.sync()
        wall = time.perf_counter() - start
    images = steps * images_per_step
    cpu_s = figures.pop("cpu_s")
    return {"images_per_s": round(images / wall, 3), "cpu_ms_per_image": round(1000 * cpu_s / images, 2), **figures}, result


def model_forward(model: torch.nn.Module, tensors: list[torch.Tensor], device: str, precision: str):
    """The four calls TorchvisionBackend.predict makes, on (3, h, w) uint8 device tensors: no
    paste, no host copy."""
    with torch.inference_mode(), autocast(device, precision):
        batch, _ = model.transform([t.float().div_(255) for t in tensors])
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        found, _ = model.roi_heads(features, proposals, batch.image_sizes)
    return found


@contextmanager
def channels_last(model: torch.nn.Module):
    """The backbone's weights and its input in channels_last while inside."""
    model.backbone.to(memory_format=torch.channels_last)
    handle = model.backbone.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(memory_format=torch.channels_last),))
    try:
        yield
    finally:
        handle.remove()
        model.backbone.to(memory_format=torch.contiguous_format)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def model_only_figures(model, inputs: list[torch.Tensor], device: Device, sizes: Any, budget: Budget) -> list[dict]:
    """Model-only images/s per (batch, precision), then channels_last at each precision's best batch."""
    out = []
    for precision in PRECISIONS:
        for batch in sizes.batches:
            entry = {"batch": batch, "precision": precision, "channels_last": False}
            if budget.left() < sizes.reserve_s:
                out.append({**entry, "skipped": "time budget"})
                continue
            tensors = (inputs * batch)[:batch]
            out.append({**entry, **timed(lambda: model_forward(model, tensors, device.name, precision), batch, device,
                                         sizes)[0]})
        done = [e for e in out if e["precision"] == precision and "images_per_s" in e]
        if done and budget.left() >= sizes.reserve_s:
            best = max(done, key=lambda e: e["images_per_s"])
            tensors = (inputs * best["batch"])[:best["batch"]]
            with channels_last(model):
                figures, _ = timed(lambda: model_forward(model, tensors, device.name, precision), best["batch"], device,
                                   sizes)
            out.append({"batch": best["batch"], "precision": precision, "channels_last": True, **figures,
                        "helps": figures["images_per_s"] > best["images_per_s"]})
    return out


def stage_figures(annotate: stages.Annotate, decoded: dict[str, np.ndarray], model_only: list[dict], device: Device,
                  sizes: Any, budget: Budget) -> tuple[list[dict], dict[str, pa.Table]]:
    """The actor's stage per precision at sizes.stage_batch, and the rows of each precision."""
    backend = annotate.backends["instance"]
    annotate.batch_size["instance"] = sizes.stage_batch
    out, rows = [], {}
    for precision in PRECISIONS:
        entry = {"batch": sizes.stage_batch, "precision": precision, "images_per_call": len(decoded["uri"])}
        if budget.left() < sizes.reserve_s:
            out.append({**entry, "skipped": "time budget"})
            continue
        backend.precision = precision  # the backend reads it at each predict (what job.precision sets)
        figures, rows[precision] = timed(lambda: annotate(decoded), len(decoded["uri"]), device, sizes)
        errors = [e for e in rows[precision].column("error").to_pylist() if e]
        if errors:
            raise RuntimeError(f"the stage wrote error rows: {errors[0]}")
        same = [e for e in model_only if e["batch"] == sizes.stage_batch and e["precision"] == precision
                and not e["channels_last"] and "images_per_s" in e]
        ratio = figures["images_per_s"] / same[0]["images_per_s"] if same else None
        outside = figures["cpu_ms_per_image"] - same[0]["cpu_ms_per_image"] if same else None
        out.append({**entry, **figures, "ratio_to_model_only": None if ratio is None else round(ratio, 3),
                    "host_cpu_ms_per_image_outside_forward": None if outside is None else round(outside, 2),
                    "instances_per_image": round(sum(len(c) for c in rows[precision].column("instances").to_pylist())
                                                 / len(decoded["uri"]), 2)})
    return out, rows


def fidelity(rows: dict[str, pa.Table]) -> dict[str, Any]:
    """fp16 and bf16 rows against fp32's: instances matched one to one per image."""
    if "fp32" not in rows:
        return {}
    reference = rows["fp32"].column("instances").to_pylist()
    out = {}
    for precision in ("fp16", "bf16"):
        if precision not in rows:
            continue
        deltas, ious, unmatched = [], [], 0
        for a, b in zip(reference, rows[precision].column("instances").to_pylist()):
            d, iou, left = match(a or [], b or [])
            deltas += d
            ious += iou
            unmatched += left
        out[precision] = {
            "matched": len(ious), "unmatched": unmatched,
            "score_delta_mean": _mean(deltas), "score_delta_max": round(max(deltas), 5) if deltas else None,
            "mask_iou_mean": _mean(ious), "mask_iou_min": round(min(ious), 5) if ious else None,
        }
    return out


def match(a: list[dict], b: list[dict]) -> tuple[list[float], list[float], int]:
    """Greedy one-to-one matches of two images' instance cells (same class, box IoU >= 0.5,
    highest first) -> (|score deltas|, mask IoUs, instances left unmatched on either side)."""
    from pycocotools import mask as mask_util

    if not a or not b:
        return [], [], len(a) + len(b)
    box_iou = mask_util.iou([x["bbox"] for x in a], [y["bbox"] for y in b], [0] * len(b))
    same_class = np.array([[x["category_id"] == y["category_id"] for y in b] for x in a])
    box_iou = np.where(same_class, box_iou, 0)
    pairs = greedy_pairs(box_iou)
    deltas = [abs(a[i]["score"] - b[j]["score"]) for i, j in pairs]
    rle = lambda s: {"size": s["size"], "counts": s["counts"].encode()}  # noqa: E731
    ious = [float(mask_util.iou([rle(a[i]["segmentation"])], [rle(b[j]["segmentation"])], [0])[0, 0]) for i, j in pairs]
    return deltas, ious, len(a) + len(b) - 2 * len(ious)


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 5) if values else None


# --- the models ---------------------------------------------------------------------------------

TORCHVISION_MASK = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2")
KEYPOINT = "keypointrcnn_resnet50_fpn"
DETECTRON2_TASKS = {"instance": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
                    "panoptic": "COCO-PanopticSegmentation/panoptic_fpn_R_50_3x.yaml",
                    "keypoint": "COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml",
                    "densepose": "densepose_rcnn_R_50_FPN_s1x.yaml"}


def job_for(backend: str, model: str, task: str, sizes: Any, device: Device) -> JobConfig:
    cfg = ModelConfig(backend=backend, model=model, random_init=True, min_size=sizes.min_size, max_size=sizes.max_size)
    return JobConfig(inputs=["memory://gpu-bench/"], output="memory://gpu-bench-out", tasks=[task], models={task: cfg},
                     device="cuda" if device.cuda else "cpu", batch_size=sizes.stage_batch)


def fewer_proposals(model: torch.nn.Module, sizes: Any) -> None:
    if sizes.proposals:
        model.rpn._pre_nms_top_n["testing"] = model.rpn._post_nms_top_n["testing"] = sizes.proposals


def mask_rcnn_figures(arch: str, sizes: Any, device: Device, decoded: dict, inputs: list[torch.Tensor],
                      boxes: np.ndarray, budget: Budget) -> dict[str, Any]:
    annotate = stages.Annotate(job_for("torchvision", arch, "instance", sizes, device), device.name)
    model = annotate.backends["instance"].model
    fewer_proposals(model, sizes)
    named = np.flatnonzero(annotate.backends["instance"]._index_to_id >= 0)  # torchvision's COCO table has N/A slots
    labels = [int(named[k % len(named)]) for k in range(len(boxes))]
    ForcedDetections(model, boxes, (sizes.height, sizes.width), labels)
    model_only = model_only_figures(model, inputs, device, sizes, budget)
    stage, rows = stage_figures(annotate, decoded, model_only, device, sizes, budget)
    return {"model": f"torchvision {arch}", "forced": True, "model_only": model_only, "stage": stage,
            "fidelity": fidelity(rows)}


def keypoint_figures(sizes: Any, device: Device, inputs: list[torch.Tensor], boxes: np.ndarray,
                     budget: Budget) -> dict[str, Any]:
    """Model-only: batchseg has no torchvision keypoint backend, so no stage to run it in."""
    model = torchvision.models.detection.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    t = model.transform
    model.transform = PreResizedTransform(t.min_size, t.max_size, t.image_mean, t.image_std)
    model = model.eval().to(device.name)
    fewer_proposals(model, sizes)
    ForcedDetections(model, boxes, (sizes.height, sizes.width), [1] * len(boxes))
    return {"model": f"torchvision {KEYPOINT}", "forced": True,
            "model_only": model_only_figures(model, inputs, device, sizes, budget),
            "stage": [], "stage_note": "no batchseg backend runs torchvision keypoint R-CNN", "fidelity": {}}


def detectron2_figures(sizes: Any, device: Device, decoded: dict, budget: Budget) -> list[dict[str, Any]]:
    """detectron2's four tasks through batchseg's backends, where detectron2 is installed: the
    stage end to end at fp32/fp16/bf16, random weights, not forced (its heads differ per task;
    the instance figures above stand for the R-CNN work). Empty where detectron2 is absent."""
    if importlib.util.find_spec("detectron2") is None:
        return []
    out = []
    for task, config in DETECTRON2_TASKS.items():
        if task == "densepose" and importlib.util.find_spec("densepose") is None:
            continue
        annotate = stages.Annotate(job_for("detectron2", config, task, sizes, device), device.name)
        annotate.batch_size[task] = sizes.stage_batch
        stage = []
        for precision in PRECISIONS:
            if budget.left() < sizes.reserve_s:
                stage.append({"batch": sizes.stage_batch, "precision": precision, "skipped": "time budget"})
                continue
            annotate.backends[task].precision = precision
            stage.append({"batch": sizes.stage_batch, "precision": precision,
                          **timed(lambda: annotate(decoded), len(decoded["uri"]), device, sizes)[0]})
        out.append({"model": f"detectron2 {task} {config}", "forced": False, "model_only": [], "stage": stage,
                    "fidelity": {}})
    return out


# --- the run ------------------------------------------------------------------------------------

class Sizes(argparse.Namespace):
    """What one run measures: full sizes on a GPU; small ones for the CPU smoke form, where the
    RPN also keeps `proposals` (not torchvision's 1000) and torch runs one thread, so that it
    runs in under a minute on a shared CPU: it checks the code, its figures mean nothing."""

    @classmethod
    def of(cls, smoke: bool) -> "Sizes":
        if smoke:
            return cls(height=96, width=128, instances=3, images=2, batches=(1,), stage_batch=1, min_size=96,
                       max_size=128, proposals=50, warmup=0, min_s=0.0, min_steps=1, reserve_s=2.0)
        return cls(height=1080, width=1920, instances=20, images=32, batches=(1, 4, 8, 16), stage_batch=8,
                   min_size=800, max_size=1333, proposals=None, warmup=1, min_s=1.5, min_steps=3, reserve_s=15.0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="small sizes (the default without CUDA)")
    parser.add_argument("--budget-s", type=float, default=280.0, help="stop measuring new figures after this")
    parser.add_argument("--models", default="all", help="comma list of: " + ", ".join(
        (*TORCHVISION_MASK, KEYPOINT, "detectron2")))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    device = Device(args.device)
    sizes = Sizes.of(args.smoke or not device.cuda)
    if sizes.proposals:
        torch.set_num_threads(1)
    chosen = (*TORCHVISION_MASK, KEYPOINT, "detectron2") if args.models == "all" else tuple(args.models.split(","))
    unknown = set(chosen) - {*TORCHVISION_MASK, KEYPOINT, "detectron2"}
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}")
    budget = Budget(args.budget_s)
    torch.manual_seed(0)

    boxes = object_boxes(sizes.height, sizes.width, sizes.instances)
    jpegs = synthetic_jpegs(sizes.images, sizes.height, sizes.width, boxes)
    read = read_batch_of(jpegs, 0)
    preprocessor = ShortestEdge(sizes.min_size, sizes.max_size)
    models = {"instance": job_for("torchvision", TORCHVISION_MASK[0], "instance", sizes, device).models["instance"]}
    decode_task = {}
    decoded = None
    cpu = time.process_time()
    for _ in range(3):  # the decode task's share with decode_on_device: headers only, on the host
        decoded = stages.decode_batch(read, models, 10**9, None, jpegs_to_device=True)
    decode_task["cpu_ms_per_image"] = round(1000 * (time.process_time() - cpu) / (3 * len(jpegs)), 3)
    on_device = stages.decode_on_device(decoded, [preprocessor], 10**9, device.name)
    inputs = list(on_device["image_0"])
    decode_task["device_decode"], _ = timed(lambda: stages.decode_on_device(decoded, [preprocessor], 10**9, device.name),
                                            len(jpegs), device, sizes)

    results = []
    for arch in TORCHVISION_MASK:
        if arch in chosen:
            results.append(mask_rcnn_figures(arch, sizes, device, decoded, inputs, boxes, budget))
    if KEYPOINT in chosen:
        results.append(keypoint_figures(sizes, device, inputs, boxes, budget))
    if "detectron2" in chosen:
        results += detectron2_figures(sizes, device, decoded, budget)

    report = {
        "benchmark": "gpu", "smoke": sizes.height < 1080, "device": device.name,
        "device_name": torch.cuda.get_device_name(device.index) if device.cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "torchvision": torchvision.__version__, "commit": _commit(),
        "amp_applies": device.cuda, "gpu_busy_source": device.busy_source, "installed_from_wheels": INSTALLED,
        "image": {"height": sizes.height, "width": sizes.width, "jpeg_kib_mean": round(np.mean([len(j) for j in jpegs]) / 1024, 1),
                  "instances": sizes.instances, "model_input_short_edge": sizes.min_size},
        "decode": decode_task, "models": results, "elapsed_s": round(time.monotonic() - started, 1),
    }
    show(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def show(report: dict[str, Any]) -> None:
    image = report["image"]
    print(f"# gpu.py on {report['device_name']} ({report['device']}), torch {report['torch']}, commit {report['commit']}; "
          f"{image['width']}x{image['height']} JPEGs ({image['jpeg_kib_mean']} KiB), {image['instances']} objects each; "
          f"AMP {'on' if report['amp_applies'] else 'a no-op here'}; GPU busy from {report['gpu_busy_source']}")
    d = report["decode"]
    print(f"decode task (headers only): {d['cpu_ms_per_image']} CPU ms/image; batched device decode + resize: "
          f"{d['device_decode']['images_per_s']} images/s")
    for m in report["models"]:
        print(f"\n## {m['model']}{' (forced detections)' if m['forced'] else ''}")
        print(f"{'what':<12}{'batch':>6} {'prec':<5}{'cl':>3}{'images/s':>10}{'vs model':>9}{'CPU ms/img':>11}"
              f"{'outside fwd':>12}{'peak MiB':>10}{'busy':>6}")
        for kind in ("model_only", "stage"):
            for e in m[kind]:
                if "skipped" in e:
                    print(f"{kind:<12}{e['batch']:>6} {e['precision']:<5} skipped ({e['skipped']})")
                    continue
                print(f"{kind:<12}{e['batch']:>6} {e['precision']:<5}{'y' if e.get('channels_last') else '':>3}"
                      f"{e['images_per_s']:>10.2f}{_fmt(e.get('ratio_to_model_only')):>9}{e['cpu_ms_per_image']:>11.1f}"
                      f"{_fmt(e.get('host_cpu_ms_per_image_outside_forward')):>12}{_fmt(e['peak_memory_mib']):>10}"
                      f"{_fmt(e['gpu_busy']):>6}")
        for precision, f in m["fidelity"].items():
            print(f"fidelity {precision} vs fp32: {f['matched']} matched, {f['unmatched']} unmatched; |dscore| mean "
                  f"{f['score_delta_mean']} max {f['score_delta_max']}; mask IoU mean {f['mask_iou_mean']} min {f['mask_iou_min']}")
    print(f"\nelapsed {report['elapsed_s']} s")


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:g}"


if __name__ == "__main__":
    main()

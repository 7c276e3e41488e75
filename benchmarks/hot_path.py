"""The predictor actor's hot path: encoding from box crops against the full-resolution reference.

Prints figures in one run; asserts nothing. For each scene (1920x1080 with 20 instances,
4000x3000 with 50):
  - encode_instances, encode_panoptic and encode_densepose ms/image, new (crops, one-pass id
    map) against the full-mask reference (tests/reference_encoding.py) in the same run, and the
    ratio; outputs are checked equal before timing;
  - bytes a backend moves device -> host: full masks (what detectron2's `.to("cpu")` moved) vs
    crops; the int32 panoptic id map vs the narrow one.
With detectron2 installed (random-init R50-FPN Mask R-CNN, CPU):
  - the backend's own work outside the model forward (postprocess, paste over the box,
    crops to host, encode) per image, with the forward replaced by a recorded output;
  - what batching changes against one-image forwards (detectron2 pads a batch to its
    largest image): matched-instance mask IoU and score deltas, batched vs single, with and
    without grouping images of similar shape (predictors.base.group_by_shape).

    .venv/bin/python benchmarks/hot_path.py [--repeat 7] [--skip-detectron2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchseg.rows.encoding import encode_densepose, encode_instances, encode_panoptic  # noqa: E402
from batchseg.predictors.base import CroppedMasks, DensePose, Detections, Panoptic, PanopticSegment  # noqa: E402
from tests import reference_encoding as reference  # noqa: E402
from benchmarks.matching import greedy_pairs  # noqa: E402

SCENES = [(1080, 1920, 20), (3000, 4000, 50)]


def scene(height: int, width: int, n: int, seed: int = 0):
    """n instances: elliptic blobs in random boxes (5..40 % of each side), as detectron2 crops
    them (box + 1 pixel, clipped); plus the full masks the reference needs."""
    rng = np.random.default_rng(seed)
    boxes, crops, offsets, full = [], [], [], np.zeros((n, height, width), bool)
    for i in range(n):
        bw, bh = rng.uniform(0.05, 0.4) * width, rng.uniform(0.05, 0.4) * height
        x0, y0 = rng.uniform(-0.05 * width, width - 0.9 * bw), rng.uniform(-0.05 * height, height - 0.9 * bh)
        x1, y1 = min(x0 + bw, width), min(y0 + bh, height)
        x0, y0 = max(x0, 0.0), max(y0, 0.0)
        boxes.append([x0, y0, x1, y1])
        cy0, cx0 = max(int(y0) - 1, 0), max(int(x0) - 1, 0)
        cy1, cx1 = min(int(np.ceil(y1)) + 1, height), min(int(np.ceil(x1)) + 1, width)
        yy, xx = np.mgrid[cy0:cy1, cx0:cx1] + 0.5
        blob = ((xx - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 + ((yy - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2 <= 1
        crops.append(np.asfortranarray(blob))  # column-major, as backends hand crops over
        offsets.append([cy0, cx0])
        full[i, cy0:cy1, cx0:cx1] = blob
    masks = CroppedMasks(height, width, np.asarray(offsets, np.int64), tuple(crops))
    det = Detections(np.asarray(boxes, np.float32), rng.uniform(0.5, 1, n).astype(np.float32),
                     rng.integers(1, 91, n), masks)
    return det, full


def panoptic(det: Detections, full: np.ndarray) -> Panoptic:
    """Things painted in score order over five wavy stuff bands, as detectron2 combines them."""
    height, width = full.shape[1:]
    yy, xx = np.mgrid[:height, :width]
    band = ((yy + 0.05 * height * np.sin(xx / width * 12)) / height * 5).astype(np.int32).clip(0, 4)
    id_map = np.zeros((height, width), np.int32)
    segments = []
    for i in np.argsort(-det.scores):
        free = full[i] & (id_map == 0)
        if free.any():
            segments.append(PanopticSegment(len(segments) + 1, int(det.category_ids[i]), True, float(det.scores[i])))
            id_map[free] = len(segments)
    for b in range(5):
        free = (band == b) & (id_map == 0)
        segments.append(PanopticSegment(len(segments) + 1, 184 + b, False))
        id_map[free] = len(segments)
    return Panoptic(id_map, segments)


def densepose(det: Detections) -> tuple[DensePose, np.ndarray]:
    """People over det's boxes: smooth I/U/V charts over each integer box, foreground where I > 0."""
    height, width = det.masks.height, det.masks.width
    iuv, offsets, crops = [], [], []
    full = np.zeros((len(det.scores), height, width), bool)
    for k, (x0, y0, x1, y1) in enumerate(det.boxes):
        x, y, w, h = int(x0), int(y0), int(x1 - x0), int(y1 - y0)
        yy, xx = np.mgrid[:h, :w]
        inside = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2 <= 1
        parts = np.where(inside, 1 + (yy * 24 // max(h, 1)), 0).astype(np.uint8)
        u = (xx * 255 // max(w, 1)).astype(np.uint8) * inside
        v = (yy * 255 // max(h, 1)).astype(np.uint8) * inside
        iuv.append(np.stack([parts, u, v]))
        offsets.append([y, x])
        crops.append(np.asfortranarray(parts > 0))
        full[k, y:y + h, x:x + w] = parts > 0
    masks = CroppedMasks(height, width, np.asarray(offsets, np.int64), tuple(crops))
    return DensePose(det.boxes, det.scores, np.ones(len(det.scores), np.int64), iuv, masks), full


def timed(new, ref, repeat: int) -> tuple[float, float]:
    """Median CPU times of new() and ref() in this process, milliseconds, interleaved (ref every
    third round: it is slow). CPU time, not wall time: the machine is shared, and all of this
    is single-threaded (torch is set to one thread, as in an actor with num_cpus=1)."""
    t_new, t_ref = [], []
    for r in range(repeat):
        t = time.process_time()
        new()
        t_new.append(time.process_time() - t)
        if ref is not None and r % 3 == 0:
            t = time.process_time()
            ref()
            t_ref.append(time.process_time() - t)
    return 1e3 * statistics.median(t_new), 1e3 * statistics.median(t_ref) if t_ref else float("nan")


def encoding_figures(repeat: int) -> None:
    print("## encoding, ms/image (median of %d), new vs full-resolution reference, same run" % repeat)
    print(f"{'image':>10} {'n':>3} {'encoder':<18} {'new ms':>8} {'ref ms':>8} {'ratio':>7}   device->host bytes: ref -> new")
    for height, width, n in SCENES:
        det, full = scene(height, width, n)
        pan = panoptic(det, full)
        narrow = Panoptic(np.asfortranarray(pan.id_map.astype(np.uint8)), pan.segments)  # as backends hand it over
        dp, dp_full = densepose(det)
        dp_masks_only = DensePose(dp.boxes, dp.scores, dp.category_ids, dp.iuv, dp.masks)
        assert encode_instances(det, 0.0) == reference.encode_instances(det, full, 0.0)
        assert encode_panoptic(narrow) == reference.encode_panoptic(pan)
        assert encode_densepose(dp, 0.0) == reference.encode_densepose(dp, dp_full, 0.0)
        iuv_bytes = sum(x.nbytes for x in dp.iuv)
        rows = [
            ("instances", lambda: encode_instances(det, 0.0), lambda: reference.encode_instances(det, full, 0.0),
             full.nbytes, det.masks.nbytes),
            ("panoptic", lambda: encode_panoptic(narrow), lambda: reference.encode_panoptic(pan),
             pan.id_map.nbytes, narrow.id_map.nbytes),
            ("panoptic (int32)", lambda: encode_panoptic(pan), None, None, None),
            ("densepose", lambda: encode_densepose(dp, 0.0), lambda: reference.encode_densepose(dp, dp_full, 0.0),
             dp_full.nbytes + iuv_bytes, iuv_bytes),
            ("densepose masks", lambda: _densepose_masks(dp_masks_only), lambda: _densepose_masks_ref(dp, dp_full),
             None, None),
        ]
        for name, new, ref, ref_bytes, new_bytes in rows:
            t_new, t_ref = timed(new, ref, repeat)
            moved = f"{ref_bytes / 1e6:9.1f} MB -> {new_bytes / 1e6:6.2f} MB" if ref_bytes else ""
            print(f"{width}x{height:<5} {n:>3} {name:<18} {t_new:8.2f} {t_ref:8.1f} {t_ref / t_new:6.1f}x   {moved}")
    print("(densepose includes the I/U/V PNG, the same in both; 'densepose masks' is the foreground RLE alone."
          " The new panoptic reads the uint8 id map backends now hand over; 'panoptic (int32)' the old dtype.)")


def _densepose_masks(dp: DensePose):
    from batchseg.rows.encoding import encode_masks

    return encode_masks(dp.masks, np.arange(len(dp.masks)))


def _densepose_masks_ref(dp: DensePose, full: np.ndarray):
    from batchseg.rows.encoding import encode_mask

    return [encode_mask(m) for m in full]


# --- with detectron2: the backend's work outside the forward, and what batching changes ------

def backend_figures(repeat: int) -> None:
    """Post-forward work of the detectron2 instance backend on CPU, new against old.

    The model's forward is replaced by recorded raw outputs (boxes, scores, 28x28 mask
    probabilities: blobs over the same boxes as the encoding scenes), so only what follows the
    forward is timed: input tensors, detector_postprocess, paste, device -> host, encode.
    On a GPU the paste runs on the device; here it is CPU work in both columns.
    """
    import torch
    from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN
    from detectron2.structures import Boxes, Instances

    from batchseg.config import ModelConfig
    from batchseg.predictors.base import ModelInput
    from batchseg.predictors.detectron2 import Detectron2Backend

    torch.set_num_threads(1)
    cfg = ModelConfig(backend="detectron2", model="COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
                      score_threshold=0.0, random_init=True)
    backend = Detectron2Backend(cfg, None, "cpu", "fp32")
    print("\n## detectron2 instance backend after the forward, CPU ms/image (forward replaced by its recorded output)")
    print("new: paste over the boxes, crops to host, encode crops; old: full-image paste, .to('cpu'), full-mask encode")
    print(f"{'image':>10} {'n':>3} {'new ms':>8} {'old ms':>8} {'ratio':>7}")
    for height, width, n in SCENES:
        det, _ = scene(height, width, n)
        image = np.zeros(Detectron2Backend.preprocessor(cfg)(np.zeros((height, width, 3), np.uint8)).shape, np.uint8)
        input_h, input_w = image.shape[:2]
        x = ModelInput("x", image, height, width)
        raw = Instances((input_h, input_w))
        raw.pred_boxes = Boxes(torch.from_numpy(det.boxes * np.float32(input_w / width)))
        raw.scores = torch.from_numpy(det.scores)
        raw.pred_classes = torch.zeros(n, dtype=torch.int64)
        yy, xx = np.mgrid[:28, :28] + 0.5
        blob = 1 / (1 + np.exp(-8 * (1 - ((yy - 14) / 12) ** 2 - ((xx - 14) / 12) ** 2)))
        raw.pred_masks = torch.from_numpy(np.broadcast_to(blob, (n, 1, 28, 28)).astype(np.float32).copy())
        backend.model.inference = lambda inputs, do_postprocess=True: [_copy(raw)]

        def new():
            return encode_instances(backend.predict([x])[0], 0.0)

        predicted = backend.predict([x])[0]

        def old():
            inputs = [{"image": torch.as_tensor(image.astype("float32").transpose(2, 0, 1)), "height": height, "width": width}]
            out = GeneralizedRCNN._postprocess(backend.model.inference(inputs), inputs, [(input_h, input_w)])
            inst = out[0]["instances"].to("cpu")
            full = inst.pred_masks.numpy().astype(bool)
            d = Detections(inst.pred_boxes.tensor.numpy(), inst.scores.numpy(), np.ones(len(inst), np.int64),
                           CroppedMasks.empty(height, width))
            return reference.encode_instances(d, full, 0.0)

        assert new() == old()
        t_new, t_old = timed(new, old, max(3, repeat // 2))
        t_encode, _ = timed(lambda: encode_instances(predicted, 0.0), None, repeat)
        print(f"{width}x{height:<5} {n:>3} {t_new:8.1f} {t_old:8.1f} {t_old / t_new:6.1f}x   "
              f"of new: encode {t_encode:.1f}, the rest (uint8 input, postprocess, paste, crops to host) {t_new - t_encode:.1f}")


def _copy(inst):
    """A copy of an Instances whose boxes can be scaled in place (detector_postprocess does)."""
    from detectron2.structures import Boxes, Instances

    fields = dict(inst.get_fields(), pred_boxes=Boxes(inst.pred_boxes.tensor.clone()))
    return Instances(inst.image_size, **fields)


def batching_figures() -> None:
    """Batched forwards against one-image forwards on the same random-init weights (CPU, fp32).

    detectron2 pads every image of a batch to the batch's largest (rounded up to 32 px), which
    changes the features near the right and bottom edges and so the detections. Instances are
    matched greedily by class and box IoU >= 0.5; reported: images whose rows are identical,
    how many instances match, their score deltas and mask IoU, and the padding the batches
    carried. "4 copies" batches each image with itself (no padding): the noise floor of a
    batched forward alone (other kernels for other batch sizes). Random weights are far more
    sensitive than trained ones (scores sit near the threshold, tiny float differences flip
    detections): these figures bound the effect from above; re-measure with real weights.
    """
    import torch

    from batchseg.config import ModelConfig
    from batchseg.predictors.base import ModelInput, group_by_shape
    from batchseg.predictors.detectron2 import Detectron2Backend

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(backend="detectron2", model="COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
                      score_threshold=0.05, random_init=True, min_size=320, max_size=544)
    backend = Detectron2Backend(cfg, None, "cpu", "fp32")
    prep = Detectron2Backend.preprocessor(cfg)
    rng = np.random.default_rng(1)
    sizes = [(480, 640), (640, 480), (360, 640), (600, 600), (400, 1000), (427, 640), (640, 427), (480, 640)]
    images = []
    for k, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[:h, :w]
        rgb = np.stack([(np.sin(xx / (17 + 3 * k)) + np.cos(yy / (23 + k)) + 2) * 60 + rng.integers(0, 20, (h, w))
                        for _ in range(3)], -1).astype(np.uint8)
        for _ in range(6):  # a few flat shapes, like the samples
            y0, x0 = rng.integers(0, h - 60), rng.integers(0, w - 60)
            rgb[y0:y0 + rng.integers(30, 120), x0:x0 + rng.integers(30, 160)] = rng.integers(0, 256, 3)
        images.append(ModelInput(f"img{k}", prep(rgb), h, w))
    shapes = [x.image.shape[:2] for x in images]
    single = [backend.predict([x])[0] for x in images]
    plans = {
        "4 copies of each image (no pad)": [[i] * 4 for i in range(len(images))],  # the noise floor
        "batches of 4, arrival order": [list(range(k, min(k + 4, len(images)))) for k in range(0, len(images), 4)],
        "batches of 4, group_by_shape": group_by_shape(shapes, 4),
    }
    print("\n## batched vs one-image forwards (detectron2 R50-FPN Mask R-CNN, random init, CPU fp32, inputs ~320 px)")
    print("padding: pixels added by padding / image pixels; dets: single / batched; matched: of single's")
    print(f"{'plan':<32} {'padding':>8} {'same':>5} {'dets':>9} {'matched':>8} {'|dscore| mean/max':>18} {'mask IoU mean/min':>18}")
    for name, batches in plans.items():
        batched: dict[int, Detections] = {}
        padded = 0
        for batch in batches:
            hmax = -(-max(shapes[i][0] for i in batch) // 32) * 32
            wmax = -(-max(shapes[i][1] for i in batch) // 32) * 32
            padded += sum(hmax * wmax - shapes[i][0] * shapes[i][1] for i in set(batch))
            batched.update(reversed(list(zip(batch, backend.predict([images[i] for i in batch])))))  # first copy wins
        stats = [_match(single[i], batched[i]) for i in range(len(images))]
        n_single = sum(len(d.scores) for d in single)
        n_batched = sum(len(batched[i].scores) for i in range(len(images)))
        deltas = np.concatenate([s[0] for s in stats])
        ious = np.concatenate([s[1] for s in stats])
        same = sum(encode_instances(single[i], 0.0) == encode_instances(batched[i], 0.0) for i in range(len(images)))
        print(f"{name:<32} {padded / sum(h * w for h, w in shapes):7.0%} {same:>2}/{len(images):<2} {n_single:>4}/{n_batched:<4} "
              f"{len(ious) / max(n_single, 1):7.0%} {deltas.mean():8.2e}/{deltas.max():8.2e} "
              f"{ious.mean():8.4f}/{ious.min():8.4f}")


def _match(a: Detections, b: Detections) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one matches (same class, box IoU >= 0.5, highest first) -> (|score deltas|, mask IoUs)."""
    from pycocotools import mask as mask_util

    from batchseg.rows.encoding import encode_masks

    if not len(a.scores) or not len(b.scores):
        return np.zeros(0), np.zeros(0)
    xywh = lambda boxes: np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]])  # noqa: E731
    box_iou = mask_util.iou(xywh(a.boxes).astype(np.float64), xywh(b.boxes).astype(np.float64), [0] * len(b.boxes))
    box_iou[a.category_ids[:, None] != b.category_ids[None, :]] = 0
    pairs = greedy_pairs(box_iou)
    deltas = [abs(float(a.scores[i]) - float(b.scores[j])) for i, j in pairs]
    ra = encode_masks(a.masks, np.array([i for i, _ in pairs], int))
    rb = encode_masks(b.masks, np.array([j for _, j in pairs], int))
    ious = [mask_util.iou([_rle(x)], [_rle(y)], [0])[0, 0] if x["counts"] != y["counts"] else 1.0 for x, y in zip(ra, rb)]
    return np.asarray(deltas), np.asarray(ious, float)


def _rle(cell):
    return {"size": cell["size"], "counts": cell["counts"].encode()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--skip-detectron2", action="store_true", help="encoding figures only")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    encoding_figures(args.repeat)
    if args.skip_detectron2:
        return
    try:
        import detectron2  # noqa: F401
    except ImportError:
        print("\n(detectron2 is not installed: backend and batching figures skipped)")
        return
    backend_figures(args.repeat)
    batching_figures()


if __name__ == "__main__":
    main()

"""Throughput and driver memory, measured in one run. Prints figures; asserts nothing.

    python benchmarks/throughput.py [--images 32] [--batch-size 4] [--min-size 320] [--device cpu]

1. model only, one image per forward vs batch_size images per forward (same images, same
   model): the batching ratio.
2. the whole pipeline (list, read, decode, predict, encode, write on local Ray) vs the
   batched model alone: how much of the model's speed the pipeline keeps.
3. driver peak RSS for a run over N and over 4N images: must not grow with N.
On CPU the actor gets one core (Ray's num_cpus=1 sets its torch threads) while model-only
uses all of them, so there pipeline/model understates what a GPU node keeps.
Absolute images/s mean something only on the GPU they were taken on.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchseg import job  # noqa: E402
from batchseg.config import ModelConfig, load_config  # noqa: E402
from batchseg.predictors.base import ModelInput  # noqa: E402
from batchseg.predictors.torchvision import TorchvisionBackend  # noqa: E402


def make_images(folder: Path, count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` 480x640 JPEGs of random rectangles; returns the RGB arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(count):
        rgb = np.full((480, 640, 3), 110, np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, 400), rng.integers(0, 560)
            rgb[y:y + rng.integers(20, 80), x:x + rng.integers(20, 80)] = rng.integers(0, 255, 3)
        Image.fromarray(rgb).save(folder / f"img_{i:05d}.jpg", quality=90)
        images.append(rgb)
    return images


def model_only(backend, inputs: list[ModelInput], batch_size: int) -> float:
    """images/s of backend.predict over `inputs` in chunks of batch_size (after one warm-up)."""
    backend.predict(inputs[:batch_size])
    start = time.perf_counter()
    for i in range(0, len(inputs), batch_size):
        backend.predict(inputs[i:i + batch_size])
    return len(inputs) / (time.perf_counter() - start)


def pipeline_run(images: Path, out: Path, model: dict, args) -> dict:
    cfg = load_config(None, [
        (["inputs"], [str(images)]), (["output"], str(out)), (["models"], {"instance": model}),
        (["batch_size"], args.batch_size), (["device"], args.device), (["overwrite"], True),
    ])
    job.preflight(cfg)
    return job.run(cfg)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import ray
    import torch

    work = Path(tempfile.mkdtemp(prefix="batchseg-bench-"))
    rgbs = make_images(work / "small", args.images)
    make_images(work / "large", 4 * args.images, seed=1)
    model = {"backend": "torchvision", "random_init": True, "min_size": args.min_size,
             "max_size": int(args.min_size * 1.667), "score_threshold": 0.5}

    # pipeline first: the driver's peak RSS must not include a model loaded in-process below
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rss_before = peak_rss_mib()
    small = pipeline_run(work / "small", work / "out_small", model, args)
    rss_small = peak_rss_mib()
    large = pipeline_run(work / "large", work / "out_large", model, args)
    rss_large = peak_rss_mib()
    ray.shutdown()

    torch.manual_seed(0)
    mcfg = ModelConfig(**model)
    backend = TorchvisionBackend(mcfg, None, args.device, "fp32")
    prep = TorchvisionBackend.preprocessor(mcfg)
    inputs = [ModelInput(str(i), prep(x), *x.shape[:2]) for i, x in enumerate(rgbs)]
    single = model_only(backend, inputs, 1)
    batched = model_only(backend, inputs, args.batch_size)

    print(f"device {args.device}, {torch.get_num_threads()} torch threads, 480x640 JPEGs resized to "
          f"short side {args.min_size}, batch size {args.batch_size}")
    print(f"model only, 1 image/forward:   {single:8.2f} images/s")
    print(f"model only, {args.batch_size} images/forward:  {batched:8.2f} images/s   batched/single = {batched / single:.2f}")
    print(f"pipeline ({args.images} images):          {small['images_per_s']:8.2f} images/s   "
          f"pipeline/model = {small['images_per_s'] / batched:.2f}  (wall {small['wall_time_s']:.1f} s incl. actor start)")
    print(f"pipeline ({4 * args.images} images):         {large['images_per_s']:8.2f} images/s   "
          f"pipeline/model = {large['images_per_s'] / batched:.2f}  (wall {large['wall_time_s']:.1f} s)")
    print(f"driver peak RSS: {rss_before:.0f} MiB before runs, {rss_small:.0f} after {args.images} images, "
          f"{rss_large:.0f} after {4 * args.images} images (growth {rss_large - rss_small:+.0f} MiB for 4x the images)")


if __name__ == "__main__":
    main()

"""Throughput and driver memory, measured in one run. Prints figures; asserts nothing.

    python benchmarks/throughput.py [--images 32] [--batch-size 4] [--min-size 320] [--device cpu]
                                    [--zero-cost-images 400] [--skip-model]

1. model only, one image per forward vs batch_size images per forward (same images, same
   model): the batching ratio.
2. the whole pipeline (list, read, decode, predict, encode, write on local Ray) vs the
   batched model alone: how much of the model's speed the pipeline keeps.
3. driver peak RSS for a run over N and over 4N images: must not grow with N.
4. a model that costs nothing (ZeroCostBackend: the backend protocol, 20 instances per image
   with masks of realistic size) over 1920x1080 JPEGs resized to 800: the pipeline's images/s
   against the cores Ray has times a tight single-process loop doing the same work (read,
   decode, resize, predict, encode, one Parquet file). What is left is the pipeline's own cost.
   Three figures: over N images (start-up included), marginal (3N / the wall time 4N adds),
   and running (4N images from the first batch in a predictor to the end).
   Twice, in one run: one actor decoding on two threads (the pool before every CPU got an
   actor) and the default pool; each with the start-up (run start to the first batch in a
   predictor).
5. the predictor actor's serial CPU per image outside the forward: Annotate over 16 decoded
   1920x1080 images with 20 instances each (ZeroCostBackend), the CPU time of the calling
   thread (encoding runs on the actor's encoder thread, overlapping the next forward).
On CPU the actor gets one core (Ray's num_cpus=1 sets its torch threads) while model-only
uses all of them, so there pipeline/model understates what a GPU node keeps.
Absolute images/s mean something only on the GPU they were taken on.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from batchseg.run import job  # noqa: E402
from batchseg.config import ModelConfig, load_config  # noqa: E402
from batchseg.predictors.base import Categories, Category, ModelInput  # noqa: E402

ZERO_COST_INSTANCES = 20


class ZeroCostBackend:
    """A model that costs nothing, through the same protocol as a real backend: each image gets
    ZERO_COST_INSTANCES instances whose masks (elliptic blobs in boxes of 5..40 % of each side,
    cropped as detectron2 crops them) are made once per image size and handed out again."""

    def __init__(self, cfg: ModelConfig, weights: str | None, device: str, precision: str) -> None:
        self.scenes: dict[tuple[int, int], object] = {}
        self.instances = int(cfg.options.get("instances", ZERO_COST_INSTANCES))

    @staticmethod
    def preprocessor(cfg: ModelConfig):
        from batchseg.inputs.imaging import ShortestEdge

        return ShortestEdge(800, 1333)

    @staticmethod
    def categories(cfg: ModelConfig) -> Categories:
        return Categories({i: Category(i, f"class{i}") for i in range(1, 91)})

    def predict(self, images: list[ModelInput]) -> list:
        from hot_path import scene

        for x in images:
            if (x.height, x.width) not in self.scenes:
                self.scenes[x.height, x.width] = scene(x.height, x.width, self.instances)[0]
        return [self.scenes[x.height, x.width] for x in images]


def make_images(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (480, 640),
                keep: bool = True) -> list[np.ndarray]:
    """`count` JPEGs of `size` (h, w): a gradient with random rectangles; returns the RGB arrays
    (none unless `keep`: 1,600 of 1080p would be 10 GB)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    h, w = size
    for i in range(count):
        rgb = np.zeros((h, w, 3), np.uint8)
        rgb[...] = (np.linspace(40, 200, w)[None, :, None] + np.linspace(0, 40, h)[:, None, None]).astype(np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, h - 80), rng.integers(0, w - 80)
            rgb[y:y + rng.integers(20, 80), x:x + rng.integers(20, 80)] = rng.integers(0, 255, 3)
        Image.fromarray(rgb).save(folder / f"img_{i:05d}.jpg", quality=90)
        if keep:
            images.append(rgb)
    return images


def model_only(backend, inputs: list[ModelInput], batch_size: int) -> float:
    """images/s of backend.predict over `inputs` in chunks of batch_size (after one warm-up)."""
    backend.predict(inputs[:batch_size])
    start = time.perf_counter()
    for i in range(0, len(inputs), batch_size):
        backend.predict(inputs[i:i + batch_size])
    return len(inputs) / (time.perf_counter() - start)


def pipeline_run(images: Path, out: Path, model: dict, args, **settings) -> dict:
    """One run on the connected Ray; its report."""
    cfg = load_config(None, [
        (["inputs"], [str(images)]), (["output"], str(out)), (["models"], {"instance": model}),
        (["batch_size"], args.batch_size), (["device"], args.device), (["overwrite"], True),
    ] + [([key], value) for key, value in settings.items()])
    job.preflight(cfg)
    return job.run(cfg)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tight_loop(files: list[Path], out: Path) -> float:
    """images/s of one process doing a run's work per image: read, decode, resize, predict
    (ZeroCostBackend), encode, and a Parquet file of the rows at the end."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchseg.rows.encoding import encode_instances
    from batchseg.inputs.imaging import decode_image, model_inputs
    from batchseg.rows.schema import ROW, image_id

    cfg = ModelConfig(backend="benchmarks.throughput:ZeroCostBackend")
    backend, prep = ZeroCostBackend(cfg, None, "cpu", "fp32"), ZeroCostBackend.preprocessor(cfg)
    start, rows = time.perf_counter(), []
    for path in files:
        image = decode_image(path.read_bytes(), 89_478_485)
        det = backend.predict([ModelInput(str(path), *model_inputs(image, [prep]), image.height, image.width)])[0]
        rows.append({"image_id": image_id(str(path)), "image_uri": str(path), "width": image.width,
                     "height": image.height, "instances": encode_instances(det, 0.5)})
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW), out)
    return len(files) / (time.perf_counter() - start)


def zero_cost_section(args, work: Path) -> None:
    """N and 4N images: the raw ratio of the N-image run (planning and actor start included),
    and the marginal one, 3N / (wall(4N) - wall(N)), which leaves out what a run pays once."""
    import ray

    n = args.zero_cost_images
    make_images(work / "zero_cost_n", n, seed=2, size=(1080, 1920), keep=False)
    make_images(work / "zero_cost_4n", 4 * n, seed=3, size=(1080, 1920), keep=False)
    single = tight_loop(sorted((work / "zero_cost_n").glob("*.jpg")), work / "tight.parquet")
    start = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    cores = int(ray.cluster_resources()["CPU"])
    model = {"backend": "benchmarks.throughput:ZeroCostBackend", "score_threshold": 0.5}
    ideal = cores * single
    print(f"zero-cost model: JPEGs of 1920x1080 resized to 800, {ZERO_COST_INSTANCES} instances each, {cores} cores; "
          f"ray.init {ray_start:.1f} s")
    print(f"tight single-process loop ({n} images): {single:8.2f} images/s; x {cores} cores = {ideal:.2f}")
    pipeline_run(work / "zero_cost_n", work / "out_warm_up", model, args)  # both rows start on a warm Ray
    # before: one actor with a CPU kept spare, decoding on both cores; after: one actor per CPU
    for name, settings in (("one actor, decoding on 2 threads (the pool before)", {"num_actors": 1, "decode_threads": 2}),
                           ("the default pool", {})):
        small = pipeline_run(work / "zero_cost_n", work / "out_zero_cost_n", model, args, **settings)
        large = pipeline_run(work / "zero_cost_4n", work / "out_zero_cost_4n", model, args, **settings)
        marginal = 3 * n / (large["wall_time_s"] - small["wall_time_s"])
        print(f"{name}, pool of {small['actors']['max']} actor(s):")
        print(f"  pipeline, {n} images:      {small['images_per_s']:8.2f} images/s   / (cores x loop) = "
              f"{small['images_per_s'] / ideal:.2f}  (wall {small['wall_time_s']:.1f} s incl. planning and actor start)")
        print(f"  pipeline, {4 * n} images:     {large['images_per_s']:8.2f} images/s   / (cores x loop) = "
              f"{large['images_per_s'] / ideal:.2f}  (wall {large['wall_time_s']:.1f} s)")
        print(f"  marginal ({3 * n} more images): {marginal:8.2f} images/s   / (cores x loop) = {marginal / ideal:.2f}")
        running = 4 * n / (large["wall_time_s"] - large["predictors"]["startup_s"])
        print(f"  running ({4 * n} images, first batch in a predictor to the end): {running:8.2f} images/s   "
              f"/ (cores x loop) = {running / ideal:.2f}")
        print(f"  start-up: run start to the first batch in a predictor {small['predictors']['startup_s']} s "
              f"(benchmarks/startup.py has the rest); bottleneck: {small['predictors']['bottleneck']}")
    ray.shutdown()


def actor_section() -> None:
    from batchseg.run.stages import Annotate

    images, repeat = 16, 5
    cfg = load_config(None, [(["inputs"], ["/x"]), (["output"], "/o"), (["models"], {"instance": {
        "backend": "benchmarks.throughput:ZeroCostBackend", "options": {"instances": 20}}})])
    actor = Annotate(cfg, "cpu")
    rgb = np.zeros((1080, 1920, 3), np.uint8)
    model_input = ZeroCostBackend.preprocessor(cfg.models["instance"])(rgb)
    batch = {
        "uri": np.array([f"s3://lake/{i}.jpg" for i in range(images)], object), "size": np.zeros(images, np.int64),
        "version": np.array(["v"] * images, object), "key": np.arange(images, dtype=np.int64),
        "members": np.full(images, -1, np.int32), "error": np.array([None] * images, object),
        "error_kind": np.array([None] * images, object), "height": np.full(images, 1080, np.int32),
        "width": np.full(images, 1920, np.int32), "image_0": np.array([model_input] * images + [None], object)[:-1],
    }
    actor(batch)  # warm up: masks made once per image size
    serial, total = [], []
    for _ in range(repeat):
        thread, process = time.thread_time(), time.process_time()
        actor(batch)
        serial.append((time.thread_time() - thread) * 1000 / images)
        total.append((time.process_time() - process) * 1000 / images)
    print(f"predictor actor, 1920x1080 with 20 instances, CPU outside the forward: "
          f"{sorted(serial)[repeat // 2]:.2f} ms/image serial (calling thread), "
          f"{sorted(total)[repeat // 2]:.2f} ms/image in all (with encoding on the encoder thread)")


def model_section(args, work: Path) -> None:
    import ray
    import torch

    from batchseg.predictors.torchvision import TorchvisionBackend

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--zero-cost-images", type=int, default=400)
    parser.add_argument("--skip-model", action="store_true", help="only the zero-cost section")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")])
    work = Path(tempfile.mkdtemp(prefix="batchseg-bench-"))
    actor_section()
    if not args.skip_model:
        model_section(args, work)
    zero_cost_section(args, work)


if __name__ == "__main__":
    main()

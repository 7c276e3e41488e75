"""`batchseg train` on the driver: check everything, hand the work to Ray Train, write the model.

    data (reviews | COCO GT)  -> examples, split by image_id hash     (driver: URIs and RLE text)
      -> Ray Data: decode + resize in tasks                            (pixels never on the driver)
      -> TorchTrainer: train_loop on N workers, DDP, checkpoints        (RunConfig storage, FailureConfig)
      -> OUTPUT/: weights.pt (+ .sha256), label_map.json, metrics.jsonl, curves.png, model_card.json

Everything that can be wrong without training (no data, too few images, a category with no
instance, base weights whose head does not fit, an output holding another model) fails here
with one line, before any worker starts. A re-run of the same command (same data, settings
and base) resumes from the newest checkpoint; with model_card.json written, it has nothing
left to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from batchseg.config import ConfigError, StorageConfig
from batchseg.predictors.weights import WeightsRef, fetch, file_sha256, resolve
from batchseg.run.provenance import batchseg_version
from batchseg.train import data as training_data
from batchseg.train.model_dir import CARD, CURVES, LABEL_MAP, METRICS, STARTED, WEIGHTS
from batchseg.train.hyper import Hyper

log = logging.getLogger(__name__)

TASKS = ("instance",)
BACKENDS = ("torchvision", "detectron2")


@dataclass(frozen=True)
class TrainSpec:
    """One training job. `data`: a reviews output folder or a COCO ground-truth .json;
    `images`: the folder COCO file_names are under (default: the .json's folder);
    `checkpoints`: Ray Train storage (default OUTPUT/checkpoints), local or s3://."""

    data: str
    output: str
    task: str = "instance"
    backend: str = "torchvision"
    images: str | None = None
    base_weights: str | None = None
    keep_head: bool = False
    categories: list[str] | None = None
    include_model_rows: bool = False
    heldout_fraction: float = 0.1
    min_images: int = 10
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    checkpoints: str | None = None
    max_failures: int = 3
    hyper: Hyper = field(default_factory=Hyper)
    storage: StorageConfig = field(default_factory=StorageConfig)


def plan(spec: TrainSpec) -> tuple[training_data.TrainingData, WeightsRef | None, str]:
    """Every check, no worker: (the data split, the pinned base weights, the spec's identity).
    Raises ConfigError (one line) for anything that would fail later."""
    if spec.task not in TASKS:
        raise ConfigError(f"--task {spec.task}: training covers {', '.join(TASKS)} only")
    if spec.backend not in BACKENDS:
        raise ConfigError(f"--backend {spec.backend}: use one of {', '.join(BACKENDS)}")
    if spec.backend == "detectron2":
        from batchseg.train.detectron2 import check_installed

        check_installed()
        if spec.keep_head:
            raise ConfigError("--keep-head is for --backend torchvision: detectron2's loading keeps a base head that "
                              "fits and starts a new one where it does not; drop --keep-head")
    if not 0 < spec.heldout_fraction < 1:
        raise ConfigError(f"--heldout {spec.heldout_fraction}: give a fraction between 0 and 1, e.g. 0.1")
    if spec.data.rstrip("/").endswith(".json"):
        if spec.include_model_rows:
            raise ConfigError("--include-model-rows reads a run's output (the merged view); --data is a COCO file")
        examples, categories, source = training_data.from_coco(spec.data, spec.images, spec.storage)
    else:
        examples, categories, source = training_data.from_reviews(spec.data, spec.storage, spec.include_model_rows)
    training_data.check_readable(examples, spec.storage,
                                 "give --images, the folder the file_names are under" if spec.data.rstrip("/").endswith(".json")
                                 else "the reviewed images are read where the run read them")
    examples, categories = training_data.select_categories(examples, categories, spec.categories)
    split = training_data.split(examples, categories, source, spec.heldout_fraction)
    needed = max(spec.min_images, spec.hyper.batch_size * spec.workers)
    if len(split.train) < needed:
        raise ConfigError(f"{spec.data}: {len(split.train)} training images (after holding out "
                          f"{len(split.heldout)}), fewer than {needed}; review more images, or lower --min-images")
    empty = [name for name, n in split.instances_per_category.items() if n == 0]
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        kept = [n for n in split.instances_per_category if n not in empty]
        raise ConfigError(f"categories with no instance in the training images: {shown}; "
                          + (f"leave them out with --categories {','.join(kept)}" if kept else "review some images first"))
    base = _pin_base(spec, len(categories) + 1)
    identity = _identity(spec, split, base)
    _check_output(spec, identity)
    return split, base, identity


def _pin_base(spec: TrainSpec, num_classes: int) -> WeightsRef | None:
    """The base weights pinned by sha256 (a remote file is fetched once into the cache), and
    checked: the architecture fits and, with keep_head, so does the head."""
    if spec.base_weights is None:
        if spec.keep_head:
            raise ConfigError("--keep-head needs --base-weights")
        return None
    opts = spec.storage.options(spec.base_weights)
    try:
        ref = resolve(spec.base_weights, opts)
        local = fetch(ref, opts)
        ref = WeightsRef(ref.uri, ref.sha256 or file_sha256(local), ref.etag, ref.size)
        if spec.backend == "torchvision":
            from batchseg.train.recipe import from_base

            from_base(spec.hyper.arch, local, num_classes, spec.keep_head)
    except ConfigError:
        raise
    except ValueError as e:  # WeightsError, CheckpointError: one line already
        raise ConfigError(f"--base-weights {spec.base_weights}: {e}") from None
    return ref


def _identity(spec: TrainSpec, split: training_data.TrainingData, base: WeightsRef | None) -> str:
    """What makes this model this model: data, categories, split, base, backend, settings."""
    payload = {"data": {k: v for k, v in split.source.items() if k != "uri"}, "images": len(split.train),
               "heldout": len(split.heldout), "categories": split.categories, "base": base.sha256 if base else None,
               "keep_head": spec.keep_head, "backend": spec.backend, "hyper": spec.hyper.record(),
               "heldout_fraction": spec.heldout_fraction, "workers": spec.workers}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _check_output(spec: TrainSpec, identity: str) -> None:
    """OUTPUT may be new, or hold this same model (finished or under way), nothing else."""
    for name in (CARD, STARTED):
        held = _read_json(spec, name)
        if held is not None and held.get("identity") != identity:
            raise ConfigError(f"--output {spec.output} already holds another model ({name}: trained on "
                              f"{held.get('data', {}).get('uri', '?')}, identity {str(held.get('identity'))[:12]}); "
                              "give a new --output folder")


def train(spec: TrainSpec, planned: tuple[training_data.TrainingData, WeightsRef | None, str] | None = None) -> dict[str, Any]:
    """Train on Ray Train (the caller has connected to Ray) what `plan` checked (planned here
    when not given), write the model. Returns the model card; a finished model in OUTPUT is
    returned as it is."""
    split, base, identity = planned or plan(spec)
    done = finished(spec)
    if done is not None:
        return done
    _write(spec, STARTED, json.dumps({"identity": identity, "data": split.source,
                                      "started_at": _now()}, indent=2).encode())
    started = time.monotonic()
    checkpoint = _fit(spec, split, base, identity)
    with checkpoint.as_directory() as folder:
        with open(f"{folder}/model.pt", "rb") as f:
            weights = f.read()
        with open(f"{folder}/metrics.jsonl") as f:
            history = [json.loads(line) for line in f if line.strip()]
    if history[-1]["iteration"] != spec.hyper.iterations:  # never a finished model from a stopped run
        raise RuntimeError(f"training stopped at iteration {history[-1]['iteration']} of {spec.hyper.iterations}; "
                           "the same command resumes from there")
    card = _card(spec, split, base, identity, weights, history, time.monotonic() - started)
    _write(spec, WEIGHTS, weights)
    _write(spec, WEIGHTS + ".sha256", f"{card['weights']['sha256']}  {WEIGHTS}\n".encode())
    _write(spec, LABEL_MAP, json.dumps(split.label_map(first_index=0 if spec.backend == "detectron2" else 1), indent=2).encode())
    _write(spec, METRICS, "".join(json.dumps(r) + "\n" for r in history).encode())
    _write(spec, CURVES, curves_png(history))
    _write(spec, CARD, json.dumps(card, indent=2).encode())  # last: its presence means "finished"
    return card


def finished(spec: TrainSpec) -> dict[str, Any] | None:
    """The model card when OUTPUT holds this model finished (plan() checked it is this one)."""
    return _read_json(spec, CARD)


def _fit(spec: TrainSpec, split: training_data.TrainingData, base: WeightsRef | None, identity: str):
    """Ray Data decodes, Ray Train trains; returns the newest checkpoint."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from batchseg.train.loop import train_loop

    ray.data.DataContext.get_current().enable_progress_bars = False  # rank 0 prints the one progress line
    # Ray Train sends a worker's print() to its logger even inside contextlib.redirect_stdout,
    # so pycocotools' report of every held-out scoring would reach the console; Ray Train
    # passes this variable on to its workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    index = {c["id"]: i for i, c in enumerate(split.categories, start=1)}
    decode = {"min_size": spec.hyper.min_size, "max_size": spec.hyper.max_size, "category_index": index,
              "storage": spec.storage}

    def decoded(examples: list[dict[str, Any]]):
        return ray.data.from_items(examples).map_batches(training_data.decode_examples, fn_kwargs=decode,
                                                         batch_size=8, num_cpus=1)

    datasets = {"train": decoded(split.train)}
    if split.heldout:
        datasets["heldout"] = decoded(split.heldout)
    _say_if_waiting(spec)
    storage_path, filesystem = _storage(spec)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"backend": spec.backend, "hyper": spec.hyper.record(), "categories": split.categories, "keep_head": spec.keep_head,
                           "base": base.to_dict() if base else None,
                           "storage_options": spec.storage.options(spec.base_weights or "")},
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu,
                                     resources_per_worker={"CPU": spec.cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})}),
        run_config=RunConfig(name=f"train-{identity[:12]}", storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=spec.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    before = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()  # a worker group that failed more than max_failures times raises TrainingFailedError
    except SystemExit:
        # Ctrl-C: Ray Train V2's SIGINT handler (installed by fit) aborts the run's controller
        # and workers, then ends the driver with sys.exit from inside fit; the checkpoints stay.
        raise KeyboardInterrupt("training stopped; the same command resumes from its newest checkpoint") from None
    finally:
        signal.signal(signal.SIGINT, before)  # Ray's handler would abort a controller that has finished
    return result.checkpoint


def _say_if_waiting(spec: TrainSpec) -> None:
    """Ray Train waits for the workers' resources (an autoscaler may add nodes); say so."""
    import ray

    if spec.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < spec.workers:
            log.warning("the cluster has %g GPUs, %d asked for (--workers with --use-gpu): training waits until the "
                        "autoscaler adds them", gpus, spec.workers)


def _storage(spec: TrainSpec) -> tuple[str, Any]:
    """RunConfig storage: a local path, or (for s3://) the bucket path and a pyarrow S3
    filesystem carrying the endpoint and region of the storage config."""
    root = (spec.checkpoints or f"{spec.output.rstrip('/')}/checkpoints").rstrip("/")
    if not root.startswith("s3://"):
        return str(url_to_fs(root)[1]), None
    import pyarrow.fs

    s3 = spec.storage
    filesystem = pyarrow.fs.S3FileSystem(endpoint_override=s3.endpoint_url, region=s3.region or "us-east-1",
                                         anonymous=s3.anon, scheme="http" if (s3.endpoint_url or "").startswith("http:") else "https")
    return root.removeprefix("s3://"), filesystem


def _card(spec: TrainSpec, split: training_data.TrainingData, base: WeightsRef | None, identity: str,
          weights: bytes, history: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    last = history[-1]
    return {
        "identity": identity,
        "created_at": _now(),
        "batchseg_version": batchseg_version(),
        "task": spec.task,
        "backend": spec.backend,
        "model": spec.hyper.arch,
        "min_size": spec.hyper.min_size,
        "max_size": spec.hyper.max_size,
        "weights": {"file": WEIGHTS, "sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights)},
        "label_map": LABEL_MAP,
        # detectron2 builds the model from its zoo config: the class count must be given
        "options": {"MODEL.ROI_HEADS.NUM_CLASSES": len(split.categories)} if spec.backend == "detectron2" else {},
        "base_weights": {"uri": base.uri, "sha256": base.sha256} if base else None,
        "keep_head": spec.keep_head,
        "data": split.card() | {"heldout_fraction": spec.heldout_fraction},
        "hyper": spec.hyper.record(),
        "workers": spec.workers,
        "use_gpu": spec.use_gpu,
        "iterations": last["iteration"],
        "train_s": last.get("train_s"),
        "wall_s": round(wall_s, 1),
        "heldout": {"base": history[0].get("heldout", {}), "trained": last.get("heldout", {})},
    }


def curves_png(history: list[dict[str, Any]]) -> bytes:
    """Loss (left axis) and held-out segm / bbox AP (right axis) against the iteration."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    steps = [r for r in history if "loss" in r]
    ax.plot([r["iteration"] for r in steps], [r["loss"] for r in steps], color="tab:red", label="loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss", color="tab:red")
    ap = fig.axes[0].twinx()
    scored = [r for r in history if r.get("heldout")]
    for key, style in (("segm_AP", "-"), ("segm_AP50", "--"), ("bbox_AP", ":")):
        ap.plot([r["iteration"] for r in scored], [r["heldout"].get(key) or 0 for r in scored], style,
                color="tab:blue", label=f"held-out {key}")
    ap.set_ylabel("held-out AP (%)", color="tab:blue")
    ap.set_ylim(0, 100)
    ap.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _read_json(spec: TrainSpec, name: str) -> dict[str, Any] | None:
    uri = f"{spec.output.rstrip('/')}/{name}"
    try:
        with fsspec.open(uri, "rb", **spec.storage.options(uri)) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def _write(spec: TrainSpec, name: str, payload: bytes) -> None:
    uri = f"{spec.output.rstrip('/')}/{name}"
    fs, path = url_to_fs(uri, **spec.storage.options(uri))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, payload)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


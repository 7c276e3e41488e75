"""What each Ray Train worker runs: the recipe, over its shard of the data, with checkpoints.

`train_loop(config)` is the `train_loop_per_worker` of a `TorchTrainer`. Every worker builds
the model (from the base weights, or the latest checkpoint when Ray Train restarts the group
after a failure or a re-run finds one in storage), wraps it for DDP (`prepare_model`: gloo on
CPU, NCCL on GPUs), and steps through `get_dataset_shard("train")` batches until the
iteration count. Every `checkpoint_every` iterations, and at the end, all workers call
`ray.train.report`; rank 0 attaches a checkpoint folder:

    model.pt        the bare model's state dict (weights_only-loadable, as `batchseg run` loads it)
    trainer.pt      optimizer and schedule state, the iteration, the RNG state
    metrics.jsonl   one JSON line per report since iteration 0 (losses, lr, images/s, held-out AP)

Rank 0 also scores the held-out images (COCO segm and bbox AP, at the training resolution)
before the first iteration (the base model) and at every checkpoint, and prints one progress
line: `batchseg train: iteration 120/1,000 (12%), loss 0.842, 3.1 images/s, ETA 4m43s`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from batchseg.console import duration
from batchseg.evaluation.evaluate import coco_metrics
from batchseg.predictors.weights import WeightsRef, fetch
from batchseg.rows.encoding import encode_mask
from batchseg.train import recipe
from batchseg.train.hyper import Hyper

PROGRESS_EVERY_S = 10.0


def train_loop(config: dict[str, Any]) -> None:
    """config: backend, hyper (Hyper fields), categories [{id, name}] in class-index
    order, base (WeightsRef fields or None), keep_head, storage_options (for the base weights)."""
    import ray.train
    import ray.train.torch

    hyper = Hyper(**config["hyper"])
    ctx = ray.train.get_context()
    rank, workers = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(hyper.seed)
    base = fetch(WeightsRef(**config["base"]), config["storage_options"]) if config["base"] else None
    if config["backend"] == "detectron2":
        return _detectron2_loop(config, hyper, rank, workers, base)
    num_classes = len(config["categories"]) + 1
    model = (recipe.from_base(hyper.arch, base, num_classes, config["keep_head"]) if base
             else recipe.build_model(hyper.arch, num_classes))
    optimizer, schedule = recipe.optimizer_and_schedule(model, hyper, workers)
    session = _Session(config, hyper, rank, workers, model, optimizer, schedule)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    session.begin(recipe.predict)
    shard = ray.train.get_dataset_shard("train")
    device = ray.train.torch.get_device()
    scaler = torch.amp.GradScaler("cuda") if hyper.amp else None
    while session.iteration < hyper.iterations:
        before = session.iteration
        for batch in shard.iter_batches(batch_size=hyper.batch_size, batch_format="numpy", drop_last=True):
            images, targets = recipe.to_targets(batch, hyper.flip, session.rng)
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            session.step_done(recipe.train_step(model, optimizer, schedule, images, targets, hyper.clip_grad_norm, scaler),
                              schedule.get_last_lr()[0])
            if session.iteration >= hyper.iterations:
                break
        if session.iteration == before:  # else the next pass would be as empty, forever
            raise RuntimeError(f"a whole pass over this worker's training images gave no batch of {hyper.batch_size}: "
                               "their decoding failed (see the 'training image ... left out' warnings)")


def _detectron2_loop(config: dict[str, Any], hyper: Hyper, rank: int, workers: int, base: str | None) -> None:
    """The same through detectron2's SimpleTrainer, its data loader over this worker's shard
    registered in DatasetCatalog (see train/detectron2.py), a hook reporting to Ray Train."""
    import ray.train
    import ray.train.torch
    from detectron2.engine import HookBase, SimpleTrainer, hooks

    from batchseg.train import detectron2 as d2

    model, optimizer, schedule, cfg = d2.build(hyper.arch, len(config["categories"]), base, hyper)
    session = _Session(config, hyper, rank, workers, model, optimizer, schedule)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    session.begin(d2.predictor(cfg.INPUT.FORMAT))
    rows: dict[str, list[Any]] = {"image_id": [], "image": [], "masks": [], "labels": []}
    for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=16, batch_format="numpy"):
        for key in rows:
            rows[key] += list(batch[key])
    loader = d2.train_loader(cfg, rows, config["categories"], rank, hyper.flip, hyper.seed)

    class Report(HookBase):
        def after_step(self) -> None:
            storage = self.trainer.storage
            losses = {k: v.latest() for k, v in storage.histories().items() if k.startswith("loss")}  # rank 0 only
            session.step_done({"loss": sum(losses.values()), **losses}, optimizer.param_groups[0]["lr"])

    trainer = SimpleTrainer(model, loader, optimizer)
    trainer.register_hooks([hooks.IterationTimer(), hooks.LRScheduler(optimizer, schedule), Report()])
    trainer.train(session.iteration, hyper.iterations)


class _Session:
    """What a worker keeps besides the model: the iteration, the metrics history, the RNG, the
    held-out images (rank 0), progress; restored from Ray Train's checkpoint when there is one."""

    def __init__(self, config: dict[str, Any], hyper: Hyper, rank: int, workers: int,
                 model: torch.nn.Module, optimizer, schedule) -> None:
        import ray.train

        self.hyper, self.rank, self.categories = hyper, rank, config["categories"]
        self.model, self.optimizer, self.schedule = model, optimizer, schedule  # the bare model, before DDP
        self.iteration, self.history = 0, []
        self.rng = np.random.default_rng([hyper.seed, rank])
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                self.iteration, self.history, self.rng = _restore(folder, model, optimizer, schedule)
            self.history.append({"iteration": self.iteration, "resumed": True})
            if rank == 0:
                print(f"batchseg train: resumed from the checkpoint of iteration {self.iteration:,}", flush=True)
        self.trained_s = next((r["train_s"] for r in reversed(self.history) if "train_s" in r), 0.0)
        self.progress = _Progress(hyper.iterations, hyper.batch_size * workers, self.iteration)
        self.losses: list[dict[str, float]] = []

    def begin(self, predict) -> None:
        """Rank 0 reads the held-out images and, before the first iteration, scores the base model."""
        self.predict = predict
        self.heldout = _heldout_batch() if self.rank == 0 else None
        if self.iteration == 0 and self.rank == 0:
            self.history.append({"iteration": 0, "heldout": self.score()})

    def score(self) -> dict[str, Any]:
        return heldout_ap(self.model, self.heldout, self.categories, self.predict)

    def step_done(self, losses: dict[str, float], lr: float) -> None:
        """After each iteration: progress, and every checkpoint_every (and the last) a report."""
        self.iteration += 1
        self.losses.append(losses)
        if self.rank == 0:
            self.progress.show(self.iteration, losses["loss"])
        if self.iteration % self.hyper.checkpoint_every and self.iteration != self.hyper.iterations:
            return
        record = {"iteration": self.iteration, "lr": lr, "images_per_s": self.progress.rate(),
                  "train_s": round(self.trained_s + self.progress.elapsed(), 1),
                  **{k: float(np.mean([step[k] for step in self.losses])) for k in self.losses[0]}}
        self.losses = []
        if self.rank == 0:
            record["heldout"] = self.score()
            self.history.append(record)
        _report(self.rank, record, self.model, self.optimizer, self.schedule, self.iteration, self.history, self.rng)


def heldout_ap(model: torch.nn.Module, heldout: dict[str, list[Any]] | None, categories: list[dict[str, Any]],
               predict=recipe.predict) -> dict[str, Any]:
    """COCO segm and bbox AP / AP50 (percent) of `model` on the decoded held-out images, at
    their decoded (training) size; `predict(model, images)` as recipe.predict (labels 1-based).
    Empty when there are no held-out images."""
    if not heldout or not heldout["image"]:
        return {}
    index_to_id = {i: c["id"] for i, c in enumerate(categories, start=1)}
    gt: dict[str, Any] = {"images": [], "annotations": [], "categories": categories}
    detections: list[dict[str, Any]] = []
    for n, (image, masks, labels) in enumerate(zip(heldout["image"], heldout["masks"], heldout["labels"])):
        gt["images"].append({"id": n, "height": image.shape[0], "width": image.shape[1]})
        for mask, label in zip(masks, labels):
            ys, xs = np.nonzero(mask)
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": n, "category_id": index_to_id[int(label)], "iscrowd": 0,
                "segmentation": encode_mask(mask.astype(bool)), "area": int(mask.sum()),
                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]})
        found = predict(model, [image])[0]
        detections += recipe.coco_detections(found, n, index_to_id)
    ids = list(range(len(heldout["image"])))
    segm = coco_metrics(gt, [{k: v for k, v in d.items() if k != "bbox"} for d in detections], "segm", ids)
    bbox = coco_metrics(gt, detections, "bbox", ids)
    return {"images": len(ids), "segm_AP": segm["AP"], "segm_AP50": segm["AP50"], "bbox_AP": bbox["AP"], "bbox_AP50": bbox["AP50"]}


def _heldout_batch() -> dict[str, list[Any]] | None:
    """Every decoded held-out image (rank 0 only; the held-out dataset is not split)."""
    import ray.train

    try:
        dataset = ray.train.get_dataset_shard("heldout")
    except KeyError:  # no image fell in the held-out split: the driver passes no such dataset
        return None
    out: dict[str, list[Any]] = {"image": [], "masks": [], "labels": []}
    for batch in dataset.iter_batches(batch_size=16, batch_format="numpy"):
        for key in out:
            out[key] += list(batch[key])
    return out


def _report(rank: int, record: dict[str, Any], model: torch.nn.Module, optimizer, schedule, iteration: int,
            history: list[dict[str, Any]], rng: np.random.Generator) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(record)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(model.state_dict(), os.path.join(folder, "model.pt"))
        torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "iteration": iteration,
                    "rng": json.dumps(rng.bit_generator.state)}, os.path.join(folder, "trainer.pt"))
        with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"iteration-{iteration:07d}")


def _restore(folder: str, model: torch.nn.Module, optimizer, schedule) -> tuple[int, list[dict[str, Any]], np.random.Generator]:
    model.load_state_dict(torch.load(os.path.join(folder, "model.pt"), weights_only=True))
    trainer = torch.load(os.path.join(folder, "trainer.pt"), weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    schedule.load_state_dict(trainer["schedule"])
    rng = np.random.default_rng()
    rng.bit_generator.state = json.loads(trainer["rng"])
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f if line.strip()]
    return int(trainer["iteration"]), history, rng


class _Progress:
    """One line every PROGRESS_EVERY_S on rank 0 (a worker's stdout reaches the driver's)."""

    def __init__(self, total: int, images_per_iteration: int, start: int) -> None:
        self.total, self.per_it = total, images_per_iteration
        self.start_it, self.start_t = start, time.monotonic()
        self.shown = self.start_t

    def elapsed(self) -> float:
        return time.monotonic() - self.start_t

    def rate(self) -> float | None:
        elapsed = self.elapsed()
        return round((self.last - self.start_it) * self.per_it / elapsed, 3) if elapsed > 0 and getattr(self, "last", 0) else None

    def show(self, iteration: int, loss: float) -> None:
        self.last = iteration
        now = time.monotonic()
        if now - self.shown < PROGRESS_EVERY_S and iteration < self.total:
            return
        self.shown = now
        rate = self.rate()
        line = f"batchseg train: iteration {iteration:,}/{self.total:,} ({iteration / self.total:.0%}), loss {loss:.3f}"
        if rate:
            line += f", {rate:.3g} images/s"
            if iteration < self.total:
                line += f", ETA {duration((self.total - iteration) * self.per_it / rate)}"
        print(line, flush=True)

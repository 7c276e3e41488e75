"""`batchseg train`: reviewed labels (or a COCO ground truth) -> fine-tuned weights on Ray Train."""

from __future__ import annotations

import argparse
import difflib
import math
import os
from typing import Any

from batchseg.cli.common import EXIT_OK, command, storage_config, storage_flags
from batchseg.config import ConfigError

_HYPER_FLAGS = ("arch", "iterations", "batch_size", "lr", "min_size", "max_size", "checkpoint_every", "seed", "amp")


def add_train(commands: argparse._SubParsersAction) -> None:
    from batchseg.train.hyper import Hyper

    default = Hyper()
    train = command(
        commands, "train", help="fine-tune a model on reviewed labels (Ray Train) into OUTPUT/",
        description="Fine-tune Mask R-CNN on the reviews pulled into a run's output (batchseg pull), or on a "
                    "COCO ground-truth file, with Ray Train: data decoded in Ray Data tasks and sharded to "
                    "--workers DDP workers, checkpoints in --checkpoints (default OUTPUT/checkpoints), a worker "
                    "that dies resumes from the newest one, and so does the same command run again.\n\n"
                    "OUTPUT gets weights.pt (+ .sha256), label_map.json, model_card.json, metrics.jsonl and "
                    "curves.png; `batchseg run --model-dir OUTPUT` then annotates with the new model.")
    train.add_argument("--config", metavar="YAML",
                       help="flags as a YAML mapping (`data: ...`, `iterations: 600`); flags given override it "
                            "(examples in jobs/configs/train-*.yaml)")
    train.add_argument("--data", metavar="URI",
                       help="a run's output folder holding reviews/ (from batchseg pull), or a COCO ground-truth .json")
    train.add_argument("--images", metavar="URI", help="folder the COCO file_names are under (default: the .json's folder)")
    train.add_argument("--output", metavar="URI", help="folder for the new model, local or s3://")
    train.add_argument("--task", default="instance", help="what to train")
    train.add_argument("--backend", default="torchvision", help="torchvision | detectron2")
    train.add_argument("--arch", default=default.arch,
                       help="torchvision: maskrcnn_resnet50_fpn[_v2], or the lighter maskrcnn_resnet18_fpn / _resnet34_fpn; "
                            "detectron2: a model-zoo config")
    train.add_argument("--base-weights", metavar="URI", help="weights to start from (default: random initialisation)")
    train.add_argument("--keep-head", action="store_true",
                       help="keep the base weights' box and mask heads (they must have the data's categories)")
    train.add_argument("--categories", metavar="LIST", help="comma-separated category names to train (default: all)")
    train.add_argument("--include-model-rows", action="store_true",
                       help="also train on the model's pre-labels of images nobody reviewed (the merged view; a WARNING "
                            "says how many): the model then learns its own mistakes")
    train.add_argument("--heldout", type=float, default=0.1, metavar="F", help="fraction of images held out for AP, by image_id hash")
    train.add_argument("--min-images", type=int, default=10, metavar="N", help="refuse to train on fewer images")
    hyper = train.add_argument_group("recipe")
    hyper.add_argument("--iterations", type=int, default=default.iterations, metavar="N")
    hyper.add_argument("--batch-size", type=int, default=default.batch_size, metavar="N", help="images per worker per iteration")
    hyper.add_argument("--lr", type=float, default=default.lr, help="learning rate per worker (SGD, momentum 0.9)")
    hyper.add_argument("--min-size", type=int, default=default.min_size, metavar="PX", help="shortest edge of training images")
    hyper.add_argument("--max-size", type=int, default=default.max_size, metavar="PX", help="longest-edge cap")
    hyper.add_argument("--checkpoint-every", type=int, default=default.checkpoint_every, metavar="N",
                       help="iterations between checkpoints (and held-out AP)")
    hyper.add_argument("--seed", type=int, default=default.seed)
    cluster = train.add_argument_group("Ray Train")
    cluster.add_argument("--workers", type=int, default=1, metavar="N", help="DDP workers")
    cluster.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL); else CPU (gloo)")
    cluster.add_argument("--amp", action="store_true", help="fp16 autocast with a gradient scaler (needs --use-gpu)")
    cluster.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="N")
    cluster.add_argument("--checkpoints", metavar="URI", help="Ray Train storage, local or s3:// (default: OUTPUT/checkpoints)")
    cluster.add_argument("--max-failures", type=int, default=3, metavar="N", help="worker failures to resume from")
    cluster.add_argument("--ray-address", metavar="ADDR",
                         help="Ray cluster to attach to (default: RAY_ADDRESS, else a fresh local Ray)")
    storage_flags(train)
    train.set_defaults(handler=train_command, parser=train)


def with_config(args: argparse.Namespace) -> argparse.Namespace:
    """--config's values for the flags left at their defaults."""
    if not args.config:
        return args
    import yaml

    try:
        with open(args.config) as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"--config {args.config}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {args.config}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {args.config}: give a mapping of flag names to values")
    defaults = {a.dest: a.default for a in args.parser._actions if a.dest not in ("help", "config", "parser")}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in defaults:
            close = difflib.get_close_matches(dest, list(defaults), n=1)
            raise ConfigError(f"--config {args.config}: unknown setting {key!r}"
                              + (f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""))
        if getattr(args, dest) == defaults[dest]:
            setattr(args, dest, value)
    return args


def spec_from_args(args: argparse.Namespace):
    from batchseg.train.driver import TrainSpec
    from batchseg.train.hyper import Hyper

    args = with_config(args)
    for flag in ("data", "output"):
        if not getattr(args, flag):
            raise ConfigError(f"--{flag} is missing; give it as a flag or in --config")

    for flag in ("iterations", "batch_size", "min_size", "max_size", "checkpoint_every", "workers", "min_images"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a whole number of 1 or more")
    if args.amp and not args.use_gpu:
        raise ConfigError("--amp needs --use-gpu (fp16 autocast runs on CUDA); drop --amp on CPU")
    if args.lr <= 0:
        raise ConfigError(f"--lr {args.lr}: give a positive learning rate, e.g. 0.01")
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    return TrainSpec(
        data=args.data, output=args.output, task=args.task, backend=args.backend, images=args.images,
        base_weights=args.base_weights, keep_head=args.keep_head, categories=categories,
        include_model_rows=args.include_model_rows,
        heldout_fraction=args.heldout, min_images=args.min_images, workers=args.workers, use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker, checkpoints=args.checkpoints, max_failures=args.max_failures,
        hyper=Hyper(**{f: getattr(args, f) for f in _HYPER_FLAGS}), storage=storage_config(args))


def train_command(args: argparse.Namespace) -> int:
    from batchseg.train.driver import finished, plan, train

    spec = spec_from_args(args)
    planned = plan(spec)  # every check before Ray starts
    card = finished(spec)
    if card is not None:
        print(f"batchseg train: {spec.output} holds this model, finished (same data and settings); nothing to train")
    else:
        _start_ray(args.ray_address, spec.workers * spec.cpus_per_worker)
        card = train(spec, planned)
    print(summary_line(card, spec.output))
    return EXIT_OK


def summary_line(card: dict[str, Any], output: str) -> str:
    base, new = card["heldout"]["base"], card["heldout"]["trained"]

    def ap(scores: dict[str, Any]) -> str:
        return f"{scores.get('segm_AP', 0):.1f}/{scores.get('segm_AP50', 0):.1f}" if scores else "n/a"

    return (f"batchseg train: {card['iterations']:,} iterations on {card['data']['images']['train']:,} images "
            f"in {card['wall_s']:.0f} s; held-out segm AP/AP50 {ap(base)} -> {ap(new)} "
            f"({card['data']['images']['heldout']} images) -> {output}")


def _start_ray(address: str | None, worker_cpus: float) -> None:
    """Attach to --ray-address / RAY_ADDRESS, else start a local Ray. A local Ray gets at least
    one CPU more than the workers take: Ray Data's decode tasks need one, and with every CPU
    held by a worker they would never run (2 workers on a 2-core machine)."""
    import ray

    from batchseg import console

    if not ray.is_initialized():
        console.before_ray_init()
        # as `batchseg run`: a bare ray.init() would attach to whatever cluster /tmp/ray last recorded
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        cpus = max(os.cpu_count() or 1, math.ceil(worker_cpus) + 1) if address == "local" else None
        ray.init(address=address, num_cpus=cpus)


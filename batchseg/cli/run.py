"""`batchseg run`: flags → JobConfig → a run on the Ray cluster."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from batchseg.cli.common import EXIT_FAILURE_BUDGET, EXIT_OK, EXIT_STALLED, RUN_EXIT_CODES, command, storage_config, storage_flags
from batchseg.config import ConfigError, JobConfig, ModelConfig, load_config, parse_override
from batchseg.train.model_dir import model_settings

def _job_default(name: str) -> Any:
    return JobConfig.model_fields[name].default


def _model_default(name: str) -> Any:
    return ModelConfig.model_fields[name].default


# flag -> config path; model flags go to models.* (the single selected task).
_JOB_FLAGS = {
    "output": ["output"],
    "batch_size": ["batch_size"],
    "num_actors": ["num_actors"],
    "max_actors": ["max_actors"],
    "device": ["device"],
    "precision": ["precision"],
    "s3_endpoint_url": ["s3", "endpoint_url"],
    "ray_address": ["ray_address"],
    "max_failed_fraction": ["max_failed_fraction"],
}
_SWITCHES = {"s3_anon": ["s3", "anon"], "overwrite": ["overwrite"], "retry_failed": ["retry_failed"],
             "allow_empty": ["allow_empty"], "skip_reviewed": ["skip_reviewed"]}
_MODEL_FLAGS = ("backend", "model", "weights", "label_map", "score_threshold", "min_size", "max_size")


def add_run(commands: argparse._SubParsersAction) -> None:
    run = command(
        commands, "run", help="annotate images into OUTPUT/annotations (Parquet)",
        description="Annotate images: list INPUTs, run the models on a Ray cluster (RAY_ADDRESS, "
                    "--ray-address, or a fresh local Ray), write one Parquet row per image to "
                    "OUTPUT/annotations/run=RUN_ID/ and a report to OUTPUT/runs/RUN_ID.json.\n"
                    "Flags override the --config file; --set reaches any config field. "
                    "Defaults below are the config's.",
        epilog=RUN_EXIT_CODES)
    run.add_argument("--config", metavar="YAML", help="job config file (examples in jobs/configs/)")
    run.add_argument("--input", action="append", metavar="URI",
                     help="image folder (recursive), image file or .tar shard, local or s3://; repeatable")
    run.add_argument("--output", metavar="URI", help="output folder, local or s3://")
    run.add_argument("--tasks", metavar="LIST",
                     help="comma-separated: instance, panoptic, keypoint, densepose (default: instance)")
    run.add_argument("--allow-empty", action="store_true",
                     help="an input with no images is not an error (scheduled runs over a growing lake)")
    model = run.add_argument_group("model (the single selected task; with several use --set models.TASK.FIELD=VALUE)")
    model.add_argument("--backend", help="detectron2 | torchvision | package.module:Class (default: detectron2)")
    model.add_argument("--model", help="detectron2 model-zoo name or YAML path, or torchvision architecture "
                                       "(default: the task's model-zoo config)")
    model.add_argument("--weights", metavar="URI",
                       help="checkpoint: local path, s3:// or https:// URL (default: the zoo checkpoint)")
    model.add_argument("--random-init", action="store_true", help="no weights: random initialisation (smoke tests)")
    model.add_argument("--model-dir", metavar="URI",
                       help="a model `batchseg train` wrote: its architecture, weights (pinned by sha256), label map, "
                            "image sizes and model card; other model flags override")
    model.add_argument("--label-map", metavar="URI", help="YAML/JSON: model class index -> {id, name}")
    model.add_argument("--score-threshold", type=float, metavar="S",
                       help=f"drop instances scored below S, 0..1 (default: {_model_default('score_threshold')})")
    model.add_argument("--min-size", type=int, metavar="PX", help="test-time shortest edge (default: the model's)")
    model.add_argument("--max-size", type=int, metavar="PX", help="test-time longest-edge cap (default: the model's)")
    compute = run.add_argument_group("compute")
    compute.add_argument("--batch-size", type=int, metavar="N",
                         help=f"images per model forward (default: {_job_default('batch_size')})")
    compute.add_argument("--num-actors", type=int, metavar="N", help="predictor actors (default: one per GPU)")
    compute.add_argument("--max-actors", type=int, metavar="N", help="let the actor pool grow to N (default: --num-actors)")
    compute.add_argument("--device", choices=["auto", "cpu", "cuda"],
                         help=f"auto = cuda when the cluster has GPUs (default: {_job_default('device')})")
    compute.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                         help=f"fp16/bf16 autocast needs CUDA (default: {_job_default('precision')})")
    compute.add_argument("--ray-address", metavar="ADDR",
                         help="Ray cluster to attach to (default: RAY_ADDRESS, else a fresh local Ray)")
    runs = run.add_argument_group("re-runs and failures")
    runs.add_argument("--overwrite", action="store_true", help="delete earlier runs in OUTPUT and annotate everything")
    runs.add_argument("--retry-failed", action="store_true", help="annotate again the images earlier runs failed on")
    runs.add_argument("--skip-reviewed", action="store_true",
                      help="leave out images people reviewed (batchseg pull), even when the models changed")
    runs.add_argument("--max-failed-fraction", type=float, metavar="F",
                      help="exit 3 when more than this fraction of images fails, e.g. 0.05 (default: no limit)")
    storage_flags(run)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="any config field by dotted path, e.g. models.instance.score_threshold=0.7; repeatable")
    run.add_argument("--dry-run", action="store_true", help="validate, print the resolved config as JSON, start nothing")
    run.set_defaults(handler=run_command)


def config_from_args(args: argparse.Namespace) -> JobConfig:
    overrides: list[tuple[list[str], Any]] = []
    if args.input:
        overrides.append((["inputs"], args.input))
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise ConfigError(f"--tasks {args.tasks!r} names no task; give a comma-separated list of "
                              "instance, panoptic, keypoint, densepose")
        overrides.append((["tasks"], tasks))
    for flag, path in _JOB_FLAGS.items():
        if getattr(args, flag) is not None:
            overrides.append((path, getattr(args, flag)))
    overrides += [(path, True) for flag, path in _SWITCHES.items() if getattr(args, flag)]
    model_values = {f: getattr(args, f) for f in _MODEL_FLAGS if getattr(args, f) is not None}
    if args.model_dir:
        model_values = {**model_settings(args.model_dir, storage_config(args).options(args.model_dir)), **model_values}
    if args.random_init:
        model_values["random_init"] = True
    overrides += [parse_override(item) for item in args.set]
    overrides += [(["models", "*", k], v) for k, v in model_values.items()]
    return load_config(args.config, overrides)


def run_command(args: argparse.Namespace) -> int:
    from batchseg.run import job as job_module

    job = config_from_args(args)
    _check_local_device(job)
    prepared = job_module.preflight(job)
    if args.dry_run:
        print(json.dumps(job.model_dump(mode="json"), indent=2))
        return EXIT_OK
    from batchseg.run.stall import RunStalled

    try:
        with job_module.hold_output(job) as held:
            _start_ray(job)
            summary = job_module.run(job, prepared, held)
    except RunStalled as e:
        print(f"batchseg: stopped, stalled: {e}. What was written stays; run again to resume.", file=sys.stderr)
        return EXIT_STALLED
    print(_summary_line(summary))
    if summary["status"] == "failure_budget_exceeded":
        print(f"batchseg: {summary['failed_fraction']:.1%} of images failed, over max_failed_fraction="
              f"{job.max_failed_fraction}; the failed list is {summary['failed_list']}", file=sys.stderr)
        return EXIT_FAILURE_BUDGET
    return EXIT_OK


def _check_local_device(job: JobConfig) -> None:
    """device cuda on the local Ray this command would start, on a machine without CUDA: the
    actors would wait for a GPU forever. (A cluster may add GPU nodes later; it is not checked.)"""
    if job.device == "cuda" and ray_address(job) == "local":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device is cuda but this machine has no usable CUDA GPU (torch.cuda.is_available() "
                              "is False); use --device cpu (or auto), or --ray-address a cluster with GPUs")


def _start_ray(job: JobConfig) -> None:
    import ray

    from batchseg import console

    if not ray.is_initialized():
        console.before_ray_init()
        ray.init(address=ray_address(job))
    console.after_ray_init()


def _summary_line(summary: dict[str, Any]) -> str:
    """The closing lines: what landed, then where the predictors' time went and the bottleneck."""
    images = summary["images"]
    found = ", ".join(f"{v['total']} {column}" for column, v in summary["found"].items())
    text = (f"batchseg: {images['in']} images, {images['annotated']} annotated, {images['failed']} failed; "
            f"found {found} in {summary['wall_time_s']:.1f} s ({summary['images_per_s']} images/s) "
            f"-> {summary['annotations']}")
    pool = summary.get("predictors", {}).get("pool", {})
    if summary.get("predictors", {}).get("bottleneck"):
        text += (f"\nbatchseg: {pool['actors']} predictor actor(s), {pool['images_per_s_per_actor']} images/s each; "
                 f"waiting {pool['waiting']:.0%}, decode {pool['decode']:.0%}, forward {pool['forward']:.0%}, "
                 f"encode {pool['encode']:.0%} of their time\nbatchseg: {summary['predictors']['bottleneck']}")
    return text


def ray_address(job: JobConfig) -> str | None:
    """--ray-address, else RAY_ADDRESS (set inside `ray job submit`), else a fresh local Ray.

    A bare ray.init() would attach to whatever cluster /tmp/ray last recorded, even a dead one.
    """
    return job.ray_address or os.environ.get("RAY_ADDRESS") or "local"

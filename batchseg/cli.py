"""`batchseg run | export | eval | render`: annotate images, then get the results out.

Exit codes: 0 success, 1 the run failed, 2 bad flag, config or input (nothing was started),
3 the run finished but more images failed than max_failed_fraction allows, 4 another run
holds the output's lease.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from typing import Any

from batchseg.config import ConfigError, JobConfig, load_config, parse_override

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG, EXIT_FAILURE_BUDGET, EXIT_LOCKED = 0, 1, 2, 3, 4

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
_MODEL_FLAGS = ("backend", "model", "weights", "label_map", "score_threshold", "min_size", "max_size")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchseg", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="annotate images into OUTPUT/annotations (Parquet)")
    run.add_argument("--config", help="YAML job config (see jobs/configs/)")
    run.add_argument("--input", action="append", metavar="URI", help="image folder, file or tar shard; repeatable")
    run.add_argument("--output", metavar="URI", help="output folder (local path or s3://...)")
    run.add_argument("--tasks", help="comma-separated tasks, e.g. instance")
    run.add_argument("--backend", help="detectron2 | torchvision | package.module:Class")
    run.add_argument("--model", help="detectron2 config name/YAML path, or torchvision architecture")
    run.add_argument("--weights", metavar="URI", help="weights: local path, s3:// or https:// URL")
    run.add_argument("--random-init", action="store_true", help="no weights: random initialisation (smoke tests)")
    run.add_argument("--label-map", metavar="URI", help="YAML/JSON: model class index -> {id, name}")
    run.add_argument("--score-threshold", type=float)
    run.add_argument("--min-size", type=int, help="test-time shortest edge, pixels")
    run.add_argument("--max-size", type=int, help="test-time longest edge cap, pixels")
    run.add_argument("--batch-size", type=int, help="images per model forward")
    run.add_argument("--num-actors", type=int, help="predictor actors (default: one per GPU)")
    run.add_argument("--max-actors", type=int, help="let the actor pool grow to this size")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"])
    run.add_argument("--precision", choices=["fp32", "fp16", "bf16"])
    run.add_argument("--s3-endpoint-url", metavar="URL", help="S3-compatible endpoint (MinIO, Ceph, ...)")
    run.add_argument("--s3-anon", action="store_true", help="anonymous S3 access (public buckets)")
    run.add_argument("--overwrite", action="store_true", help="delete earlier runs in OUTPUT and annotate everything")
    run.add_argument("--retry-failed", action="store_true", help="annotate again images earlier runs failed on")
    run.add_argument("--max-failed-fraction", type=float, metavar="F",
                     help="exit 3 when more than this fraction of images fail (e.g. 0.05)")
    run.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="any config field by dotted path, e.g. models.instance.score_threshold=0.7")
    run.add_argument("--dry-run", action="store_true", help="validate the config, print it, start nothing")

    export = commands.add_parser("export", help="write COCO / Label Studio / CVAT files from a results dataset")
    export.add_argument("format", choices=["coco", "labelstudio", "cvat"])
    export.add_argument("results", help="a run's output folder (or its annotations/), local or s3://")
    export.add_argument("dest", help="folder to write into, local or s3://")
    export.add_argument("--model-version", help="Label Studio: predictions' model_version (default: from run.json)")
    export.add_argument("--tasks-per-file", type=int, default=1000, help="Label Studio: tasks per JSON file")
    export.add_argument("--url-map", action="append", default=[], metavar="PREFIX=URL",
                        help="Label Studio: rewrite image URIs starting with PREFIX (e.g. file:///data/=http://host/)")
    _storage_flags(export)

    evaluate = commands.add_parser("eval", help="COCOeval (bbox, segm, keypoints) and PQ against ground truth")
    evaluate.add_argument("results")
    evaluate.add_argument("--gt", required=True, metavar="GT_JSON", help="COCO instances / keypoints / panoptic JSON")
    evaluate.add_argument("--gt-panoptic-dir", metavar="DIR", help="panoptic PNGs of the ground truth (default: next to GT_JSON)")
    evaluate.add_argument("--out", metavar="JSON", help="where to write the metrics (default: RESULTS/eval.json)")
    _storage_flags(evaluate)

    render = commands.add_parser("render", help="overlay images and an index.html contact sheet")
    render.add_argument("results")
    render.add_argument("dest")
    render.add_argument("--limit", type=int, default=100, help="images to render (default 100)")
    _storage_flags(render)
    return parser


def _storage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3-endpoint-url", metavar="URL", help="S3-compatible endpoint (MinIO, Ceph, ...)")
    parser.add_argument("--s3-anon", action="store_true", help="anonymous S3 access")


def _storage(args: argparse.Namespace):
    from batchseg.config import StorageConfig

    return StorageConfig(endpoint_url=args.s3_endpoint_url, anon=args.s3_anon)


def config_from_args(args: argparse.Namespace) -> JobConfig:
    overrides: list[tuple[list[str], Any]] = []
    if args.input:
        overrides.append((["inputs"], args.input))
    if args.tasks:
        overrides.append((["tasks"], [t.strip() for t in args.tasks.split(",") if t.strip()]))
    for flag, path in _JOB_FLAGS.items():
        if getattr(args, flag) is not None:
            overrides.append((path, getattr(args, flag)))
    for flag, path in (("s3_anon", ["s3", "anon"]), ("overwrite", ["overwrite"]), ("retry_failed", ["retry_failed"])):
        if getattr(args, flag):
            overrides.append((path, True))
    model_values = {f: getattr(args, f) for f in _MODEL_FLAGS if getattr(args, f) is not None}
    if args.random_init:
        model_values["random_init"] = True
    overrides += [parse_override(item) for item in args.set]
    overrides += [(["models", "*", k], v) for k, v in model_values.items()]
    return load_config(args.config, overrides)


def run_command(args: argparse.Namespace) -> int:
    from batchseg import job as job_module

    job = config_from_args(args)
    job_module.preflight(job)
    if args.dry_run:
        print(json.dumps(job.model_dump(mode="json"), indent=2))
        return EXIT_OK

    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address(job))
    summary = job_module.run(job)
    images = summary["images"]
    found = ", ".join(f"{v['total']} {column}" for column, v in summary["found"].items())
    print(
        f"batchseg: {images['in']} images, {images['annotated']} annotated, {images['failed']} failed; "
        f"found {found} in {summary['wall_time_s']:.1f} s ({summary['images_per_s']} images/s) "
        f"-> {summary['annotations']}"
    )
    if summary["status"] == "failure_budget_exceeded":
        print(
            f"batchseg: {summary['failed_fraction']:.1%} of images failed, over max_failed_fraction="
            f"{job.max_failed_fraction}; the failed list is {summary['failed_list']}",
            file=sys.stderr,
        )
        return EXIT_FAILURE_BUDGET
    return EXIT_OK


def export_command(args: argparse.Namespace) -> int:
    from batchseg.results import open_results

    storage = _storage(args)
    results = open_results(args.results, storage.options(args.results))
    if args.format == "coco":
        from batchseg.exports.coco import export_coco

        written = export_coco(results, args.dest, storage.options(args.dest))
    elif args.format == "labelstudio":
        from batchseg.exports.labelstudio import export_labelstudio

        written = export_labelstudio(results, args.dest, storage.options(args.dest), model_version=args.model_version,
                                     tasks_per_file=args.tasks_per_file, url_map=[_pair(m) for m in args.url_map])
    else:
        from batchseg.exports.cvat import export_cvat

        written = export_cvat(results, args.dest, storage.options(args.dest))
    for name, count in written.items():
        print(f"batchseg: wrote {args.dest.rstrip('/')}/{name} ({count} items)")
    return EXIT_OK


def eval_command(args: argparse.Namespace) -> int:
    from batchseg.evaluate import evaluate, format_table
    from batchseg.results import open_results
    from batchseg.storage import write_json

    storage = _storage(args)
    results = open_results(args.results, storage.options(args.results))
    metrics = evaluate(results, args.gt, args.gt_panoptic_dir, storage.options(args.gt))
    print(format_table(metrics))
    out = args.out or f"{args.results.rstrip('/')}/eval.json"
    write_json(out, metrics, storage.options(out))
    print(f"batchseg: metrics written to {out}")
    return EXIT_OK


def render_command(args: argparse.Namespace) -> int:
    from batchseg.render import render
    from batchseg.results import open_results

    storage = _storage(args)
    results = open_results(args.results, storage.options(args.results))
    count = render(results, args.dest, limit=args.limit, storage=storage)
    print(f"batchseg: rendered {count} images; open {args.dest.rstrip('/')}/index.html")
    return EXIT_OK


def _pair(item: str) -> tuple[str, str]:
    prefix, sep, url = item.partition("=")
    if not sep or not prefix:
        raise ConfigError(f"bad --url-map {item!r}; write it as PREFIX=URL")
    return prefix, url


def ray_address(job: JobConfig) -> str | None:
    """--ray-address, else RAY_ADDRESS (set inside `ray job submit`), else a fresh local Ray.

    A bare ray.init() would attach to whatever cluster /tmp/ray last recorded, even a dead one.
    """
    return job.ray_address or os.environ.get("RAY_ADDRESS") or "local"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Import-time notices from detectron2's dependencies; they would bury a one-line error.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
    args = _parser().parse_args(argv)
    commands = {"run": run_command, "export": export_command, "eval": eval_command, "render": render_command}
    from batchseg.runs import OutputLocked

    try:
        return commands[args.command](args)
    except OutputLocked as e:
        print(f"batchseg: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except ConfigError as e:
        print(f"batchseg: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG


if __name__ == "__main__":
    sys.exit(main())

"""`batchseg run | export FORMAT | eval | render | review | push TOOL`: annotate images, then get the results out.

Every command checks its flags and inputs before it starts work; a problem the user can fix
ends with exit code 2 and one line on stderr that names the fix.

Adding a command: write `add_NAME(commands)` that builds its parser with `_command(...)` and
sets `handler=` to a function `(args) -> exit code`, then list it in COMMANDS. An export
format is the same with `_export_format(...)`, listed in EXPORT_FORMATS.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import os
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from batchseg.config import ConfigError, JobConfig, ModelConfig, StorageConfig, load_config, parse_override
from batchseg.errors import user_error

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_FAILURE_BUDGET, EXIT_LOCKED = 0, 1, 2, 3, 4

EXIT_CODES = """exit codes:
  0  done
  1  failed while working (the message, or a traceback, says where)
  2  bad flag, config or input: one line on stderr names the fix; nothing was started
"""
RUN_EXIT_CODES = EXIT_CODES + """\
  3  the run finished, but more images failed than max_failed_fraction allows
     (OUTPUT/runs/RUN_ID.failed/part-*.jsonl list them)
  4  another run is writing to the same output (it holds OUTPUT/_lease.json)
"""

RESULTS_HELP = "a run's output folder (or its annotations/ folder), local or s3://"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; "(default: X)" after options that have one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "%(default)" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with a short usage line on errors and "did you mean" for a mistyped flag.

    Leaf commands reject unknown arguments themselves, so the error names the command the
    user typed (`batchseg run: error: ...`), not the top-level program.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and not self._subcommands():
            self.error(self._unrecognized(extras))
        return namespace, extras

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"usage: {self._short_usage()}\n{self.prog}: error: {message}\n")

    def _subcommands(self) -> argparse._SubParsersAction | None:
        return next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)

    def _short_usage(self) -> str:
        words = [self.prog, "[options]"]
        for action in self._get_positional_actions():
            if action.choices and isinstance(action, argparse._SubParsersAction):
                words.append("{" + ",".join(action.choices) + "} ...")
            else:
                words.append(action.metavar or action.dest.upper())
        return " ".join(words) + f"   (`{self.prog} --help` lists every option)"

    def _unrecognized(self, extras: list[str]) -> str:
        message = f"unrecognized arguments: {' '.join(extras)}"  # argparse's own wording
        flag = next((x.split("=", 1)[0] for x in extras if x.startswith("-")), None)
        options = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        match = difflib.get_close_matches(flag, options, n=1, cutoff=0.6) if flag else []
        return message + (f"; did you mean {match[0]}?" if match else "")


def _command(commands: argparse._SubParsersAction, name: str, help: str, description: str = "",
             epilog: str = EXIT_CODES) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its description, options with defaults, and exit codes."""
    return commands.add_parser(name, help=help, description=_wrap(description or help), epilog=epilog)


def _wrap(text: str, width: int = 88) -> str:
    """Fill prose paragraphs to `width`; leave paragraphs with indented lines (tables) as written."""
    return "\n\n".join(p if "\n " in p else textwrap.fill(p, width, break_on_hyphens=False) for p in text.split("\n\n"))


def _storage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3-endpoint-url", metavar="URL",
                        help="S3-compatible endpoint (MinIO, Ceph, R2, ...); AWS_ENDPOINT_URL_S3 works too")
    parser.add_argument("--s3-anon", action="store_true", help="anonymous S3 access (public buckets)")


def _storage(args: argparse.Namespace) -> StorageConfig:
    return StorageConfig(endpoint_url=args.s3_endpoint_url, anon=args.s3_anon)


@contextlib.contextmanager
def _reaching(label: str) -> Iterator[None]:
    """Turn a storage or path error inside the block into ConfigError("LABEL: fix")."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:
        line = user_error(e)
        if line is None:
            raise
        raise ConfigError(f"{label}: {line}") from None


def _open_results(args: argparse.Namespace):
    from batchseg.results import open_results

    with _reaching(f"RESULTS {args.results}"):
        return open_results(args.results, _storage(args).options(args.results))


# ---------------------------------------------------------------------------------------- run

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
             "allow_empty": ["allow_empty"]}
_MODEL_FLAGS = ("backend", "model", "weights", "label_map", "score_threshold", "min_size", "max_size")


def add_run(commands: argparse._SubParsersAction) -> None:
    run = _command(
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
    runs.add_argument("--max-failed-fraction", type=float, metavar="F",
                      help="exit 3 when more than this fraction of images fails, e.g. 0.05 (default: no limit)")
    _storage_flags(run)
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
    if args.random_init:
        model_values["random_init"] = True
    overrides += [parse_override(item) for item in args.set]
    overrides += [(["models", "*", k], v) for k, v in model_values.items()]
    return load_config(args.config, overrides)


def run_command(args: argparse.Namespace) -> int:
    from batchseg import job as job_module

    job = config_from_args(args)
    _check_local_device(job)
    prepared = job_module.preflight(job)
    if args.dry_run:
        print(json.dumps(job.model_dump(mode="json"), indent=2))
        return EXIT_OK
    with job_module.hold_output(job) as held:
        _start_ray(job)
        summary = job_module.run(job, prepared, held)
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
    images = summary["images"]
    found = ", ".join(f"{v['total']} {column}" for column, v in summary["found"].items())
    return (f"batchseg: {images['in']} images, {images['annotated']} annotated, {images['failed']} failed; "
            f"found {found} in {summary['wall_time_s']:.1f} s ({summary['images_per_s']} images/s) "
            f"-> {summary['annotations']}")


def ray_address(job: JobConfig) -> str | None:
    """--ray-address, else RAY_ADDRESS (set inside `ray job submit`), else a fresh local Ray.

    A bare ray.init() would attach to whatever cluster /tmp/ray last recorded, even a dead one.
    """
    return job.ray_address or os.environ.get("RAY_ADDRESS") or "local"


# ------------------------------------------------------------------------------------- export

def add_export(commands: argparse._SubParsersAction) -> None:
    export = _command(commands, "export", help="write annotation-tool files from a results dataset",
                      description="Write a results dataset in an annotation tool's format. "
                                  "`batchseg export FORMAT --help` says what each format writes.")
    formats = export.add_subparsers(title="formats", dest="format", required=True, metavar="FORMAT",
                                    parser_class=_Parser, help="the annotation tool's format")
    for add in EXPORT_FORMATS:
        add(formats)


def _export_format(formats: argparse._SubParsersAction, name: str, help: str, writes: str,
                   handler: Callable[[argparse.Namespace], dict[str, Any]]) -> argparse.ArgumentParser:
    """`batchseg export NAME RESULTS DEST`; `handler(args)` writes and returns what `_export` prints."""
    parser = _command(formats, name, help=help, description=f"{help}.\n\nWrites into DEST:\n{writes}")
    parser.add_argument("results", metavar="RESULTS", help=RESULTS_HELP)
    parser.add_argument("dest", metavar="DEST", help="folder to write into, local or s3:// (created if absent)")
    _storage_flags(parser)
    parser.set_defaults(handler=lambda args: _export(args, handler))
    return parser


def _export(args: argparse.Namespace, write: Callable[[argparse.Namespace], dict[str, Any]]) -> int:
    """Run `write`; it returns {file: items} or {"files": {file: items}, other figures...}."""
    with _reaching(f"DEST {args.dest}"):
        summary = write(args)
    files = summary["files"] if isinstance(summary.get("files"), dict) else summary
    for name, count in files.items():
        print(f"batchseg: wrote {args.dest.rstrip('/')}/{name} ({count} items)")
    for key, value in summary.items():
        if files is not summary and key != "files":
            if isinstance(value, dict):  # e.g. polygons: converted 8, iou mean 1.0, iou min 1.0
                value = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in value.items())
            print(f"batchseg: {key.replace('_', ' ')}: {value}")
    return EXIT_OK


def add_export_coco(formats: argparse._SubParsersAction) -> None:
    parser = _export_format(formats, "coco", "COCO JSON: dataset form (to import) and results form (for COCOeval)", """\
  instances.json, instances_results.json                 instance masks (RLE), boxes, scores
  person_keypoints.json, person_keypoints_results.json   17 COCO keypoints, names and skeleton
  panoptic.json, panoptic/IMAGE_ID.png                   segment ids as R + 256 G + 256^2 B
  densepose_results.json                                 DensePose charts, as DensePose's own results
Only the files of the tasks the run had; failed images are left out. instances.json leaves out
instances whose mask is empty (counted as "skipped empty"); instances_results.json keeps them.""",
        _write_coco)
    _polygons_flag(parser)


def _write_coco(args: argparse.Namespace) -> dict[str, Any]:
    from batchseg.exports.coco import export_coco

    return export_coco(_open_results(args), args.dest, _storage(args).options(args.dest), polygons=args.polygons)


def _polygons_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--polygons", action="store_true",
                        help="instance masks as COCO polygons instead of RLE (holes kept through zero-width "
                             "slits); prints the mask IoU kept, mean and worst, measured with pycocotools")


def add_export_labelstudio(formats: argparse._SubParsersAction) -> None:
    parser = _export_format(
        formats, "labelstudio", "Label Studio import files: tasks with predictions (pre-annotations)", """\
  tasks-00000.json, tasks-00001.json, ...   --tasks-per-file tasks each, with predictions:
                                            boxes (rectanglelabels, percent), masks (brushlabels,
                                            Label Studio's RLE), keypoints (keypointlabels)
  labeling_config.xml                       the project's labeling config matching those regions
Image references stay s3:// or https:// (Label Studio resolves them through its cloud storage);
--url-map rewrites prefixes, e.g. for local files served over HTTP. DensePose is not exported.""",
        _write_labelstudio)
    parser.add_argument("--model-version", metavar="TEXT",
                        help="the predictions' model_version (default: model names from run.json)")
    parser.add_argument("--tasks-per-file", type=int, default=1000, metavar="N",
                        help="tasks per JSON file; one huge import times out in Label Studio")
    parser.add_argument("--url-map", action="append", default=[], metavar="PREFIX=URL",
                        help="rewrite image URIs starting with PREFIX, e.g. file:///data/=http://host:8081/; repeatable")


def _write_labelstudio(args: argparse.Namespace) -> dict[str, int]:
    from batchseg.exports.labelstudio import export_labelstudio

    if args.tasks_per_file < 1:
        raise ConfigError(f"--tasks-per-file must be at least 1 (got {args.tasks_per_file})")
    url_map = [_pair(m) for m in args.url_map]
    return export_labelstudio(_open_results(args), args.dest, _storage(args).options(args.dest),
                              model_version=args.model_version, tasks_per_file=args.tasks_per_file, url_map=url_map)


def add_export_cvat(formats: argparse._SubParsersAction) -> None:
    parser = _export_format(formats, "cvat", "CVAT import archives (Upload annotations)", """\
  cvat_coco_instances.zip   format "COCO 1.0": instance masks as RLE (or --polygons), boxes
  cvat_coco_keypoints.zip   format "COCO Keypoints 1.0": people with 17 keypoints
Image file names are relative to the run's input folders: make the CVAT task from the same
folder layout. Instances whose mask is empty are left out (counted as "skipped empty").""", _write_cvat)
    _polygons_flag(parser)


def _write_cvat(args: argparse.Namespace) -> dict[str, Any]:
    from batchseg.exports.cvat import export_cvat

    return export_cvat(_open_results(args), args.dest, _storage(args).options(args.dest), polygons=args.polygons)


def add_export_fiftyone(formats: argparse._SubParsersAction) -> None:
    parser = _export_format(formats, "fiftyone", "a FiftyOne dataset, imported with one call", """\
  samples.json             one sample per image: instances (Detections with masks), panoptic
                           (Segmentation) and panoptic_things, keypoints, densepose; run,
                           image_id, review_priority; model_version and weights_sha256 per label
  fields/panoptic/*.png    category id per pixel
  metadata.json            mask targets, keypoint skeleton, each run's provenance
Import:  fo.Dataset.from_dir(DEST, dataset_type=fo.types.FiftyOneDataset, dynamic=True)
Local images keep their path; map remote ones to where they are mounted with --url-map.""",
        _write_fiftyone)
    parser.add_argument("--url-map", action="append", default=[], metavar="PREFIX=PATH",
                        help="rewrite image URIs starting with PREFIX, e.g. s3://lake/=/mnt/lake/; repeatable")


def _write_fiftyone(args: argparse.Namespace) -> dict[str, Any]:
    from batchseg.exports.fiftyone import export_fiftyone

    url_map = [_pair(m) for m in args.url_map]
    return export_fiftyone(_open_results(args), args.dest, _storage(args).options(args.dest), url_map=url_map)


# One function per format, in the order `export --help` lists them.
EXPORT_FORMATS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_export_coco,
    add_export_labelstudio,
    add_export_cvat,
    add_export_fiftyone,
]


def _pair(item: str) -> tuple[str, str]:
    prefix, sep, url = item.partition("=")
    if not sep or not prefix:
        raise ConfigError(f"bad --url-map {item!r}; write it as PREFIX=URL")
    return prefix, url


# --------------------------------------------------------------------------------------- eval

def add_eval(commands: argparse._SubParsersAction) -> None:
    evaluate = _command(
        commands, "eval", help="COCOeval (bbox, segm, keypoints) or PQ against a ground truth",
        description="Score a results dataset against a COCO ground truth: COCOeval bbox/segm for "
                    "instances, keypoints for a person_keypoints GT, PQ for a panoptic GT. Images match "
                    "by id or by file name (the GT file_name equals the end of the image's path). "
                    "Prints a table and writes the metrics as JSON.")
    evaluate.add_argument("results", metavar="RESULTS", help=RESULTS_HELP)
    evaluate.add_argument("--gt", required=True, metavar="GT_JSON",
                          help="COCO instances, person_keypoints or panoptic JSON (local or s3://)")
    evaluate.add_argument("--gt-panoptic-dir", metavar="DIR",
                          help="the panoptic GT's PNGs (default: GT_JSON without .json, as COCO ships them)")
    evaluate.add_argument("--out", metavar="JSON", help="where to write the metrics (default: RESULTS/eval.json)")
    _storage_flags(evaluate)
    evaluate.set_defaults(handler=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    from batchseg.evaluate import evaluate, format_table
    from batchseg.storage import write_json

    storage = _storage(args)
    results = _open_results(args)
    _require_file("--gt", args.gt, storage)
    out = args.out or f"{args.results.rstrip('/')}/eval.json"
    _require_writable_file("--out", out, storage)
    with _reaching(f"--gt {args.gt}"):
        try:
            metrics = evaluate(results, args.gt, args.gt_panoptic_dir, storage.options(args.gt))
        except json.JSONDecodeError as e:
            raise ConfigError(f"--gt {args.gt} is not JSON ({e}); give a COCO ground-truth JSON") from None
    print(format_table(metrics))
    with _reaching(f"--out {out}"):
        write_json(out, metrics, storage.options(out))
    print(f"batchseg: metrics written to {out}")
    return EXIT_OK


def _require_file(flag: str, uri: str, storage: StorageConfig) -> None:
    from fsspec.core import url_to_fs

    with _reaching(f"{flag} {uri}"):
        fs, path = url_to_fs(uri, **storage.options(uri))
        if not fs.isfile(path):
            kind = "a folder" if fs.isdir(path) else "not found"
            raise ConfigError(f"{flag} {uri}: {kind}; give the path of a file")


def _require_writable_file(flag: str, uri: str, storage: StorageConfig) -> None:
    """Fail before any work when `uri` cannot become a file: a folder there, or a file where a
    folder of its path should be."""
    from fsspec.core import url_to_fs

    with _reaching(f"{flag} {uri}"):
        fs, path = url_to_fs(uri, **storage.options(uri))
        if fs.isdir(path):
            raise ConfigError(f"{flag} {uri}: a folder; give the path of a file, such as {uri.rstrip('/')}/eval.json")
        parent = path.rsplit("/", 1)[0]
        while parent and parent != path and not fs.exists(parent):
            path, parent = parent, parent.rsplit("/", 1)[0]
        if parent and fs.isfile(parent):
            raise ConfigError(f"{flag} {uri}: {parent} is a file, not a folder; give another path")


# ------------------------------------------------------------------------------ render, review

def add_render(commands: argparse._SubParsersAction) -> None:
    render = _command(
        commands, "render", help="overlay images and an index.html contact sheet",
        description="Draw each image's annotations (masks, boxes and labels, panoptic segments, "
                    "keypoints, DensePose parts) into DEST/IMAGE_ID_TASK.jpg and write DEST/index.html. "
                    "Crowded images label the top --labels instances by score and count the rest.")
    render.add_argument("results", metavar="RESULTS", help=RESULTS_HELP)
    render.add_argument("dest", metavar="DEST", help="folder for the JPEGs and index.html, local or s3://")
    render.add_argument("--limit", type=int, default=100, metavar="N", help="images to render")
    render.add_argument("--review", action="store_true",
                        help="render the images to review first (highest review_priority, as `batchseg review`)")
    render.add_argument("--labels", type=int, default=20, metavar="K",
                        help="instances drawn per image, highest score first; the rest are counted")
    _storage_flags(render)
    render.set_defaults(handler=render_command)


def render_command(args: argparse.Namespace) -> int:
    from batchseg.render import render

    for flag in ("limit", "labels"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    results = _open_results(args)
    with _reaching(f"DEST {args.dest}"):
        count = render(results, args.dest, limit=args.limit, storage=_storage(args), review=args.review,
                       labels=args.labels)
    print(f"batchseg: rendered {count} images; open {args.dest.rstrip('/')}/index.html")
    return EXIT_OK


def add_review(commands: argparse._SubParsersAction) -> None:
    review = _command(
        commands, "review", help="list the images to look at first (highest review_priority)",
        description="Print the N images with the highest review_priority (0..1, higher = look first), "
                    "one per line: priority, image URI, a short reason. Streams the results with memory "
                    "bounded by N; rows without a priority (older runs) come last. "
                    "`batchseg render RESULTS DEST --review --limit N` draws the same images.")
    review.add_argument("results", metavar="RESULTS", help=RESULTS_HELP)
    review.add_argument("--top", type=int, default=20, metavar="N", help="how many images to list")
    review.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    _storage_flags(review)
    review.set_defaults(handler=review_command)


def review_command(args: argparse.Namespace) -> int:
    from batchseg.render import review_queue

    if args.top < 1:
        raise ConfigError(f"--top must be at least 1 (got {args.top})")
    for item in review_queue(_open_results(args), args.top):
        if args.json:
            print(json.dumps(item))
        else:
            priority = "    -  " if item["review_priority"] is None else f"{item['review_priority']:.4f}"
            print(f"{priority}  {item['image_uri']}  {item['reason']}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------- push

def add_push(commands: argparse._SubParsersAction) -> None:
    push = _command(commands, "push", help="push results into a live annotation tool",
                    description="Push a results dataset into a running annotation tool. "
                                "`batchseg push TOOL --help` says what each does.")
    tools = push.add_subparsers(title="tools", dest="tool", required=True, metavar="TOOL", parser_class=_Parser,
                                help="the annotation tool to push into")
    ls = _command(tools, "labelstudio", help="tasks with predictions into a Label Studio project", description="""\
Tasks with predictions (the same regions as `export labelstudio`) go into the project, worst
first (descending review_priority). Pushing again adds nothing; images that a newer run
annotated get their predictions replaced (annotations made by people stay). Failed images and
instances with an empty mask are left out and counted. A receipt (JSON: project, tasks created /
updated / skipped per chunk, runs pushed) goes to --receipt, by default
RESULTS/labelstudio_push/RECEIPT-<UTC time>.json.

The API key comes from LABEL_STUDIO_API_KEY (Label Studio: Account & Settings -> Access Token).
s3:// image references stay as they are: connect an S3 source storage for that bucket to the
project (no sync needed) and Label Studio serves them; --url-map rewrites prefixes instead.""")
    ls.add_argument("results", metavar="RESULTS", help=RESULTS_HELP)
    ls.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL"), metavar="URL",
                    help="Label Studio's address, e.g. http://localhost:8080 (default: LABEL_STUDIO_URL)")
    ls.add_argument("--project", required=True, metavar="NAME|ID",
                    help="project title (created with a matching labeling config if absent) or id")
    ls.add_argument("--chunk-size", type=int, default=100, metavar="N", help="tasks per import request")
    ls.add_argument("--max-chunk-mb", type=float, default=32.0, metavar="MB",
                    help="most JSON per import request (Label Studio refuses over 200 MB)")
    ls.add_argument("--retries", type=int, default=5, metavar="N",
                    help="tries again after a timeout, a dropped connection or HTTP 408/429/5xx, backing off 1, 2, 4 ... s")
    ls.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds per request")
    ls.add_argument("--model-version", metavar="TEXT",
                    help="the predictions' model_version (default: each run's provenance label)")
    ls.add_argument("--url-map", action="append", default=[], metavar="PREFIX=URL",
                    help="rewrite image URIs starting with PREFIX, e.g. file:///data/=http://host:8081/; repeatable")
    ls.add_argument("--lookup", choices=["auto", "query", "index"], default="auto",
                    help="how existing tasks are found: Label Studio filter queries per chunk (each scans the "
                         "project), or one listing of the project (about 1 ms a task); auto: none into an empty "
                         "project, a listing for pushes over 10000 rows, else queries")
    ls.add_argument("--receipt", metavar="PATH", help="where the receipt goes (local or s3://)")
    ls.add_argument("--spool-dir", metavar="DIR",
                    help="local folder for the ordering spool, about the size of the rows (default: TMPDIR)")
    _storage_flags(ls)
    ls.set_defaults(handler=push_labelstudio_command)


def push_labelstudio_command(args: argparse.Namespace) -> int:
    from batchseg.exports.labelstudio_push import PushFailed, PushSettings, push_labelstudio

    if not args.url or not args.url.startswith(("http://", "https://")):
        raise ConfigError(f"--url must be Label Studio's http(s) address, e.g. http://localhost:8080 (got {args.url!r}; "
                          "LABEL_STUDIO_URL works too)")
    if args.chunk_size < 1 or args.max_chunk_mb <= 0 or args.retries < 0 or args.timeout <= 0:
        raise ConfigError("--chunk-size must be at least 1, --max-chunk-mb and --timeout above 0, --retries 0 or more")
    settings = PushSettings(chunk_size=args.chunk_size, max_chunk_bytes=int(args.max_chunk_mb * 2**20),
                            retries=args.retries, timeout_s=args.timeout, model_version=args.model_version,
                            url_map=[_pair(m) for m in args.url_map], spool_dir=args.spool_dir, lookup=args.lookup)
    results = _open_results(args)
    try:
        receipt = push_labelstudio(results, args.url, args.project, os.environ.get("LABEL_STUDIO_API_KEY"), settings,
                                   args.receipt, _storage(args).options(args.receipt or args.results))
    except PushFailed as e:
        print(f"batchseg: {e}", file=sys.stderr)
        return EXIT_FAILED
    project, tasks, stats = receipt["project"], receipt["tasks"], receipt["stats"]
    print(f"batchseg: Label Studio project {project['id']} {project['title']!r}"
          f"{' (created)' if project['created'] else ''} at {args.url}")
    chunks = len(receipt["chunks"])
    print(f"batchseg: {stats['tasks']} tasks in {chunks} chunk{'s' * (chunks != 1)}: {tasks['created']} created, "
          f"{tasks['updated']} updated, {tasks['skipped']} skipped ({receipt['retries']} retries)")
    print(f"batchseg: left out {stats['failed_images']} failed images and {stats['skipped_empty']} empty masks")
    print(f"batchseg: receipt {receipt['receipt']}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------- main

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_run, add_export, add_eval, add_render, add_review,
                                                               add_push]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="batchseg", description=__doc__.split("\n\n")[0], epilog=RUN_EXIT_CODES)
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND",
                                     help="`batchseg COMMAND --help` for its options")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # batchseg's own progress notes at INFO; other libraries only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("batchseg").setLevel(logging.INFO)
    # Import-time notices from detectron2's dependencies; they would bury a one-line error.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as e:
        print(f"batchseg: {e}", file=sys.stderr)
        return _exit_code(e)
    except KeyboardInterrupt:
        print("batchseg: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `batchseg review ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141  # 128 + SIGPIPE, what a shell reports for a producer stopped this way
    except Exception as e:
        line = user_error(e)  # a storage or path problem surfacing where no check caught it
        if line is None:
            raise
        print(f"batchseg: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _exit_code(e: ConfigError) -> int:
    """4 for OutputLocked, 2 for any other ConfigError. Matched by name: importing the lease
    module here would import Ray into every command."""
    return EXIT_LOCKED if any(c.__name__ == "OutputLocked" for c in type(e).__mro__) else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

"""`batchseg export FORMAT`: results into annotation-tool files."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from batchseg.cli.common import (
    EXIT_OK,
    RESULTS_HELP,
    Parser,
    command,
    pair,
    reaching,
    results_of,
    storage_config,
    storage_flags,
)
from batchseg.config import ConfigError

def add_export(commands: argparse._SubParsersAction) -> None:
    export = command(commands, "export", help="write annotation-tool files from a results dataset",
                      description="Write a results dataset in an annotation tool's format. "
                                  "`batchseg export FORMAT --help` says what each format writes.")
    formats = export.add_subparsers(title="formats", dest="format", required=True, metavar="FORMAT",
                                    parser_class=Parser, help="the annotation tool's format")
    for add in EXPORT_FORMATS:
        add(formats)


def _export_format(formats: argparse._SubParsersAction, name: str, help: str, writes: str,
                   handler: Callable[[argparse.Namespace], dict[str, Any]]) -> argparse.ArgumentParser:
    """`batchseg export NAME RESULTS DEST`; `handler(args)` writes and returns what `_export` prints."""
    parser = command(formats, name, help=help, description=f"{help}.\n\nWrites into DEST:\n{writes}")
    parser.add_argument("results", metavar="RESULTS", help=RESULTS_HELP)
    parser.add_argument("dest", metavar="DEST", help="folder to write into, local or s3:// (created if absent)")
    if name != "labelstudio":  # Label Studio gets predictions to review, not reviews
        parser.add_argument("--reviews", action="store_true",
                            help="the best labels of the lake: an image's newest review (batchseg pull) where it has "
                                 "one, its newest prediction otherwise")
    storage_flags(parser)
    parser.set_defaults(handler=lambda args: _export(args, handler))
    return parser


def _export(args: argparse.Namespace, write: Callable[[argparse.Namespace], dict[str, Any]]) -> int:
    """Run `write`; it returns {file: items} or {"files": {file: items}, other figures...}."""
    with reaching(f"DEST {args.dest}"):
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

    return export_coco(results_of(args), args.dest, storage_config(args).options(args.dest), polygons=args.polygons)


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
    url_map = [pair(m) for m in args.url_map]
    return export_labelstudio(results_of(args), args.dest, storage_config(args).options(args.dest),
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

    return export_cvat(results_of(args), args.dest, storage_config(args).options(args.dest), polygons=args.polygons)


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

    url_map = [pair(m) for m in args.url_map]
    return export_fiftyone(results_of(args), args.dest, storage_config(args).options(args.dest), url_map=url_map)


VIDEO_FORMATS = ("youtube-vis", "cvat-video", "cvat-coco-frames", "fiftyone-video", "labelstudio-video")


def add_export_video(formats: argparse._SubParsersAction) -> None:
    parser = _export_format(formats, "video", "video frames and tracks (runs over video inputs)", """  youtube-vis/youtube_vis.json        COCO video instance segmentation, YouTube-VIS layout: a
                                      track's per-frame RLE masks (--frames: JPEGImages/ too)
  cvat-video/cvat_video/VIDEO.zip     CVAT for video 1.1: a track per instance track, polygons
  cvat-coco-frames/cvat_coco_frames.zip  CVAT's COCO 1.0 with the frame images
  fiftyone-video/                     a FiftyOne video dataset: frames with Detections, index = track
  labelstudio-video/videos/*.json     Label Studio image tasks, one file per video, frames written
Frames are decoded again from the videos (VIDEO#t=SECONDS); see docs/video.md.""", _write_video)
    parser.add_argument("--formats", default=",".join(VIDEO_FORMATS), metavar="A,B",
                        help=f"which to write (default all): {', '.join(VIDEO_FORMATS)}")
    parser.add_argument("--frames", action="store_true", help="youtube-vis: write the frame images too")


def _write_video(args: argparse.Namespace) -> dict[str, Any]:
    from batchseg.exports import video

    wanted = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in wanted if f not in VIDEO_FORMATS]
    if unknown or not wanted:
        raise ConfigError(f"--formats: unknown format {unknown[0] if unknown else '(none)'!r}; choose from "
                          + ", ".join(VIDEO_FORMATS))
    results, storage, files = results_of(args), storage_config(args), {}
    out = args.dest.rstrip("/")
    writers = {
        "youtube-vis": lambda d: video.export_youtube_vis(results, d, storage.options(d), storage.options("s3://"),
                                                          frames=args.frames),
        "cvat-video": lambda d: video.export_cvat_video(results, d, storage.options(d)),
        "cvat-coco-frames": lambda d: video.export_cvat_coco_frames(results, d, storage.options(d), storage.options("s3://")),
        "fiftyone-video": lambda d: video.export_fiftyone_video(results, d, storage.options(d)),
        "labelstudio-video": lambda d: video.export_labelstudio_video(results, d, storage.options(d),
                                                                      storage.options("s3://")),
    }
    for name in wanted:
        for file, count in writers[name](f"{out}/{name}")["files"].items():
            files[f"{name}/{file}"] = count
    return {"files": files}


# One function per format, in the order `export --help` lists them.
EXPORT_FORMATS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_export_coco,
    add_export_labelstudio,
    add_export_cvat,
    add_export_fiftyone,
    add_export_video,
]

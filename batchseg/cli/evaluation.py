"""`batchseg eval | render | review`: how good the labels are, and pictures of them."""

from __future__ import annotations

import argparse
import json

from batchseg.cli.common import (
    EXIT_OK,
    RESULTS_HELP,
    command,
    reaching,
    require_file,
    require_writable_file,
    results_of,
    storage_config,
    storage_flags,
)
from batchseg.config import ConfigError

def add_eval(commands: argparse._SubParsersAction) -> None:
    evaluate = command(
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
    storage_flags(evaluate)
    evaluate.set_defaults(handler=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    from batchseg.evaluation.evaluate import evaluate, format_table
    from batchseg.store.storage import write_json

    storage = storage_config(args)
    results = results_of(args)
    require_file("--gt", args.gt, storage)
    out = args.out or f"{args.results.rstrip('/')}/eval.json"
    require_writable_file("--out", out, storage)
    with reaching(f"--gt {args.gt}"):
        try:
            metrics = evaluate(results, args.gt, args.gt_panoptic_dir, storage.options(args.gt))
        except json.JSONDecodeError as e:
            raise ConfigError(f"--gt {args.gt} is not JSON ({e}); give a COCO ground-truth JSON") from None
    print(format_table(metrics))
    with reaching(f"--out {out}"):
        write_json(out, metrics, storage.options(out))
    print(f"batchseg: metrics written to {out}")
    return EXIT_OK





def add_render(commands: argparse._SubParsersAction) -> None:
    render = command(
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
    storage_flags(render)
    render.set_defaults(handler=render_command)


def render_command(args: argparse.Namespace) -> int:
    from batchseg.evaluation.render import render

    for flag in ("limit", "labels"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    results = results_of(args)
    with reaching(f"DEST {args.dest}"):
        count = render(results, args.dest, limit=args.limit, storage=storage_config(args), review=args.review,
                       labels=args.labels)
    print(f"batchseg: rendered {count} images; open {args.dest.rstrip('/')}/index.html")
    return EXIT_OK


def add_review(commands: argparse._SubParsersAction) -> None:
    review = command(
        commands, "review", help="list the images to look at first (highest review_priority)",
        description="Print the N images with the highest review_priority (0..1, higher = look first), "
                    "one per line: priority, image URI, a short reason. Streams the results with memory "
                    "bounded by N; rows without a priority (older runs) come last. "
                    "`batchseg render RESULTS DEST --review --limit N` draws the same images.")
    review.add_argument("results", metavar="RESULTS", help=RESULTS_HELP)
    review.add_argument("--top", type=int, default=20, metavar="N", help="how many images to list")
    review.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    storage_flags(review)
    review.set_defaults(handler=review_command)


def review_command(args: argparse.Namespace) -> int:
    from batchseg.evaluation.render import review_queue

    if args.top < 1:
        raise ConfigError(f"--top must be at least 1 (got {args.top})")
    for item in review_queue(results_of(args), args.top):
        if args.json:
            print(json.dumps(item))
        else:
            priority = "    -  " if item["review_priority"] is None else f"{item['review_priority']:.4f}"
            print(f"{priority}  {item['image_uri']}  {item['reason']}")
    return EXIT_OK


def add_acceptance(commands: argparse._SubParsersAction) -> None:
    accept = command(
        commands, "acceptance", help="how good the pre-labels were, against the pulled reviews",
        description="For every reviewed image (batchseg pull), compare the predictions the annotator saw with "
                    "what the annotator submitted: kept, edited (class changes apart), deleted and added "
                    "instances per category and overall, mean IoU, median lead time by edits, COCO AP with the "
                    "reviews as ground truth, and whether review_priority ranked the edited images first. "
                    "Prints a table and writes acceptance.json, acceptance.png and acceptance_tasks.parquet "
                    "(one row per image) to --out.")
    accept.add_argument("output", metavar="OUTPUT", help="the output folder that holds the runs and reviews/")
    accept.add_argument("--out", metavar="DIR", help="where the report goes (default: OUTPUT)")
    accept.add_argument("--kept-iou", type=float, default=0.9, metavar="IOU",
                        help="a matched instance of the same class at or above this IoU counts as kept")
    accept.add_argument("--match-iou", type=float, default=0.5, metavar="IOU",
                        help="the least IoU at which a prediction and a reviewed instance are the same object")
    accept.add_argument("--no-ap", action="store_true", help="skip COCO AP (it holds every instance in memory)")
    storage_flags(accept)
    accept.set_defaults(handler=acceptance_command)


def acceptance_command(args: argparse.Namespace) -> int:
    import tempfile

    from fsspec.core import url_to_fs

    from batchseg.evaluation.acceptance import acceptance, draw, format_table
    from batchseg.store.results import open_results
    from batchseg.store.reviews import open_reviews
    from batchseg.store.storage import atomic_write, write_json

    if not 0 < args.match_iou <= args.kept_iou <= 1:
        raise ConfigError(f"need 0 < --match-iou <= --kept-iou <= 1 (got {args.match_iou} and {args.kept_iou})")
    storage = storage_config(args)
    out = (args.out or args.output).rstrip("/")
    with reaching(f"OUTPUT {args.output}"):
        results = open_results(args.output, storage.options(args.output))
        reviews = open_reviews(args.output, storage.options(args.output))
    with tempfile.TemporaryDirectory(prefix="batchseg-acceptance-") as tmp:
        tasks = f"{tmp}/acceptance_tasks.parquet"
        report = acceptance(results, reviews, tasks, args.match_iou, args.kept_iou, with_ap=not args.no_ap)
        print(format_table(report))
        with reaching(f"--out {out}"):
            fs, folder = url_to_fs(out, **storage.options(out))
            with open(tasks, "rb") as f:
                atomic_write(fs, f"{folder}/acceptance_tasks.parquet", f.read())
            atomic_write(fs, f"{folder}/acceptance.png", draw(report))
            write_json(f"{out}/acceptance.json", report, storage.options(out))
    print(f"batchseg: acceptance.json, acceptance.png and acceptance_tasks.parquet written to {out}")
    return EXIT_OK

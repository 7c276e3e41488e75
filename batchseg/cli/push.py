"""`batchseg push labelstudio`: results into a live Label Studio project."""

from __future__ import annotations

import argparse
import os
import sys

from batchseg.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    RESULTS_HELP,
    Parser,
    command,
    pair,
    results_of,
    storage_config,
    storage_flags,
)
from batchseg.config import ConfigError

def add_push(commands: argparse._SubParsersAction) -> None:
    push = command(commands, "push", help="push results into a live annotation tool",
                    description="Push a results dataset into a running annotation tool. "
                                "`batchseg push TOOL --help` says what each does.")
    tools = push.add_subparsers(title="tools", dest="tool", required=True, metavar="TOOL", parser_class=Parser,
                                help="the annotation tool to push into")
    ls = command(tools, "labelstudio", help="tasks with predictions into a Label Studio project", description="""\
Tasks with predictions (the same regions as `export labelstudio`) go into the project, worst
first (descending review_priority). Pushing again adds nothing; images that a newer run
annotated get their predictions replaced (annotations made by people stay). Failed images and
instances with an empty mask are left out and counted. A receipt (JSON: project, tasks created /
updated / skipped per chunk, runs pushed) goes to --receipt, by default
RESULTS/labelstudio_push/RECEIPT-<UTC time>.json.

The API key comes from LABEL_STUDIO_API_KEY (Label Studio: Account & Settings -> Access Token).
s3:// image references stay as they are: connect an S3 source storage for that bucket to the
project (no sync needed) and Label Studio serves them; --url-map rewrites prefixes instead.

Video frames (VIDEO#t=SECONDS) become image tasks too: each frame is decoded again and written
as a JPEG under --frames (default RESULTS/labelstudio_push/frames/VIDEO/NNNNNN.jpg), which the
task's image names (through --url-map, or an S3 storage for s3://); data.video, frame_index and
pts_s group the frames by video. Only frames of tasks created or updated are written.""")
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
    ls.add_argument("--frames", metavar="DIR",
                    help="where video frames' images go, local or s3:// (default RESULTS/labelstudio_push/frames)")
    ls.add_argument("--receipt", metavar="PATH", help="where the receipt goes (local or s3://)")
    ls.add_argument("--spool-dir", metavar="DIR",
                    help="local folder for the ordering spool, about the size of the rows (default: TMPDIR)")
    storage_flags(ls)
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
                            url_map=[pair(m) for m in args.url_map], spool_dir=args.spool_dir, lookup=args.lookup,
                            frames=args.frames)
    results = results_of(args)
    try:
        receipt = push_labelstudio(results, args.url, args.project, os.environ.get("LABEL_STUDIO_API_KEY"), settings,
                                   args.receipt, storage_config(args).options(args.receipt or args.results),
                                   storage_config(args))
    except PushFailed as e:
        print(f"batchseg: {e}", file=sys.stderr)
        return EXIT_FAILED
    project, tasks, stats = receipt["project"], receipt["tasks"], receipt["stats"]
    print(f"batchseg: Label Studio project {project['id']} {project['title']!r}"
          f"{' (created)' if project['created'] else ''} at {args.url}")
    chunks = len(receipt["chunks"])
    print(f"batchseg: {stats['tasks']} tasks in {chunks} chunk{'s' * (chunks != 1)}: {tasks['created']} created, "
          f"{tasks['updated']} updated, {tasks['skipped']} skipped, {tasks['annotated']} kept for their annotations "
          f"({receipt['retries']} retries)")
    print(f"batchseg: left out {stats['failed_images']} failed images and {stats['skipped_empty']} empty masks")
    if "frames" in receipt:
        frames = receipt["frames"]
        print(f"batchseg: {frames['written']} video frame images written to {frames['folder']}"
              + (f"; {frames['unreadable']} frames left out, their video did not give them (first: "
                 f"{frames['first_unreadable']}); push again once the videos are back" if frames["unreadable"] else ""))
    print(f"batchseg: receipt {receipt['receipt']}")
    return EXIT_OK

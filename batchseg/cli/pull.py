"""`batchseg pull labelstudio | coco`: what people submitted, back into the lake as reviews."""

from __future__ import annotations

import argparse
import os
import sys

from batchseg.cli.common import EXIT_FAILED, EXIT_OK, Parser, command, pair, reaching, require_file, storage_config, storage_flags
from batchseg.config import ConfigError

OUTPUT_HELP = "the output folder a run wrote (local or s3://): reviews go to OUTPUT/reviews/pull=PULL_ID/"


def add_pull(commands: argparse._SubParsersAction) -> None:
    pull = command(commands, "pull", help="pull reviewed labels back into the lake (the reviews dataset)",
                   description="Read what people submitted in an annotation tool and write it into the output "
                               "folder as reviews (docs/reviews.md). `batchseg pull TOOL --help` says what each does.")
    tools = pull.add_subparsers(title="tools", dest="tool", required=True, metavar="TOOL", parser_class=Parser,
                                help="where the reviews come from")
    ls = command(tools, "labelstudio", help="a Label Studio project's submitted annotations", description="""\
The project's submitted annotations (not cancelled or skipped ones) become one review per task:
the annotation marked ground truth, else the one saved last. Incremental: only annotations
saved after the last pull of this project are read, so pulling again with nothing new adds
nothing, and an edited annotation replaces its earlier review. Tasks are matched to images by
the data.image_id push wrote; others by their image URL through --url-map, or skipped and
counted. A label outside the runs' category table stops the pull (exit 2) before anything is
published. The API key comes from LABEL_STUDIO_API_KEY.""")
    ls.add_argument("output", metavar="OUTPUT", help=OUTPUT_HELP)
    ls.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL"), metavar="URL",
                    help="Label Studio's address, e.g. http://localhost:8080 (default: LABEL_STUDIO_URL)")
    ls.add_argument("--project", required=True, metavar="NAME|ID", help="project title or id (it must exist)")
    ls.add_argument("--url-map", action="append", default=[], metavar="PREFIX=URL",
                    help="the pairs push was given: task URLs starting with URL are the lake's PREFIX; repeatable")
    ls.add_argument("--page-size", type=int, default=100, metavar="N", help="tasks per request")
    ls.add_argument("--retries", type=int, default=5, metavar="N",
                    help="tries again after a timeout, a dropped connection or HTTP 408/429/5xx, backing off 1, 2, 4 ... s")
    ls.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds per request")
    storage_flags(ls)
    ls.set_defaults(handler=pull_labelstudio_command)

    coco = command(tools, "coco", help="a COCO dataset export (CVAT's COCO 1.0, any tool's) as reviews", description="""\
Every image of COCO instances and person_keypoints exports becomes a review: its
annotations, masks from RLE or polygons, boxes rasterised where there is neither. Images are
matched to the lake's images by file name: --images-root ROOT makes file_name ROOT/file_name
(a lake URI), --url-map PREFIX=URL turns URL-named images back into lake URIs, and otherwise the
end of the path of an image the runs annotated ("a/b.jpg" matches ".../a/b.jpg"). Unmatched
images are skipped and counted. Category names map to the runs' category ids; a name outside
their table stops the pull (exit 2).""")
    coco.add_argument("files", nargs="+", metavar="FILE",
                      help="COCO JSON, or a zip holding them (CVAT's COCO 1.0 and COCO Keypoints 1.0 archives); several "
                           "make one pull, images merged by file name")
    coco.add_argument("output", metavar="OUTPUT", help=OUTPUT_HELP)
    coco.add_argument("--images-root", metavar="ROOT", help="the lake folder the export's file names are relative to")
    coco.add_argument("--url-map", action="append", default=[], metavar="PREFIX=URL",
                      help="file names starting with URL are the lake's PREFIX; repeatable")
    coco.add_argument("--annotator", metavar="NAME", help="who reviewed (COCO files do not say)")
    storage_flags(coco)
    coco.set_defaults(handler=pull_coco_command)


def pull_labelstudio_command(args: argparse.Namespace) -> int:
    from batchseg.exports.labelstudio_pull import PullSettings, pull_labelstudio
    from batchseg.exports.labelstudio_push import PushFailed

    if not args.url or not args.url.startswith(("http://", "https://")):
        raise ConfigError(f"--url must be Label Studio's http(s) address, e.g. http://localhost:8080 (got {args.url!r}; "
                          "LABEL_STUDIO_URL works too)")
    if args.page_size < 1 or args.retries < 0 or args.timeout <= 0:
        raise ConfigError("--page-size must be at least 1, --timeout above 0, --retries 0 or more")
    settings = PullSettings(page_size=args.page_size, retries=args.retries, timeout_s=args.timeout,
                            url_map=[pair(m) for m in args.url_map])
    try:
        with reaching(f"OUTPUT {args.output}"):
            receipt = pull_labelstudio(args.output, args.url, args.project, os.environ.get("LABEL_STUDIO_API_KEY"),
                                       settings, storage_config(args).options(args.output))
    except PushFailed as e:
        print(f"batchseg: {e}", file=sys.stderr)
        return EXIT_FAILED
    counts = receipt["counts"]
    print(f"batchseg: pull {receipt['pull']} from Label Studio project {receipt['source']['project']} "
          f"{receipt['project_title']!r}: {receipt['rows']} reviews from {counts['tasks']} annotated tasks")
    print(f"batchseg: skipped {counts['not_newer']} already pulled, {counts['cancelled']} cancelled, "
          f"{counts['unmatched']} unmatched tasks; {counts['several_annotators']} had several annotators")
    return EXIT_OK


def pull_coco_command(args: argparse.Namespace) -> int:
    from batchseg.exports.coco_pull import pull_coco

    storage = storage_config(args)
    for file in args.files:
        require_file("FILE", file, storage)
    with reaching(f"OUTPUT {args.output}"):
        receipt = pull_coco(args.files, args.output, images_root=args.images_root,
                            url_map=[pair(m) for m in args.url_map], annotator=args.annotator,
                            storage_options=storage.options(args.output), file_options=storage.options(args.files[0]))
    counts = receipt["counts"]
    print(f"batchseg: pull {receipt['pull']} from {' '.join(args.files)}: {receipt['rows']} reviews of {counts['images']} images "
          f"({counts['unmatched']} unmatched)")
    return EXIT_OK

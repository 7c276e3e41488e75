"""Pull what people submitted in Label Studio back into the lake: `batchseg pull labelstudio OUTPUT
--url URL --project NAME|ID` writes OUTPUT/reviews/pull=PULL_ID/ (batchseg.store.reviews).

- Which annotation counts: per task, the submitted ones (not cancelled, i.e. not skipped);
  the one marked ground truth if there is one, else the one saved last (`updated_at`). One
  review per task; a submitted annotation with no region says "nothing here".
- Incremental and idempotent: the receipt keeps `high_water`, the newest task `updated_at`
  the pull read (Label Studio moves it when an annotation of the task is saved); the next
  pull of the same project asks only for tasks updated after it, and keeps only tasks with an
  annotation saved after it. Nothing new: a receipt with 0 rows. An annotation edited after a
  pull is pulled again, and its review replaces the earlier one (newest pull wins).
- Streaming: tasks come one page at a time (`page_size`), keyset-paged on `updated_at`
  (annotated_tasks), and rows go to Parquet parts as they fill: memory is one page plus one
  part, whatever the project's size.
- Matching: a task's `data.image_id` (written by push; a video frame's task also holds
  `data.frame_uri`, the review's image_uri). A task without one (imported by hand)
  is matched by its `data.image` URL, turned back into the lake's URI by `--url-map`
  PREFIX=URL (the same pairs push takes), if a run of OUTPUT annotated that URI; otherwise it
  is skipped and counted as `unmatched`.
- Conversion (regions as push writes them, or drawn by people):
    brushlabels "mask"      Label Studio RLE -> COCO RLE at the original resolution, decoded
                            by label-studio-sdk's converter (label_studio_sdk.converter.brush)
    rectanglelabels "box"   the rectangle rasterised; a rectangle and a brush of one instance
                            (ids `iN` and `iNm`, as push writes them) make one instance, the
                            brush's mask and label winning
    polygonlabels           rasterised with pycocotools
    keypointlabels          COCO keypoints, v=2 where placed, 0 where not; points of one person
                            share an id prefix `kN_` (push) or a parentID, else form one person
    labels                  -> the run's category ids, by name. A label not in the category
                            table stops the pull with one line naming it (exit 2), before
                            anything is published: a typo'd label must not become silently lost
                            or unknown training data.
  Panoptic brushes are not reviews (the dataset has no panoptic column) and are counted as
  `ignored_regions`.
- Failures: the same bounded retries and one-line errors as push. A pull stopped part-way
  publishes nothing (no receipt) and the next pull starts again from the last high-water mark.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.core.api_error import ApiError

from batchseg.config import ConfigError
from batchseg.exports.labelstudio_push import PushFailed, PushSettings, Server
from batchseg.rows.encoding import encode_mask
from batchseg.rows.schema import image_id as image_id_of
from batchseg.store.results import Results, open_results
from batchseg.store.reviews import PullWriter, open_reviews

log = logging.getLogger(__name__)
TOOL = "labelstudio"
_PUSHED_BRUSH = re.compile(r"^(?P<base>.+)m$")  # push names an instance's brush `iNm`, its box `iN`
_PUSHED_POINT = re.compile(r"^(?P<person>k\d+)_\d+$")


@dataclass
class PullCounts:
    tasks: int = 0  # tasks read with at least one annotation
    reviews: int = 0  # rows written
    not_newer: int = 0  # tasks whose newest annotation the last pull had already seen
    cancelled: int = 0  # tasks with no submitted annotation (all skipped / cancelled)
    unmatched: int = 0  # tasks without data.image_id whose URL matches no image of the lake
    ignored_regions: int = 0  # panoptic brushes and region types that are not reviews
    several_annotators: int = 0  # tasks with more than one submitted annotation

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class PullSettings:
    page_size: int = 100
    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 120.0
    url_map: list[tuple[str, str]] = field(default_factory=list)
    rows_per_file: int = 10_000


def pull_labelstudio(output: str, url: str, project: str, api_key: str | None, settings: PullSettings | None = None,
                     storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pull the project's new submitted annotations into OUTPUT's reviews; returns the receipt.
    Raises ConfigError (bad key, URL, project, unknown label) or PushFailed (the server
    stopped answering); either way nothing is published."""
    settings = settings or PullSettings()
    if not api_key:
        raise ConfigError("no Label Studio API key: set LABEL_STUDIO_API_KEY (Label Studio: Account & Settings -> "
                          "Access Token)")
    results = open_results(output, storage_options)
    labels = Labels(results.categories)
    client = LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=settings.timeout_s, max_retries=0)
    server = Server(client, url, PushSettings(retries=settings.retries, backoff_s=settings.backoff_s,
                                              timeout_s=settings.timeout_s),
                    again="nothing was published; pull again to finish")
    project_id, _ = server.project(project, None)
    source = {"url": url.rstrip("/"), "project": project_id}
    high_water = last_high_water(output, storage_options, source)
    writer = PullWriter(output, storage_options, rows_per_file=settings.rows_per_file)
    counts = PullCounts()
    lake = LakeIds(results)
    try:
        users = server.call("list users", lambda: {u.id: u.email or str(u.id) for u in client.users.list()})
    except (ConfigError, PushFailed):  # a token that may not list users: annotators by id
        users = {}
    cursor: list[datetime | None] = [high_water]
    for task in annotated_tasks(server, project_id, high_water, settings.page_size, cursor):
        counts.tasks += 1
        saved = [_time(a.get("updated_at") or a.get("created_at")) for a in task.get("annotations") or []]
        if high_water and max(saved, default=high_water) <= high_water:  # the task changed, not its annotations
            counts.not_newer += 1
            continue
        row = review_of_task(task, labels, users, settings.url_map, lake, counts)
        if row is not None:
            row["ls_project"] = project_id
            writer.add(row)
            counts.reviews += 1
    return writer.publish({"tool": TOOL, "source": source, "project_title": server.title,
                           "high_water": cursor[0].isoformat() if cursor[0] else None, "since": high_water.isoformat()
                           if high_water else None, "counts": counts.as_dict(), "categories": results.categories,
                           "retries": server.retried})


def last_high_water(output: str, storage_options: dict[str, Any] | None, source: dict[str, Any]) -> datetime | None:
    """The newest `high_water` of the published pulls from `source` (None: pull everything)."""
    marks = [_time(r["high_water"]) for r in open_reviews(output, storage_options).receipts
             if r.get("source") == source and r.get("high_water")]
    return max(marks) if marks else None


def annotated_tasks(server: Server, project_id: int, since: datetime | None, page_size: int,
                    cursor: list[datetime | None]) -> Iterator[dict[str, Any]]:
    """Tasks with at least one submitted annotation, updated after `since`, with their
    annotations and predictions, in `updated_at` order, a page at a time.

    Keyset paging on the task's `updated_at` (each request asks for tasks updated at or after
    the last one seen, skipping the ids already seen at that instant): a task saved during
    the pull moves to the end and is read later in it, and nothing shifts under the pages as
    an offset would. `cursor[0]` is left at the newest `updated_at` read (the next high-water
    mark)."""
    cursor[0] = since
    at_cursor: set[int] = set()  # ids read whose updated_at equals the cursor
    size = page_size
    while True:
        got = server.call("read tasks", lambda: _page(server, project_id, cursor[0], size))
        fresh = [t for t in got if t["id"] not in at_cursor]
        yield from fresh
        if fresh:
            newest = _time(fresh[-1]["updated_at"])
            if newest != cursor[0]:
                at_cursor = set()
            cursor[0] = newest
            at_cursor |= {t["id"] for t in fresh if _time(t["updated_at"]) == newest}
        if len(got) < size:
            return
        size = size * 2 if not fresh else page_size  # a full page saved at one instant: ask for more of them


def _page(server: Server, project_id: int, after: datetime | None, page_size: int) -> list[dict[str, Any]]:
    """The first `page_size` tasks with a submitted annotation, updated at or after `after`,
    oldest first, as dicts."""
    items = [{"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}]
    if after is not None:  # "greater" than a microsecond before: at or after (the format is the one it parses)
        items.append({"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime",
                      "value": (after - timedelta(microseconds=1)).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")})
    query = json.dumps({"filters": {"conjunction": "and", "items": items}, "ordering": ["tasks:updated_at"]})
    pager = server.client.tasks.list(project=project_id, query=query, fields="all", resolve_uri=False, page=1,
                                     page_size=page_size)
    return [t.model_dump(mode="json") for t in pager.items or []]


def review_of_task(task: dict[str, Any], labels: "Labels", users: dict[int, str], url_map: list[tuple[str, str]],
                   lake: "LakeIds", counts: PullCounts) -> dict[str, Any] | None:
    """The review row of one task (schema.REVIEW, less `pull` and `ls_project`), or None
    (counted) when no annotation was submitted or the image is not the lake's."""
    submitted = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not submitted:
        counts.cancelled += 1
        return None
    counts.several_annotators += len(submitted) > 1
    chosen = pick_annotation(submitted)
    data = task.get("data") or {}
    # a video frame's task shows the frame's image; the lake names the frame VIDEO#t=SECONDS
    uri = data.get("frame_uri") or unmap_url(str(data.get("image", "")), url_map)
    if data.get("image_id") is not None:
        image = int(data["image_id"])
    elif lake.has(image_id_of(uri)):
        image = image_id_of(uri)
    else:
        counts.unmatched += 1
        return None
    shown = _prediction_seen(task, chosen)
    regions = chosen.get("result") or []
    width, height = _size(regions) or _size((shown or {}).get("result") or []) or (None, None)
    instances, people, ignored = labels.convert(regions, width, height, f"Label Studio task {task['id']}")
    counts.ignored_regions += ignored
    completed_by = chosen.get("completed_by")
    user = completed_by.get("id") if isinstance(completed_by, dict) else completed_by
    return {"image_id": image, "image_uri": uri, "width": width, "height": height, "instances": instances,
            "keypoints": people, "source": "human", "annotator": users.get(user, None if user is None else str(user)),
            "reviewed_at": _time(chosen.get("updated_at") or chosen.get("created_at")),
            "lead_time_s": chosen.get("lead_time"), "tool": TOOL, "ls_task": task["id"], "ls_annotation": chosen["id"],
            "run": data.get("batchseg_run") or None, "model_version": (shown or {}).get("model_version")}


def pick_annotation(submitted: list[dict[str, Any]]) -> dict[str, Any]:
    """The annotation marked ground truth (the newest such), else the one saved last."""
    def saved(a: dict[str, Any]) -> datetime:
        return _time(a.get("updated_at") or a.get("created_at"))

    truth = [a for a in submitted if a.get("ground_truth")]
    return max(truth or submitted, key=saved)


def _prediction_seen(task: dict[str, Any], annotation: dict[str, Any]) -> dict[str, Any] | None:
    """The prediction the annotation started from (`parent_prediction`), else the task's newest."""
    predictions = task.get("predictions") or []
    parent = annotation.get("parent_prediction")
    return next((p for p in predictions if p.get("id") == parent), None) or (predictions[-1] if predictions else None)


def _size(regions: list[dict[str, Any]]) -> tuple[int, int] | None:
    for r in regions:
        if r.get("original_width") and r.get("original_height"):
            return int(r["original_width"]), int(r["original_height"])
    return None


def _time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def unmap_url(url: str, url_map: list[tuple[str, str]]) -> str:
    """The lake URI of a task's image URL: the first `url_map` (PREFIX, URL) pair whose URL
    starts it turned back into its PREFIX (unchanged if none matches)."""
    for prefix, base in url_map:
        if url.startswith(base):
            return prefix + url[len(base):]
    return url


class LakeIds:
    """Is an image id one a run of the output annotated? The ids are read (8 bytes an image,
    only the image_id column) the first time a task without data.image_id asks."""

    def __init__(self, results: Results) -> None:
        self.results = results
        self._ids: np.ndarray | None = None

    def has(self, image: int) -> bool:
        if self._ids is None:
            self._ids = np.unique(np.fromiter((r["image_id"] for r in self.results.rows(["image_id"])), np.int64))
        at = np.searchsorted(self._ids, image)
        return bool(at < len(self._ids) and self._ids[at] == image)


class Labels:
    """Label Studio regions -> instances and people with the run's category ids."""

    def __init__(self, categories: dict[str, Any]) -> None:
        self.things = {c["name"]: c["id"] for table in ("instance",) for c in categories.get(table, {}).get("things", [])}
        keypoint = categories.get("keypoint", {})
        self.keypoint_names = list(keypoint.get("keypoint_names", []))
        people = keypoint.get("things") or [{"id": 1}]
        self.person_id = people[0]["id"]

    def category(self, label: str, where: str) -> int:
        """The run's id of `label`; ConfigError naming it and `where` (the task or image) if none."""
        if label not in self.things:
            known = ", ".join(sorted(self.things)) or "none: the runs have no instance task"
            raise ConfigError(f"{where} has label {label!r}, which is not in the runs' category table ({known}); "
                              "fix the label in the annotation tool and pull again")
        return self.things[label]

    def convert(self, regions: list[dict[str, Any]], width: int | None, height: int | None,
                where: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        """(instances, people, ignored regions) of one annotation's `result`."""
        shapes: dict[str, dict[str, Any]] = {}  # instance key -> {"mask", "label"} from its brush, else box/polygon
        points: dict[str, dict[str, tuple[float, float]]] = {}
        ignored = 0
        for r in regions:
            kind, value = r.get("type"), r.get("value") or {}
            labels = value.get(kind) or []
            if kind == "keypointlabels" and self.keypoint_names and width and height:
                match = _PUSHED_POINT.match(str(r.get("id", "")))
                person = match["person"] if match else str(r.get("parentID") or "")
                for name in labels:
                    # Label Studio's percent of the image, back to COCO's pixel-index convention
                    points.setdefault(person, {})[name] = (value["x"] * width / 100 - 0.5, value["y"] * height / 100 - 0.5)
                continue
            if kind not in ("brushlabels", "rectanglelabels", "polygonlabels") or not labels or not (width and height) \
                    or r.get("from_name") == "panoptic":
                ignored += 1
                continue
            rid = str(r.get("id", ""))
            match = _PUSHED_BRUSH.match(rid) if kind == "brushlabels" else None
            key = match["base"] if match else rid
            if kind == "brushlabels":
                mask = decode_rle(value["rle"]).reshape(height, width, 4)[:, :, 3] > 0
                shapes[key] = {"mask": mask, "label": labels[0], "brush": True}
            elif not shapes.get(key, {}).get("brush"):
                shapes[key] = {"mask": _rasterise(kind, value, width, height), "label": labels[0], "brush": False}
        instances = []
        for shape in shapes.values():
            rle = encode_mask(shape["mask"])
            area = int(mask_utils.area(rle_for_coco(rle)))
            if not area:
                continue
            instances.append({"category_id": self.category(shape["label"], where),
                              "bbox": [float(v) for v in mask_utils.toBbox(rle_for_coco(rle))], "score": 1.0,
                              "area": area, "segmentation": rle})
        people = [self._person(named) for named in points.values()]
        return instances, people, ignored

    def _person(self, named: dict[str, tuple[float, float]]) -> dict[str, Any]:
        unknown = sorted(set(named) - set(self.keypoint_names))
        if unknown:
            raise ConfigError(f"keypoint label {unknown[0]!r} is not one of the runs' keypoint names; fix it in "
                              "Label Studio and pull again")
        flat, xs, ys = [], [], []
        for name in self.keypoint_names:
            if name in named:
                x, y = named[name]
                flat += [x, y, 2.0]
                xs.append(x)
                ys.append(y)
            else:
                flat += [0.0, 0.0, 0.0]
        bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        return {"category_id": self.person_id, "bbox": bbox, "score": 1.0, "keypoints": flat}


def rle_for_coco(rle: dict[str, Any]) -> dict[str, Any]:
    """Our RLE cell (counts as str) as pycocotools takes it (counts as bytes)."""
    return {"size": list(rle["size"]), "counts": rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]}


def _rasterise(kind: str, value: dict[str, Any], width: int, height: int) -> np.ndarray:
    """(H, W) bool of a rectangle or polygon given in percent of the image (rotation ignored)."""
    if kind == "rectanglelabels":
        x, y = value["x"] * width / 100, value["y"] * height / 100
        w, h = value["width"] * width / 100, value["height"] * height / 100
        polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
    else:
        polygon = [c for px, py in value["points"] for c in (px * width / 100, py * height / 100)]
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
    return mask_utils.decode(rle).astype(bool)

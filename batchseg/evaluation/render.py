"""Overlay images and an index.html contact sheet, to eyeball a run; the review queue.

For each of the first `limit` rows (or, with `review`, the `limit` rows to review first) and
each task column it has, DEST/IMAGE_ID_COLUMN.jpg shows the upright image (EXIF applied, as
the annotations are) with: instance masks, boxes and "name score" labels; panoptic segments in
colour with their names; keypoints with the skeleton; DensePose part index (I) over each
person's box. Crowded images stay readable: only the `labels` highest-scoring instances (largest
segments) are drawn, labels are placed where they overlap no other label, and a banner counts
the rest. Failed rows appear in the sheet with their error.

`review_queue` streams the rows once, keeping the `top` highest review_priority in a bounded
heap: memory is O(top) however many rows the results hold.
"""

from __future__ import annotations

import heapq
import html
import io
import itertools
import logging
import zlib
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from batchseg.config import StorageConfig
from batchseg.rows.encoding import decode_iuv, decode_mask
from batchseg.errors import one_line
from batchseg.inputs.imaging import DecodeError, decode_rgb
from batchseg.inputs.video import read_frame, split_frame_uri
from batchseg.store.results import Results, run_of
from batchseg.inputs.sources import split_member
from batchseg.rows.tasks import TASK_TABLE

log = logging.getLogger(__name__)
COLUMNS = [task.column for task in TASK_TABLE.values()]
BATCH_ROWS = 65536  # rows per batch in the review passes: bounds their memory
TASK_OF = {task.column: name for name, task in TASK_TABLE.items()}
NEAR_THRESHOLD = 0.1  # a score this close above its threshold counts as uncertain in a reason


def color(key: int) -> tuple[int, int, int]:
    """A stable, saturated colour per category id / part index."""
    h = zlib.crc32(str(key).encode())
    rgb = np.array([h & 255, (h >> 8) & 255, (h >> 16) & 255], float)
    rgb = 60 + 195 * (rgb - rgb.min()) / max(np.ptp(rgb), 1)
    return tuple(int(v) for v in rgb)


def render(results: Results, dest: str, limit: int = 100, storage: StorageConfig | None = None,
           review: bool = False, labels: int = 20) -> int:
    """Write the overlays and DEST/index.html; returns the number of images shown.

    review: the `limit` images with the highest review_priority, worst first (else the first
    `limit` rows). labels: instances / segments drawn per image, best first.
    """
    storage = storage or StorageConfig()
    names = _names(results.categories)
    skeleton = results.categories.get("keypoint", {}).get("skeleton", [])
    columns = ["image_uri", "width", "height", "error", *COLUMNS]
    rows = _review_rows(results, limit, columns) if review else itertools.islice(results.rows(columns), limit)
    cells, unreadable = [], 0
    for row in rows:
        if row["error"] is not None:
            cells.append((row, []))
            continue
        try:
            rgb = _load(row["image_uri"], storage)
        except (OSError, DecodeError) as e:  # moved, deleted or changed since the run: one cell, not the page
            unreadable += 1
            cells.append(({**row, "error": f"not rendered: the source image cannot be read now ({one_line(e)})"}, []))
            continue
        cells.append((row, _panels(row, rgb, dest, storage, names, skeleton, labels)))
    if unreadable:
        log.warning("%d of %d images not rendered: their source images cannot be read now (see index.html)",
                    unreadable, len(cells))
    with fsspec.open(f"{dest.rstrip('/')}/index.html", "w", **storage.options(dest)) as f:
        f.write(_index(cells, results))
    return len(cells)


def _panels(row: dict[str, Any], rgb: np.ndarray, dest: str, storage: StorageConfig, names: dict[int, str],
            skeleton: list, labels: int) -> list[tuple[str, str, str]]:
    """Draw and write one JPEG per task column of the row over `rgb`, its (h, w, 3) uint8
    source image; returns (column, file, caption)."""
    panels = []
    for column in COLUMNS:
        if row.get(column) is None:
            continue
        image = Image.fromarray(rgb.copy())
        draw = {"instances": _instances, "panoptic": _panoptic, "keypoints": _keypoints,
                "densepose": _densepose}[column]
        drawn, caption = draw(image, row[column], names, skeleton, labels)
        name = f"{row['image_id']}_{column}.jpg"
        buf = io.BytesIO()
        drawn.convert("RGB").save(buf, format="JPEG", quality=90)
        with fsspec.open(f"{dest.rstrip('/')}/{name}", "wb", **storage.options(dest)) as f:
            f.write(buf.getvalue())
        panels.append((column, name, caption))
    return panels


def _review_rows(results: Results, limit: int, columns: list[str]) -> list[dict[str, Any]]:
    """The full rows of the review queue's images, worst first, each with its queue item
    under "review"; read from the row groups that hold them."""
    picks = _pick(results, limit)
    queue = _queue_items(results, picks)
    rows = _read_picked(results, picks, ["image_id", *columns])
    return [{**row, "review": item} for row, item in zip(rows, queue)]


@dataclass(frozen=True)
class _Pick:
    key: float  # review_priority, or -1 when null: rows without one come last
    order: int  # position in the stream: among equal keys the earlier row wins
    image_id: int
    run: str
    path: str
    index: int  # row number inside its file


def review_queue(results: Results, top: int) -> list[dict[str, Any]]:
    """The `top` images to review first: highest review_priority, rows without one (older
    runs, failed images) last, each image at its newest row. Each item: image_id, image_uri,
    run, review_priority, reason.

    Memory is O(top) however many rows there are: a streaming pass over two columns keeps the
    best rows in a heap; a second pass over image_id finds picks that a newer run replaced,
    and the first pass repeats without them until none is (once, unless the best rows were
    re-annotated). Only the picked rows' other columns are read.
    """
    return _queue_items(results, _pick(results, top))


def _pick(results: Results, top: int) -> list[_Pick]:
    """The `top` newest rows with the highest keys, best first (see review_queue)."""
    replaced: set[tuple[int, str]] = set()
    while True:
        picks = _rank(results, top, replaced)
        newest = _newest_runs(results, {p.image_id for p in picks})
        outdated = {(p.image_id, p.run) for p in picks if newest[p.image_id] != p.run}
        if not outdated:
            break
        replaced |= outdated
    unique = {p.image_id: p for p in reversed(picks)}  # an image twice in one run: its best row
    return sorted(unique.values(), key=lambda p: (-p.key, p.order))


def _queue_items(results: Results, picks: list[_Pick]) -> list[dict[str, Any]]:
    wanted = ["image_id", "image_uri", "error", "review_priority", *(f"{c}.list.element.score" for c in COLUMNS)]
    return [{"image_id": row["image_id"], "image_uri": row["image_uri"], "run": row["run"],
             "review_priority": row.get("review_priority"), "reason": _reason(row, results)}
            for row in _read_picked(results, picks, wanted)]


def _rank(results: Results, top: int, skip: set[tuple[int, str]]) -> list[_Pick]:
    """The `top` best rows of every run, best first (not deduplicated across runs)."""
    heap: list[tuple[float, int, _Pick]] = []
    order = 0
    for run, path, offset, batch in _batches(results, ["image_id", "review_priority"]):
        keys = _keys(batch)
        bar = heap[0][0] if len(heap) == top else -np.inf  # only rows above the worst kept can enter
        candidates = np.flatnonzero(keys > bar)
        candidates = candidates[np.argsort(-keys[candidates], kind="stable")[:top]]
        ids = batch.column("image_id").to_numpy()
        for i in candidates:
            pick = _Pick(float(keys[i]), order + int(i), int(ids[i]), run, path, offset + int(i))
            if (pick.image_id, run) in skip:
                continue
            entry = (pick.key, -pick.order, pick)
            if len(heap) < top:
                heapq.heappush(heap, entry)
            elif entry[:2] > heap[0][:2]:
                heapq.heapreplace(heap, entry)
        order += batch.num_rows
    return [pick for _, _, pick in sorted(heap, key=lambda e: e[:2], reverse=True)]


def _keys(batch: pa.RecordBatch) -> np.ndarray:
    if "review_priority" not in batch.schema.names:
        return np.full(batch.num_rows, -1.0)
    return np.nan_to_num(batch.column("review_priority").to_numpy(zero_copy_only=False).astype(float), nan=-1.0)


def _newest_runs(results: Results, ids: set[int]) -> dict[int, str]:
    """image id -> the newest run holding it, for `ids` only."""
    wanted = np.fromiter(ids, np.int64)
    newest: dict[int, str] = {}
    for run, _, _, batch in _batches(results, ["image_id"]):
        found = batch.column("image_id").to_numpy()
        for image in found[np.isin(found, wanted)].tolist():
            newest[image] = max(newest.get(image, ""), run)
    return newest


def _read_picked(results: Results, picks: list[_Pick], columns: list[str]) -> list[dict[str, Any]]:
    """The picked rows' `columns` (those each file has; nested leaves allowed) plus "run", in
    `picks` order; reads only the row groups that hold them."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for path in dict.fromkeys(p.path for p in picks):
        with results.fs.open(path, "rb") as f:
            reader = _reader(f)
            starts = np.cumsum([0] + [reader.metadata.row_group(g).num_rows for g in range(reader.num_row_groups)])
            indices = sorted({p.index for p in picks if p.path == path})
            groups = np.searchsorted(starts, indices, side="right") - 1
            for group in np.unique(groups).tolist():
                table = reader.read_row_group(group, columns=_present(reader.schema_arrow, columns))
                wanted = [i for i, g in zip(indices, groups) if g == group]
                for index, row in zip(wanted, table.take([i - starts[group] for i in wanted]).to_pylist()):
                    rows[path, index] = {**row, "run": run_of(path)}
    return [rows[p.path, p.index] for p in picks]


def _batches(results: Results, columns: list[str]):
    """(run, path, first row number, batch) over every readable file, newest run first."""
    for path in sorted(results.files, key=run_of, reverse=True):
        try:
            with results.fs.open(path, "rb") as f:
                reader = _reader(f)
                offset = 0
                for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=_present(reader.schema_arrow, columns)):
                    yield run_of(path), path, offset, batch
                    offset += batch.num_rows
        except (OSError, pa.ArrowException) as e:
            log.warning("skipping %s: not a readable Parquet file (%s)", path, e)


def _reader(f) -> pq.ParquetFile:
    """pre_buffer (pyarrow's default) reads a whole file's columns ahead: memory would grow
    with the file; buffered reads keep it at a row group's worth."""
    return pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 16)


def _present(schema: pa.Schema, columns: list[str]) -> list[str]:
    """The columns (or nested leaves, "instances.list.element.score") this file has."""
    return [c for c in columns if c.split(".", 1)[0] in schema.names]


def _reason(row: dict[str, Any], results: Results) -> str:
    """A few words on what the row holds: failures, counts, scores near the threshold."""
    if row.get("error") is not None:
        return f"failed: {row['error'][:120]}"
    parts = []
    for column in COLUMNS:
        items = row.get(column)
        if items is None:
            continue
        scores = sorted(item["score"] for item in items if item.get("score") is not None)
        noun = "people" if column in ("keypoints", "densepose") else "instances" if column == "instances" else "segments"
        if not scores:
            parts.append(f"{column}: {len(items)} {noun}" if items else f"{column}: nothing found")
            continue
        threshold = _threshold(results, row.get("run"), TASK_OF[column])
        near = sum(score < threshold + NEAR_THRESHOLD for score in scores) if threshold is not None else None
        text = f"{column}: {len(items)} {noun}, lowest score {scores[0]:.2f}"
        if near:
            text += f", {near} within {NEAR_THRESHOLD} of the {threshold:g} threshold"
        parts.append(text)
    if row.get("review_priority") is None:
        parts.append("no review_priority (written by an older batchseg)")
    return "; ".join(parts) or "no task columns"


def _threshold(results: Results, run: str | None, task: str) -> float | None:
    """The score threshold the row's run used for `task` (its provenance), if recorded."""
    info = results.run_info(run) if run and hasattr(results, "run_info") else {}
    record = info.get("provenance", {}).get("tasks", {}).get(task) or {}
    return record.get("score_threshold")


def _load(uri: str, storage: StorageConfig) -> np.ndarray:
    frame = split_frame_uri(uri)
    if frame:  # VIDEO#t=SECONDS: decoded again from the video
        return read_frame(uri, storage.options(frame[0]))
    parts = split_member(uri)
    if parts:  # chained URL: the options go to the outer protocol
        shard = parts[0]
        opts = {shard.split("://", 1)[0]: storage.options(shard)} if "://" in shard else {}
    else:
        opts = storage.options(uri)
    with fsspec.open(uri, "rb", **opts) as f:
        return decode_rgb(f.read(), 10**9)


def _overlay(image: Image.Image, mask: np.ndarray, rgb: tuple[int, int, int], alpha: float = 0.45) -> None:
    layer = Image.new("RGBA", image.size, rgb + (0,))
    layer.putalpha(Image.fromarray((mask * int(255 * alpha)).astype(np.uint8)))
    image.paste(Image.alpha_composite(image.convert("RGBA"), layer).convert(image.mode))


class LabelPlacer:
    """Puts text labels next to boxes where they overlap no label placed before.

    Candidates, in order: above the box's top-left corner, inside it, below it, then the
    right-hand corners; each is kept inside the image. Labels are placed best-first, so when
    there is no free spot the one left out is the least important.
    """

    def __init__(self, size: tuple[int, int], font: ImageFont.ImageFont) -> None:
        self.width, self.height = size
        self.font = font
        self.placed: list[tuple[float, float, float, float]] = []

    def place(self, box: tuple[float, float, float, float], text: str) -> tuple[float, float, float, float] | None:
        """box: [x, y, w, h]. Returns the label's rectangle (x0, y0, x1, y1), or None if no spot is free."""
        left, top, right, bottom = self.font.getbbox(text)
        tw, th = right - left + 4, bottom - top + 4
        x, y, w, h = box
        for cx, cy in ((x, y - th), (x, y), (x, y + h), (x + w - tw, y - th), (x + w - tw, y + h), (x + w - tw, y)):
            cx = min(max(cx, 0), max(self.width - tw, 0))
            cy = min(max(cy, 0), max(self.height - th, 0))
            rect = (cx, cy, cx + tw, cy + th)
            if not any(_overlap(rect, other) for other in self.placed):
                self.placed.append(rect)
                return rect
        return None


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _font(size: tuple[int, int]) -> ImageFont.ImageFont:
    """Pillow's bundled font, scaled so a label reads at contact-sheet size."""
    return ImageFont.load_default(size=int(min(max(min(size) / 40, 11), 28)))


def _label(draw: ImageDraw.ImageDraw, rect: tuple[float, ...], text: str, rgb: tuple[int, int, int],
           font: ImageFont.ImageFont) -> None:
    draw.rectangle(rect, fill=rgb)
    ink = (0, 0, 0) if sum(rgb) > 380 else (255, 255, 255)
    draw.text((rect[0] + 2, rect[1] + 2), text, fill=ink, font=font, anchor="lt")


def _banner(image: Image.Image, text: str, font: ImageFont.ImageFont) -> None:
    """A dark strip along the bottom edge saying what was left out."""
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = font.getbbox(text)
    y = image.height - (bottom - top) - 6
    draw.rectangle((0, y, min(right - left + 8, image.width), image.height), fill=(0, 0, 0))
    draw.text((4, y + 3), text, fill=(255, 255, 255), font=font, anchor="lt")


def _instances(image, instances, names, skeleton, labels=20):
    """Masks, boxes and "name score" labels ("name #track score" on tracked video frames) of the
    `labels` best instances; the rest counted."""
    ranked = sorted(instances, key=lambda inst: -inst["score"])
    shown = ranked[:labels]
    for inst in reversed(shown):  # the best instance's mask ends up on top
        _overlay(image, decode_mask(inst["segmentation"]), color(inst["category_id"]))
    draw, font = ImageDraw.Draw(image), _font(image.size)
    placer = LabelPlacer(image.size, font)
    for inst in shown:
        x, y, w, h = inst["bbox"]
        draw.rectangle([x, y, x + w, y + h], outline=color(inst["category_id"]), width=2)
    for inst in shown:  # after every box, so no outline crosses a label
        track = f" #{inst['track_id']}" if inst.get("track_id") is not None else ""  # a video frame's track
        text = f"{names.get(inst['category_id'], inst['category_id'])}{track} {inst['score']:.2f}"
        rect = placer.place(inst["bbox"], text)
        if rect:
            _label(draw, rect, text, color(inst["category_id"]), font)
    caption = f"{len(instances)}"
    if len(ranked) > len(shown):
        _banner(image, f"top {len(shown)} of {len(ranked)} by score; {len(ranked) - len(shown)} more below "
                       f"{shown[-1]['score']:.2f} not drawn", font)
        caption += f" (top {len(shown)} drawn)"
    return image, caption


def _panoptic(image, segments, names, skeleton, labels=20):
    """Every segment in colour; names on the `labels` largest, placed without overlap."""
    for seg in segments:
        _overlay(image, decode_mask(seg["segmentation"]), color(seg["category_id"]), alpha=0.55)
    draw, font = ImageDraw.Draw(image), _font(image.size)
    placer = LabelPlacer(image.size, font)
    largest = sorted(segments, key=lambda seg: -seg["area"])[:labels]
    for seg in largest:
        x, y, w, h = seg["bbox"]
        text = str(names.get(seg["category_id"], seg["category_id"]))
        rect = placer.place((x + w / 2, y + h / 2, 0, 0), text)
        if rect:
            _label(draw, rect, text, color(seg["category_id"]), font)
    caption = f"{len(segments)}"
    if len(segments) > len(largest):
        _banner(image, f"names on the {len(largest)} largest of {len(segments)} segments", font)
        caption += f" (top {len(largest)} named)"
    return image, caption


def _keypoints(image, people, names, skeleton, labels=20):
    draw = ImageDraw.Draw(image)
    for person in people:
        points = np.asarray(person["keypoints"], float).reshape(-1, 3)[:, :2] + 0.5
        x, y, w, h = person["bbox"]
        draw.rectangle([x, y, x + w, y + h], outline=(255, 255, 255), width=1)
        for a, b in skeleton:
            draw.line([tuple(points[a - 1]), tuple(points[b - 1])], fill=color(a * 31 + b), width=2)
        for k, (px, py) in enumerate(points):
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color(k))
    return image, f"{len(people)}"


def _densepose(image, people, names, skeleton, labels=20):
    for person in sorted(people, key=lambda p: p["score"]):
        iuv = decode_iuv(person["iuv_png"])
        x, y, w, h = (int(round(v)) for v in person["bbox"])
        parts = np.zeros((*iuv.shape[1:], 4), np.uint8)
        for part in np.unique(iuv[0]):
            if part:
                parts[iuv[0] == part] = color(int(part) + 1000) + (150,)
        chart = Image.fromarray(parts).resize((max(w, 1), max(h, 1)), Image.Resampling.NEAREST)
        image.paste(chart, (x, y), chart)
    return image, f"{len(people)}"


def _names(categories: dict[str, Any]) -> dict[int, str]:
    return {c["id"]: c["name"] for table in categories.values() for key in ("things", "stuff") for c in table.get(key, [])}


def _index(cells, results: Results) -> str:
    rows = []
    for row, panels in cells:
        caption = html.escape(row["image_uri"])
        if row["error"] is not None:
            rows.append(f'<div class="cell err"><p>{caption}</p><p class="e">{html.escape(row["error"])}</p></div>')
            continue
        figures = "".join(
            f'<figure><a href="{name}"><img src="{name}" loading="lazy"></a>'
            f"<figcaption>{column}: {html.escape(note)}</figcaption></figure>" for column, name, note in panels)
        review = row.get("review")
        if review:
            priority = "-" if review["review_priority"] is None else f"{review['review_priority']:.4f}"
            caption += f"<br>review priority {priority}: {html.escape(review['reason'])}"
        rows.append(f'<div class="cell"><p>{caption} ({row["width"]}×{row["height"]})</p>{figures}</div>')
    summary = results.run.get("images", {})
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>batchseg run</title><style>
body{{font-family:sans-serif;margin:1em;background:#f4f4f4}} .cell{{background:#fff;margin:.5em 0;padding:.5em}}
figure{{display:inline-block;margin:.3em}} img{{max-width:360px;max-height:300px}} .e{{color:#b00}}
figcaption{{font-size:.8em;color:#555}}
</style></head><body>
<h1>batchseg run</h1><p>{html.escape(results.uri)} — images in {summary.get("in", "?")},
annotated {summary.get("annotated", "?")}, failed {summary.get("failed", "?")}; showing {len(cells)}</p>
{"".join(rows)}
</body></html>
"""

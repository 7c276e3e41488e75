"""Overlay images and an index.html contact sheet, to eyeball a run.

For each of the first `limit` rows and each task column it has, DEST/IMAGE_ID_COLUMN.jpg shows
the upright image (EXIF applied, as the annotations are) with: instance masks, boxes and
"name score" labels; panoptic segments in colour with their names; keypoints with the
skeleton; DensePose part index (I) over each person's box, U and V as small side panels.
Failed rows appear in the sheet with their error.
"""

from __future__ import annotations

import html
import io
import zlib
from typing import Any

import fsspec
import numpy as np
from PIL import Image, ImageDraw

from batchseg.config import StorageConfig
from batchseg.encoding import decode_iuv, decode_mask
from batchseg.imaging import decode_rgb
from batchseg.results import Results
from batchseg.sources import split_member
from batchseg.tasks import TASK_TABLE

COLUMNS = [task.column for task in TASK_TABLE.values()]


def color(key: int) -> tuple[int, int, int]:
    """A stable, saturated colour per category id / part index."""
    h = zlib.crc32(str(key).encode())
    rgb = np.array([h & 255, (h >> 8) & 255, (h >> 16) & 255], float)
    rgb = 60 + 195 * (rgb - rgb.min()) / max(np.ptp(rgb), 1)
    return tuple(int(v) for v in rgb)


def render(results: Results, dest: str, limit: int = 100, storage: StorageConfig | None = None) -> int:
    storage = storage or StorageConfig()
    names = _names(results.categories)
    skeleton = results.categories.get("keypoint", {}).get("skeleton", [])
    cells = []
    count = 0
    for row in results.rows(["image_id", "image_uri", "width", "height", "error", *COLUMNS]):
        if count >= limit:
            break
        count += 1
        if row["error"] is not None:
            cells.append((row, []))
            continue
        rgb = _load(row["image_uri"], storage)
        panels = []
        for column in COLUMNS:
            if row.get(column) is None:
                continue
            image = Image.fromarray(rgb.copy())
            drawn = {"instances": _instances, "panoptic": _panoptic, "keypoints": _keypoints,
                     "densepose": _densepose}[column](image, row[column], names, skeleton)
            name = f"{row['image_id']}_{column}.jpg"
            buf = io.BytesIO()
            drawn.convert("RGB").save(buf, format="JPEG", quality=90)
            with fsspec.open(f"{dest.rstrip('/')}/{name}", "wb", **storage.options(dest)) as f:
                f.write(buf.getvalue())
            panels.append((column, name, len(row[column])))
        cells.append((row, panels))
    with fsspec.open(f"{dest.rstrip('/')}/index.html", "w", **storage.options(dest)) as f:
        f.write(_index(cells, results))
    return count


def _load(uri: str, storage: StorageConfig) -> np.ndarray:
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


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, rgb: tuple[int, int, int]) -> None:
    x, y = xy
    box = draw.textbbox((x, y), text)
    draw.rectangle(box, fill=rgb)
    draw.text((x, y), text, fill=(0, 0, 0))


def _instances(image, instances, names, skeleton):
    for inst in instances:
        _overlay(image, decode_mask(inst["segmentation"]), color(inst["category_id"]))
    draw = ImageDraw.Draw(image)
    for inst in instances:
        rgb = color(inst["category_id"])
        x, y, w, h = inst["bbox"]
        draw.rectangle([x, y, x + w, y + h], outline=rgb, width=2)
        _label(draw, (x, max(y - 11, 0)), f"{names.get(inst['category_id'], inst['category_id'])} {inst['score']:.2f}", rgb)
    return image


def _panoptic(image, segments, names, skeleton):
    for seg in segments:
        _overlay(image, decode_mask(seg["segmentation"]), color(seg["category_id"]), alpha=0.55)
    draw = ImageDraw.Draw(image)
    for seg in segments:
        x, y, w, h = seg["bbox"]
        _label(draw, (x + w / 2, y + h / 2), str(names.get(seg["category_id"], seg["category_id"])), color(seg["category_id"]))
    return image


def _keypoints(image, people, names, skeleton):
    draw = ImageDraw.Draw(image)
    for person in people:
        points = np.asarray(person["keypoints"], float).reshape(-1, 3)[:, :2] + 0.5
        x, y, w, h = person["bbox"]
        draw.rectangle([x, y, x + w, y + h], outline=(255, 255, 255), width=1)
        for a, b in skeleton:
            draw.line([tuple(points[a - 1]), tuple(points[b - 1])], fill=color(a * 31 + b), width=2)
        for k, (px, py) in enumerate(points):
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color(k))
    return image


def _densepose(image, people, names, skeleton):
    for person in sorted(people, key=lambda p: p["score"]):
        iuv = decode_iuv(person["iuv_png"])
        x, y, w, h = (int(round(v)) for v in person["bbox"])
        parts = np.zeros((*iuv.shape[1:], 4), np.uint8)
        for part in np.unique(iuv[0]):
            if part:
                parts[iuv[0] == part] = color(int(part) + 1000) + (150,)
        chart = Image.fromarray(parts).resize((max(w, 1), max(h, 1)), Image.Resampling.NEAREST)
        image.paste(chart, (x, y), chart)
    return image


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
            f"<figcaption>{column}: {n}</figcaption></figure>" for column, name, n in panels)
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

"""Sample images with known ground truth, for the embedded demo and the tests.

Each good image holds flat shapes in pure colours on gray; the colour names the COCO category
(SHAPE_COLORS), so a colour-keyed segmenter recovers the exact masks. Lossless formats carry
the shapes; the odd-but-valid set covers EXIF rotation, grayscale, 16-bit, RGBA, palette,
CMYK and extreme aspect ratios. `bad=True` adds files that must become error rows.
`scenes=N` adds N random scenes (shapes/scene_NNNNN.png, seeded) for training and held-out AP.

    python -m batchseg.samples DEST [--bad] [--scenes N]   # DEST/images/... and DEST/ground_truth.json
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from batchseg.rows.encoding import encode_mask

BACKGROUND = (128, 128, 128)
SHAPE_COLORS = {  # pure colour -> (COCO category id, name)
    (255, 0, 0): (1, "person"),
    (0, 255, 0): (3, "car"),
    (0, 0, 255): (18, "dog"),
    (255, 255, 0): (44, "bottle"),
}


def _canvas(h: int, w: int, shapes: list[tuple[tuple[int, int, int], str, tuple[int, int, int, int]]]):
    """Draw rectangles/ellipses (colour, kind, (y0, x0, y1, x1)); later shapes occlude earlier ones."""
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = BACKGROUND
    yy, xx = np.mgrid[0:h, 0:w]
    for color, kind, (y0, x0, y1, x1) in shapes:
        if kind == "rect":
            inside = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        else:
            cy, cx, ry, rx = (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        rgb[inside] = color
    return rgb


def _scenes() -> dict[str, np.ndarray]:
    red, green, blue, yellow = SHAPE_COLORS
    return {
        "street/scene_a.png": _canvas(240, 320, [(red, "ellipse", (40, 30, 200, 110)), (green, "rect", (120, 150, 220, 300))]),
        "street/scene_b.PNG": _canvas(181, 257, [(blue, "ellipse", (20, 20, 90, 140)), (yellow, "rect", (100, 200, 170, 240))]),
        "park/scene_c.bmp": _canvas(150, 200, [(red, "rect", (10, 10, 140, 60)), (blue, "rect", (30, 80, 90, 190))]),
        "park/scene_d.tiff": _canvas(128, 96, [(green, "ellipse", (10, 10, 118, 86))]),
        "park/nested/scene_e.webp": _canvas(100, 160, [(yellow, "ellipse", (5, 5, 95, 75)), (red, "rect", (20, 90, 80, 150))]),
        "odd/wide_strip.png": _canvas(12, 600, [(green, "rect", (2, 100, 10, 500))]),
        "odd/one_pixel.png": _canvas(1, 1, []),
        "odd/empty_scene.png": _canvas(64, 64, []),
    }


def random_scenes(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`count` scenes of 96..256 px a side, each with 1-3 shapes of distinct colours (one
    ground-truth instance per colour), 16 px or more a side, placed anywhere; same seed, same scenes."""
    rng = np.random.default_rng(seed)
    colors = list(SHAPE_COLORS)
    scenes = {}
    for i in range(count):
        h, w = (int(v) for v in rng.integers(96, 257, size=2))
        shapes = []
        for c in rng.choice(len(colors), size=int(rng.integers(1, 4)), replace=False):
            sh, sw = (int(rng.integers(16, max(17, side * 2 // 3))) for side in (h, w))
            y0, x0 = int(rng.integers(0, h - sh + 1)), int(rng.integers(0, w - sw + 1))
            shapes.append((colors[c], str(rng.choice(["rect", "ellipse"])), (y0, x0, y0 + sh, x0 + sw)))
        scenes[f"shapes/scene_{i:05d}.png"] = _canvas(h, w, shapes)
    return scenes


def _ground_truth_entry(image_id: int, name: str, rgb: np.ndarray) -> tuple[dict, list[dict]]:
    h, w = rgb.shape[:2]
    anns = []
    for color, (category_id, _) in SHAPE_COLORS.items():
        mask = np.all(rgb == color, axis=-1)
        if mask.any():
            ys, xs = np.nonzero(mask)
            anns.append({
                "image_id": image_id, "category_id": category_id, "iscrowd": 0,
                "segmentation": encode_mask(mask), "area": int(mask.sum()),
                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
            })
    return {"id": image_id, "file_name": name, "height": h, "width": w}, anns


def _save(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".webp": {"lossless": True}}.get(path.suffix.lower(), {})
    Image.fromarray(rgb).save(path, **fmt)


def _exif_rotated_png(upright: np.ndarray) -> bytes:
    """Stored pixels rotated; EXIF Orientation=6 tells a viewer to rotate 90° clockwise."""
    stored = np.rot90(upright, k=1)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(buf, format="PNG", exif=exif)
    return buf.getvalue()


def _odd_valid(dest: Path) -> list[str]:
    """Valid images in unusual encodings; no ground truth (they are lossy or recoloured)."""
    gradient = np.tile(np.linspace(0, 255, 97, dtype=np.uint8), (61, 1))
    files = {
        "odd/gray.jpg": Image.fromarray(gradient, "L"),
        "odd/gray16.png": Image.fromarray(gradient.astype(np.uint16) * 257),
        "odd/rgba.png": Image.fromarray(np.dstack([np.dstack([gradient] * 3), gradient]), "RGBA"),
        "odd/palette.png": Image.fromarray(gradient, "L").convert("P"),
        "odd/cmyk.jpg": Image.fromarray(np.dstack([gradient] * 3), "RGB").convert("CMYK"),
        "odd/photo.JPEG": Image.fromarray(_canvas(90, 120, [((255, 0, 0), "ellipse", (10, 10, 80, 60))])),
    }
    for name, image in files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(dest / name)
    return list(files)


def _bad(dest: Path) -> list[str]:
    """Files with image names that cannot be annotated."""
    good = io.BytesIO()
    Image.fromarray(_canvas(40, 40, [])).save(good, format="JPEG")
    png = io.BytesIO()
    Image.fromarray(_canvas(8, 8, [])).save(png, format="PNG")
    files = {
        "bad/empty.jpg": b"",
        "bad/truncated.jpg": good.getvalue()[: len(good.getvalue()) // 2],
        "bad/not_an_image.png": b"<html>this is not an image</html>\n",
        "bad/bomb.png": _with_ihdr_size(png.getvalue(), 40000, 40000),
    }
    for name, data in files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)
    return list(files)


def _with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (1.6 GP: PIL's bomb check must fire)."""
    ihdr = png[16:29]
    ihdr = struct.pack(">II", width, height) + ihdr[8:]
    return png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]


def write_samples(dest: str | Path, bad: bool = False, shard: bool = True, scenes: int = 0, seed: int = 0) -> dict[str, Any]:
    """Write sample images under DEST/images and COCO ground truth to DEST/ground_truth.json.

    Returns {"ground_truth": COCO dict (file_name relative to DEST/images), "images": all image
    names (including tar members as "SHARD/member"), "bad": names expected to fail}.
    """
    dest = Path(dest)
    root = dest / "images"
    gt: dict[str, Any] = {
        "images": [], "annotations": [],
        "categories": [{"id": i, "name": n} for i, n in sorted(SHAPE_COLORS.values())],
    }
    names = []
    for image_id, (name, rgb) in enumerate({**_scenes(), **random_scenes(scenes, seed)}.items(), start=1):
        _save(root / name, rgb)
        names.append(name)
        entry, anns = _ground_truth_entry(image_id, name, rgb)
        gt["images"].append(entry)
        gt["annotations"] += anns
    rotated_upright = _canvas(120, 200, [(list(SHAPE_COLORS)[0], "rect", (10, 20, 60, 180)), (list(SHAPE_COLORS)[2], "ellipse", (70, 10, 115, 90))])
    (root / "odd").mkdir(parents=True, exist_ok=True)
    (root / "odd/rotated_exif6.png").write_bytes(_exif_rotated_png(rotated_upright))
    entry, anns = _ground_truth_entry(len(gt["images"]) + 1, "odd/rotated_exif6.png", rotated_upright)
    gt["images"].append(entry)
    gt["annotations"] += anns
    names.append("odd/rotated_exif6.png")
    names += _odd_valid(root)
    if shard:
        names += _write_shard(root / "shards/shard-000000.tar", gt)
    bad_names = _bad(root) if bad else []
    (root / "notes.txt").write_text("not an image: must be ignored by the listing\n")
    for i, ann in enumerate(gt["annotations"], start=1):
        ann["id"] = i
    (dest / "ground_truth.json").write_text(json.dumps(gt))
    return {"ground_truth": gt, "images": names + bad_names, "bad": bad_names}


def _write_shard(path: Path, gt: dict[str, Any]) -> list[str]:
    """A WebDataset-style tar: two scenes as PNG members plus a JSON sidecar (ignored)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scenes = {
        "000001.png": _canvas(80, 100, [((0, 255, 0), "rect", (10, 10, 70, 50))]),
        "000002.png": _canvas(70, 90, [((0, 0, 255), "ellipse", (5, 30, 65, 85))]),
    }
    names = []
    with tarfile.open(path, "w") as tar:
        for member, rgb in scenes.items():
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="PNG")
            for name, data in ((member, buf.getvalue()), (member.replace(".png", ".json"), b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            shard_name = f"shards/{path.name}/{member}"
            entry, anns = _ground_truth_entry(len(gt["images"]) + 1, shard_name, rgb)
            gt["images"].append(entry)
            gt["annotations"] += anns
            names.append(shard_name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description="write sample images with ground truth")
    parser.add_argument("dest")
    parser.add_argument("--bad", action="store_true", help="also write files that must become error rows")
    parser.add_argument("--scenes", type=int, default=0, metavar="N", help="also write N random scenes with ground truth")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random scenes")
    args = parser.parse_args()
    made = write_samples(args.dest, bad=args.bad, scenes=args.scenes, seed=args.seed)
    print(f"wrote {len(made['images'])} images to {Path(args.dest) / 'images'}")


if __name__ == "__main__":
    main()

"""Decode image bytes into an upright 8-bit RGB array.

EXIF orientation is applied (so width/height are those a viewer shows), and every PIL mode a
camera, scanner or editor writes is brought to RGB: grayscale, 16-bit grayscale (scaled, not
clipped), palette, alpha (dropped, as detectron2's read_image does), CMYK.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from batchseg.errors import one_line

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class DecodeError(ValueError):
    """The bytes are not an image we can annotate; the message is one line."""


def decode_rgb(data: bytes, max_pixels: int) -> np.ndarray:
    """bytes -> (H, W, 3) uint8 RGB, upright.

    Raises DecodeError for empty, truncated, non-image and oversized (decompression bomb) input.
    """
    if not data:
        raise DecodeError("empty file")
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own check, at open, reads only the header
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # decodes the pixels; truncation surfaces here
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when already upright
            return _to_rgb(image)
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised content)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DecodeError(
            f"image has more than max_image_pixels={max_pixels} pixels (possible decompression bomb)"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"cannot decode image: {one_line(e)}") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image, dtype=np.uint32)
        top = 65535 if image.mode != "I" or wide.max(initial=0) > 255 else 255
        gray = (wide.astype(np.float64) * (255.0 / top)).round().clip(0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        gray = np.asarray(image, dtype=np.float32)
        return np.repeat(gray.clip(0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def resize_shortest_edge(rgb: np.ndarray, short: int, long_cap: int) -> np.ndarray:
    """Scale (H, W, C) uint8 so the short side is `short` px, the long side at most `long_cap`.

    Bilinear, the same rule (and rounding) as detectron2's ResizeShortestEdge at test time.
    """
    h, w = rgb.shape[:2]
    scale = short / min(h, w)
    if max(h, w) * scale > long_cap:
        scale = long_cap / max(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    if (new_h, new_w) == (h, w):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BILINEAR))


@dataclass(frozen=True)
class ShortestEdge:
    """A preprocessor: resize_shortest_edge with fixed sizes (equal instances share their output)."""

    short: int
    long_cap: int

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return resize_shortest_edge(rgb, self.short, self.long_cap)

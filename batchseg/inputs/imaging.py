"""Decode image bytes into an upright 8-bit RGB array.

EXIF orientation is applied (so width/height are those a viewer shows), and every PIL mode a
camera, scanner or editor writes is brought to RGB: grayscale, 16-bit grayscale (scaled, not
clipped), palette, alpha (dropped, as detectron2's read_image does), CMYK.

Optionally (decode_on_device), the JPEGs a GPU decodes as PIL does are decoded there instead:
`device_jpeg_header` picks them from their header on the CPU, `decode_jpegs` decodes a batch of
them on the device, `orient` applies the EXIF orientation that PIL read, and each
preprocessor's `on_device` resizes the result.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps

from batchseg.errors import one_line

if TYPE_CHECKING:
    import torch

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class DecodeError(ValueError):
    """The bytes are not an image we can annotate; the message is one line."""


def decode_rgb(data: bytes, max_pixels: int) -> np.ndarray:
    """bytes -> (H, W, 3) uint8 RGB, upright: decode_image's pixels as an array."""
    return np.asarray(decode_image(data, max_pixels))


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """bytes -> an upright PIL image of mode RGB, (W, H) pixels.

    Kept in PIL so that a preprocessor that resizes (ShortestEdge.from_image) copies the pixels
    into numpy once, after the resize: each copy out of PIL holds the GIL, and the decode
    threads of a CPU actor overlap only outside it.
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


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image, dtype=np.uint32)
        top = 65535 if image.mode != "I" or wide.max(initial=0) > 255 else 255
        gray = (wide.astype(np.float64) * (255.0 / top)).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode == "F":
        gray = np.asarray(image, dtype=np.float32)
        return Image.fromarray(np.repeat(gray.clip(0, 255).astype(np.uint8)[:, :, None], 3, axis=2))
    return image if image.mode == "RGB" else image.convert("RGB")


def model_inputs(image: Image.Image | np.ndarray, preprocessors: list[Callable[[np.ndarray], np.ndarray]]
                 ) -> list[np.ndarray]:
    """One upright RGB image (a PIL image, or an (H, W, 3) uint8 array) -> each preprocessor's
    model input. A preprocessor with `from_image` (ShortestEdge) takes the PIL image, the others
    the (H, W, 3) array; each form is made at most once."""
    array = image if isinstance(image, np.ndarray) else None
    pil = None if array is not None else image
    out = []
    for prep in preprocessors:
        if hasattr(prep, "from_image"):
            pil = Image.fromarray(array) if pil is None else pil
            out.append(prep.from_image(pil))
        else:
            array = np.asarray(pil) if array is None else array
            out.append(prep(array))
    return out


def shortest_edge_size(h: int, w: int, short: int, long_cap: int) -> tuple[int, int]:
    """(h, w) -> (new_h, new_w), pixels: the short side `short`, the long side at most
    `long_cap`; the same rule (and rounding) as detectron2's ResizeShortestEdge at test time."""
    scale = short / min(h, w)
    if max(h, w) * scale > long_cap:
        scale = long_cap / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_shortest_edge(rgb: np.ndarray, short: int, long_cap: int) -> np.ndarray:
    """Scale (H, W, C) uint8 to shortest_edge_size, bilinear (PIL)."""
    h, w = rgb.shape[:2]
    if shortest_edge_size(h, w, short, long_cap) == (h, w):
        return rgb
    return resize_image(Image.fromarray(rgb), short, long_cap)


def resize_image(image: Image.Image, short: int, long_cap: int) -> np.ndarray:
    """A PIL image of (W, H) pixels -> (new_h, new_w, C) uint8 at shortest_edge_size, bilinear
    (PIL): the pixels resize_shortest_edge gives for the same image as an array."""
    new_h, new_w = shortest_edge_size(image.height, image.width, short, long_cap)
    if (new_h, new_w) != (image.height, image.width):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    return np.asarray(image)


def resize_tensor(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) uint8 tensor -> (C, size[0], size[1]) uint8, on its device.

    Bilinear with antialias, the closest torch has to PIL's bilinear (which widens its filter
    when shrinking): the same size, pixels within a few levels, not byte-identical.
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)


@dataclass(frozen=True)
class ShortestEdge:
    """A preprocessor: resize_shortest_edge with fixed sizes (equal instances share their output)."""

    short: int
    long_cap: int

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return resize_shortest_edge(rgb, self.short, self.long_cap)

    def from_image(self, image: Image.Image) -> np.ndarray:
        """The same from a PIL image (decode_image's): one copy into numpy, after the resize."""
        return resize_image(image, self.short, self.long_cap)

    def on_device(self, rgb: torch.Tensor) -> torch.Tensor:
        """The same on a (3, H, W) uint8 RGB tensor, on its device (resize_tensor)."""
        return resize_tensor(rgb, shortest_edge_size(*rgb.shape[-2:], self.short, self.long_cap))


@dataclass(frozen=True)
class JpegHeader:
    """A JPEG the device decodes as PIL does, as its header describes it."""

    height: int  # upright (EXIF orientation applied), pixels
    width: int
    orientation: int  # EXIF orientation, 1..8 (1: stored upright); what ImageOps.exif_transpose reads


_JPEG_EOI = b"\xff\xd9"
_SIDEWAYS = (5, 6, 7, 8)  # orientations that swap height and width


def device_jpeg_header(data: bytes, max_pixels: int) -> JpegHeader | None:
    """The header of a JPEG that decode_jpegs may take, else None: decode it with decode_rgb.

    Parses the header only (PIL opens lazily). Taken: a non-progressive 8-bit JPEG (format
    JPEG, not MPO), grayscale or YCbCr, within max_pixels, ending at its EOI marker. Left to the
    CPU: progressive, CMYK/YCCK, RGB-coded (Adobe transform 0), 12-bit, a file that does not end
    at EOI (truncated, or data appended), and anything PIL cannot open, so that decode_rgb
    decodes it or raises today's error. What the header cannot tell (a corrupt scan, arithmetic
    coding) is left to decode_jpegs, which returns None for what the device fails to decode.
    """
    if not data.endswith(_JPEG_EOI):
        return None
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
                if (image.format != "JPEG" or image.mode not in ("L", "RGB") or image.info.get("progressive")
                        or (image.mode == "RGB" and image.info.get("adobe_transform") == 0)):
                    return None
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
                orientation = int(orientation) if orientation in _ORIENT else 1  # as exif_transpose reads it
                w, h = image.size
    except Exception:  # whatever PIL refuses, decode_rgb refuses with today's message
        return None
    return JpegHeader(*((w, h) if orientation in _SIDEWAYS else (h, w)), orientation)


def decode_jpegs(data: list[bytes], device: torch.device | str) -> list[torch.Tensor | None]:
    """JPEG bytes -> (3, H, W) uint8 RGB tensors on `device`, as stored (no EXIF orientation).

    One batched torchvision.io.decode_jpeg (nvJPEG on CUDA, libjpeg on CPU). If the batch
    fails, each file is decoded alone; None for a file the device cannot decode.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]

    def decode(batch: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs for TorchCodec's
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)

    try:
        return list(decode(encoded))
    except Exception:  # nvJPEG fails a whole batch for one bad file
        out: list[torch.Tensor | None] = []
        for one in encoded:
            try:
                out += decode([one])
            except Exception:
                out.append(None)
        return out


_ORIENT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    # EXIF orientation -> ImageOps.exif_transpose's transpose, on the last two (H, W) dims
    1: lambda t: t,
    2: lambda t: t.flip(-1),  # FLIP_LEFT_RIGHT
    3: lambda t: t.flip(-2, -1),  # ROTATE_180
    4: lambda t: t.flip(-2),  # FLIP_TOP_BOTTOM
    5: lambda t: t.transpose(-2, -1),  # TRANSPOSE
    6: lambda t: t.rot90(-1, (-2, -1)),  # ROTATE_270 (counter-clockwise: a quarter turn clockwise)
    7: lambda t: t.transpose(-2, -1).flip(-2, -1),  # TRANSVERSE
    8: lambda t: t.rot90(1, (-2, -1)),  # ROTATE_90
}


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) tensor as stored -> upright, as ImageOps.exif_transpose turns it for
    `orientation` (JpegHeader.orientation); a view where it can be."""
    return _ORIENT[orientation](image)

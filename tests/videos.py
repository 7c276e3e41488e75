"""Test videos made with PyAV: coloured shapes (batchseg.samples.SHAPE_COLORS) moving over the
samples' background, encoded losslessly (H.264 RGB, VP9 RGB) so the colour-key oracle
(tests/oracle.py) finds every shape exactly in every frame.

Shapes: red moves right, green moves down, blue stands still; yellow appears halfway.
"""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import numpy as np

from batchseg.samples import BACKGROUND, SHAPE_COLORS

RED, GREEN, BLUE, YELLOW = SHAPE_COLORS
CODECS = {".mp4": ("libx264rgb", "rgb24", {"qp": "0"}), ".webm": ("libvpx-vp9", "gbrp", {"lossless": "1"}),
          ".mkv": ("libx264rgb", "rgb24", {"qp": "0"}), ".mov": ("libx264rgb", "rgb24", {"qp": "0"})}


def picture(i: int, n: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frame i of n: (height, width, 3) uint8; the shapes scale with the frame (64 x 48: 1)."""
    f = max(1, min(width // 64, height // 48))
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = BACKGROUND
    x = 2 * f + (width - 20 * f) * i // max(1, n - 1)
    rgb[2 * f:12 * f, x:x + 12 * f] = RED
    y = 14 * f + (height - 30 * f) * i // max(1, n - 1)
    rgb[y:y + 10 * f, 40 * f:52 * f] = GREEN
    rgb[height - 10 * f:height - 2 * f, 2 * f:10 * f] = BLUE
    if i >= n // 2:
        rgb[height - 10 * f:height - 2 * f, width - 10 * f:width - 2 * f] = YELLOW
    return rgb


def make_video(path: Path, frames: int = 30, rate: int = 10, gop: int = 10, times_ms: list[int] | None = None,
               height: int = 48, width: int = 64) -> Path:
    """Write `frames` frames at `rate` fps (or at `times_ms`: a variable frame rate), a
    keyframe every `gop` frames; the codec follows the suffix (CODECS)."""
    import av

    codec, pix_fmt, options = CODECS[path.suffix.lower()]
    container = av.open(str(path), "w", options={"movflags": "faststart"} if path.suffix == ".mp4" else {})
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    stream.options = {**options, "g": str(gop), "keyint_min": str(gop)} if codec == "libx264rgb" else {**options, "g": str(gop)}
    if times_ms is not None:
        stream.time_base = Fraction(1, 1000)
    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(picture(i, frames, height, width), format="rgb24")
        if times_ms is not None:
            frame.pts, frame.time_base = times_ms[i], Fraction(1, 1000)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def rotate_mp4(path: Path, out: Path) -> Path:
    """A copy of an .mp4 whose track header says "show turned 90 degrees clockwise" (the
    display matrix a phone held upright writes; ffprobe: rotation -90)."""
    data = path.read_bytes()
    at = data.index(b"tkhd")
    assert data[at + 4] == 0, "version 0 tkhd expected"
    matrix = at + 8 + 5 * 4 + 8 + 4 * 2  # after version/flags, times, track id, duration, reserved, layer...
    turned = struct.pack(">9i", 0, 1 << 16, 0, -(1 << 16), 0, 0, 0, 0, 1 << 30)
    out.write_bytes(data[:matrix] + turned + data[matrix + 36:])
    return out


def listing(path: Path) -> list[tuple[int, float, bool]]:
    """PyAV's own listing: (index, pts seconds, keyframe) of every frame, presentation order."""
    import av

    with av.open(str(path)) as container:
        return [(i, float(f.pts * f.time_base), bool(f.key_frame)) for i, f in enumerate(container.decode(video=0))]

"""Frames from video files (PyAV, FFmpeg in its wheel): segments, sampling, rotation.

A video is read in segments, [start, end) spans of presentation time that different read
tasks decode (`plan_segments`): each seeks to the keyframe at or before its start and decodes
until the first frame at or past its end, so a video is streamed, never held whole, and a long
one spreads over many tasks. A frame belongs to the segment its presentation time falls in.

Sampling (config.VideoConfig) works on presentation times, so variable frame rates need no
frame counting:
- fps: the frames on screen at start, start + 1/fps, start + 2/fps, ... (a frame shown at
  several of those times is taken once);
- every_n: frames whose frame_index is a multiple of n;
- keyframes_only: keyframes (the decoder skips the others);
- none of them: every frame; max_frames, start and end bound any of these.
`frame_index` counts frames in presentation order from the video's first frame (by packets,
so frames the decoder skips count too). A segment that starts at the video's beginning counts
exactly; a later one starts its count at the keyframe it seeks to, placed by its time x the
stream's average rate (exact at a constant rate).

The display matrix (a phone's rotation metadata) is applied, as EXIF orientation is for photos:
`Frame.rgb` is upright. A frame is named `VIDEO_URI#t=SECONDS` (3 decimals), which
`read_frame` opens again.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from batchseg.config import VideoConfig
from batchseg.errors import one_line
from batchseg.inputs.imaging import DecodeError
from batchseg.inputs.sources import open_object

_FRAME = re.compile(r"^(?P<video>.+)#t=(?P<t>\d+(?:\.\d+)?)$")
_END = math.inf


class VideoError(DecodeError):
    """A video that cannot be decoded (a one-line reason): an unsupported codec, no video
    stream, corrupt or truncated data. The frames read before it stay valid."""


@dataclass(frozen=True)
class Segment:
    """One read task's share of a video: frames with start <= pts_s < end (seconds)."""

    index: int
    count: int
    start: float
    end: float = _END


@dataclass(frozen=True)
class Frame:
    """One sampled frame: frame_index (presentation order), pts_s (seconds), rgb (h, w, 3)
    uint8, upright."""

    index: int
    pts_s: float
    rgb: np.ndarray


def frame_uri(video_uri: str, pts_s: float) -> str:
    """The name of a frame: `VIDEO_URI#t=12.500`."""
    return f"{video_uri}#t={pts_s:.3f}"


def split_frame_uri(uri: str) -> tuple[str, float] | None:
    """`VIDEO_URI#t=12.500` -> (VIDEO_URI, 12.5); None for any other URI."""
    match = _FRAME.match(uri)
    return (match["video"], float(match["t"])) if match else None


def plan_segments(uri: str, storage_options: dict[str, Any], cfg: VideoConfig) -> list[Segment]:
    """Cut the sampled span of a video into segments of cfg.segment_s seconds, from its
    container header (a few small reads). The last segment runs to the end of the stream,
    whatever the header says. A video whose header cannot be read, whose codec has no
    decoder, or whose duration is unknown is one segment: its read then reports the error once.
    keyframes_only with max_frames is one segment too (the count needs every earlier keyframe).
    """
    whole = [Segment(0, 1, float(cfg.start))]
    if cfg.keyframes_only and cfg.max_frames:
        return whole
    try:
        with _open(uri, storage_options) as container:
            stream = _video_stream(container, uri)
            duration = _duration(container, stream)
    except Exception:
        return whole
    stop = min(duration or _END, cfg.end or _END)
    if not math.isfinite(stop) or stop <= cfg.start:
        return whole
    if cfg.max_frames and cfg.fps:  # no frame is sampled past the max_frames-th sampling time
        stop = min(stop, cfg.start + cfg.max_frames / cfg.fps)
    n = max(1, math.ceil((stop - cfg.start) / cfg.segment_s - 1e-9))
    bounds = [cfg.start + i * cfg.segment_s for i in range(n)] + [_END]
    return [Segment(i, n, float(bounds[i]), bounds[i + 1]) for i in range(n)]


def read_segment(uri: str, storage_options: dict[str, Any], cfg: VideoConfig, segment: Segment) -> Iterator[Frame]:
    """Yield the sampled frames of `segment`, in presentation order.

    Raises VideoError (after yielding what decoded) for an unsupported codec, corrupt data, or
    a stream that ends before the duration its header states (a truncated file); the segment
    that holds the video's last decodable frame reports it, later segments are just empty.
    Storage errors pass through.
    """
    with _open(uri, storage_options) as container:
        stream = _video_stream(container, uri)
        codec = stream.codec_context
        if cfg.keyframes_only:
            codec.skip_frame = "NONKEY"
        tb, rate = stream.time_base, stream.average_rate or stream.guessed_rate or Fraction(30)
        t0 = Fraction(stream.start_time or 0) * tb
        lo = Fraction(str(max(segment.start, cfg.start)))
        ends = [Fraction(str(e)) for e in (segment.end, cfg.end) if e is not None and math.isfinite(e)]
        hi = min(ends) if ends else None
        sampler = _Sampler(cfg)
        counting = lo <= t0  # decoding from the first frame: count exactly
        offset, pending = None, None  # pending: (index, t, frame) awaiting the next frame's time (fps)
        packets = _Packets(container, stream)
        try:
            if lo > t0:
                container.seek(int(lo / tb), stream=stream, backward=True, any_frame=False)
            for t, frame in packets.frames():
                if offset is None:  # the first frame decoded: the count starts here
                    offset = 0 if counting else round((t - t0) * rate) - packets.before(t)
                index = offset + packets.before(t)
                if pending is not None and sampler.takes(*pending[:2], t):
                    yield _frame(*pending)
                pending = None
                if hi is not None and t >= hi:
                    return
                if t >= lo and sampler.wants(index, t, frame):
                    pending = (index, t, frame)
            if pending is not None and sampler.takes(*pending[:2], pending[1] + 1 / rate):  # the last frame
                yield _frame(*pending)
        except Exception as e:
            if isinstance(e, DecodeError) or not _is_decode_error(e):
                raise
            at = f" at {float(packets.last):.3f} s" if packets.last is not None else ""
            raise VideoError(f"cannot decode video{at}: {one_line(e)}") from None
        _check_complete(packets.last, lo, hi, _duration(container, stream), 1 / rate, segment)


def _check_complete(last: Fraction | None, lo: Fraction, hi: Fraction | None, duration: float | None,
                    frame_s: Fraction, segment: Segment) -> None:
    """Raise VideoError if the stream ended (at packet time `last`) before the duration its
    header states, within this segment [lo, hi); a segment entirely past the end is empty."""
    if not duration:
        return
    stop = min(Fraction(duration), hi) if hi is not None else Fraction(duration)
    if last is not None and last + 2 * frame_s >= stop:
        return
    if (last is None and segment.index > 0) or (last is not None and last < lo):
        return  # seeking past a truncated end lands before this segment: an earlier one reports
    ended = "holds no decodable frame" if last is None else f"ends at {float(last):.3f} s"
    raise VideoError(f"video {ended}, before the {duration:.3f} s its header states (truncated?)")


class _Packets:
    """A stream's frames in presentation order, decoded from its packets. Packets are counted
    as they are demuxed, frames skipped by the decoder (keyframes_only) included: `before(t)`
    is how many packet times below `t` were seen (one packet, one frame), `last` the latest."""

    def __init__(self, container: Any, stream: Any) -> None:
        self.container, self.stream, self.last = container, stream, None
        self._waiting: list[Fraction] = []  # a heap of packet times not yet below a frame's time
        self._below = 0

    def before(self, t: Fraction) -> int:
        """Packets seen with a time below `t`; frames come in time order, so `t` never falls."""
        while self._waiting and self._waiting[0] < t:
            heapq.heappop(self._waiting)
            self._below += 1
        return self._below

    def frames(self) -> Iterator[tuple[Fraction, Any]]:
        tb = self.stream.time_base
        for packet in self.container.demux(self.stream):
            if packet.pts is not None:
                t = Fraction(packet.pts) * tb
                self.last = t if self.last is None else max(self.last, t)
                heapq.heappush(self._waiting, t)
            for frame in packet.decode():
                if frame.pts is not None:
                    yield Fraction(frame.pts) * tb, frame


def read_frame(uri: str, storage_options: dict[str, Any]) -> np.ndarray:
    """The frame named `VIDEO_URI#t=SECONDS` again: (h, w, 3) uint8 RGB, upright, as the run
    annotated it (the frame whose pts_s rounds to SECONDS). Raises VideoError if there is none."""
    parts = split_frame_uri(uri)
    if parts is None:
        raise ValueError(f"not a frame URI (VIDEO_URI#t=SECONDS): {uri}")
    video, t = parts
    with _open(video, storage_options) as container:
        stream = _video_stream(container, video)
        tb = stream.time_base
        container.seek(int(Fraction(str(t)) / tb), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            pts = float(Fraction(frame.pts) * tb)
            if round(pts, 3) == round(t, 3):
                return _upright(frame)
            if pts > t + 0.0005:
                break
    raise VideoError(f"no frame at t={t:.3f} s in {video}")


class _Sampler:
    """Which decoded frames the config samples. `wants` picks candidates as they come;
    `takes` decides a candidate once the next frame's time is known (fps needs it)."""

    def __init__(self, cfg: VideoConfig) -> None:
        self.cfg = cfg
        self.start = Fraction(str(cfg.start))
        self.fps = Fraction(str(cfg.fps)) if cfg.fps else None
        self.kept = 0  # keyframes_only with max_frames: one segment, counted here

    def wants(self, index: int, t: Fraction, frame: Any) -> bool:
        cfg = self.cfg
        if cfg.every_n:
            return index % cfg.every_n == 0 and (not cfg.max_frames or index // cfg.every_n < cfg.max_frames)
        if cfg.keyframes_only:
            if not frame.key_frame or (cfg.max_frames and self.kept >= cfg.max_frames):
                return False
            self.kept += 1
            return True
        if self.fps is None:
            return not cfg.max_frames or index < cfg.max_frames
        return True

    def takes(self, index: int, t: Fraction, t_next: Fraction) -> bool:
        """fps: is a sampling time start + k/fps (k < max_frames) within [t, t_next), the
        time the frame is on screen (the last frame: one frame at the average rate)?"""
        if self.fps is None:
            return True
        k = math.ceil((t - self.start) * self.fps)
        if self.cfg.max_frames and k >= self.cfg.max_frames:
            return False
        return self.start + k / self.fps < t_next


def _frame(index: int, t: Fraction, frame: Any) -> Frame:
    return Frame(index, float(t), _upright(frame))


def _upright(frame: Any) -> np.ndarray:
    """(h, w, 3) uint8 RGB with the display matrix applied (rotation is counter-clockwise
    degrees, FFmpeg's sign: -90 means the picture is shown turned 90 degrees clockwise)."""
    rgb = frame.to_ndarray(format="rgb24")
    turns = round((frame.rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _open(uri: str, storage_options: dict[str, Any]):
    """An av container over the object; local files through FFmpeg's own I/O."""
    return _Opened(uri[len("file://"):] if uri.startswith("file://") else open_object(uri, storage_options))


class _Opened:
    """An av container (closing its file object too, if one was given); content that FFmpeg
    cannot open is a VideoError."""

    def __init__(self, source: Any) -> None:
        import av

        self.file = None if isinstance(source, str) else source
        try:
            self.container = av.open(source)
        except av.error.FFmpegError as e:
            self._close_file()
            raise VideoError(f"not a readable video: {one_line(e)}") from None
        except BaseException:
            self._close_file()
            raise

    def __enter__(self) -> Any:
        return self.container

    def __exit__(self, *exc: Any) -> None:
        self.container.close()
        self._close_file()

    def _close_file(self) -> None:
        if self.file is not None:
            self.file.close()


def _video_stream(container: Any, uri: str) -> Any:
    if not container.streams.video:
        raise VideoError("no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        tag = getattr(stream, "codec_tag", "") or "unknown"
        raise VideoError(f"unsupported video codec ({tag}): FFmpeg has no decoder for it")
    return stream


def _duration(container: Any, stream: Any) -> float | None:
    """Seconds the header states (the stream's, else the container's); None if unknown."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    return container.duration / 1e6 if container.duration else None


def _is_decode_error(e: Exception) -> bool:
    import av

    return isinstance(e, (av.error.FFmpegError, EOFError))

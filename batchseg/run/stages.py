"""The pipeline's stages as plain functions and one callable class; no Ray graph in here.

Each batch is a dict of equal-length numpy arrays (Ray Data's "numpy" batch format).
Columns grow as a row moves along:
  list      uri, size, version, is_shard, segment, segments, seg_start, seg_end
  read      uri, size, version, key, members, data (bytes), error, error_kind, shard, frame,
            pts, pixels (a video frame's (h, w, 3) uint8 RGB; (0, 0, 3) for other rows: a
            column of arrays apart from the bytes, so Ray Data keeps each column one type)
  decode    uri, size, version, key, members, shard, frame, pts, error, error_kind, height,
            width, image_0.. ((h, w, 3) uint8 model inputs); with decode_on_device also
            jpeg (bytes of a JPEG left to the actor's device, else b""), orientation
  annotate  -> pyarrow Table: schema.ROW plus `_key`, `_members` and `_shard` for the sink
`key` is the row's done key (batchseg.store.ledger). `members` is -1 for an image and, for a
marker row, what the marker waits for: a tar shard's marker (after its images) counts them; a
video segment's marker counts the frames it sent on; a video's marker counts its segments.
`shard` is the done key of the marker a row counts towards (0: none). A video is listed as one
row per segment (`segment` >= 0 of `segments`, [seg_start, seg_end) seconds); `frame` and `pts`
are a frame's frame_index and pts_s (-1 and NaN for other rows). A failure at any stage sets `error` and `error_kind` (batchseg.run.failures)
and the row rides along to the end; nothing is dropped.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from concurrent.futures import Executor, ThreadPoolExecutor
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from batchseg.run import failures, inflight
from batchseg.run import meter as run_meter
from batchseg.inputs import manifests, names, sources, video as videos
from batchseg.rows import review_priority
from batchseg.config import JobConfig, ModelConfig, StorageConfig, VideoConfig
from batchseg.errors import one_line
from batchseg.inputs.imaging import DecodeError, decode_image, decode_jpegs, device_jpeg_header, model_inputs, orient
from batchseg.store.ledger import DoneSet, done_key, done_keys_of
from batchseg.predictors.base import (
    Backend, ModelInput, Preprocessor, Result, backend_class, group_by_shape, preprocess_plan,
)
from batchseg.rows.schema import ROW, image_id
from batchseg.rows.tasks import TASK_TABLE, allowed_ids
from batchseg.predictors.weights import WeightsRef, fetch

log = logging.getLogger(__name__)
_NO_IMAGE = np.zeros((0, 0, 3), np.uint8)
READ_COLUMNS = ("uri", "size", "version", "key", "members", "data", "error", "error_kind", "shard", "frame", "pts",
                "pixels")
VIDEO_COLUMNS = ("shard", "frame", "pts")  # read_batch adds them (and pixels); batches made elsewhere may lack them
MAX_READ_BATCH_BYTES = 256 * 2**20  # a read task's output batch: bounded whatever the shard size


def list_inputs(batch: dict[str, np.ndarray], units: list[Any], storage: StorageConfig,
                done: DoneSet, video: VideoConfig = VideoConfig(), meter: Any = None) -> Iterator[dict[str, np.ndarray]]:
    """{"unit": indices into `units`} -> pages of list rows, less what is done: image files an
    earlier run wrote at this version, tar shards whose images are all done, videos whose
    sampled frames are all done (video_key). A video not done becomes one row per segment
    (videos.plan_segments: its header is read here).

    A unit is a sources.Input (a folder, listed as pages stream in; or one image / shard) or a
    manifests.ManifestPart (read batch by batch), as job.plan_inputs made them. A manifest row
    naming an object that a folder or file input of the same run lists too is left to that input.
    meter: the run's meter (batchseg.run.meter), told how many rows of each page are no image
    (tar shards, video segments), which the reader expands into images and marker rows.
    """
    listed = sources.ListedBy([u for u in units if isinstance(u, sources.Input)])
    for index in batch["unit"]:
        unit = units[int(index)]
        if isinstance(unit, sources.Input):
            pages = sources.iter_input(unit, storage.options(unit.uri))
        else:
            pages = ([row for row in page if not listed(row["uri"])]
                     for page in manifests.read_manifest_part(unit, storage.options(unit.uri)))
        for page in pages:
            if page:
                page = _segmented(not_done(_columnar(page), done, video), storage, video)
                containers = page["is_shard"] | (page["segment"] >= 0)
                if meter is not None and containers.any():
                    run_meter.send(meter, "listed", int(np.count_nonzero(containers)))
                yield page


def not_done(page: dict[str, np.ndarray], done: DoneSet, video: VideoConfig) -> dict[str, np.ndarray]:
    versions = [f"{v}\n{video_marker(video, done)}" if names.is_video_name(u) else v
                for u, v in zip(page["uri"], page["version"])]
    keep = ~done.contains(done_keys_of(page["uri"], versions))
    return {k: v[keep] for k, v in page.items()}


def video_marker(video: VideoConfig, done: DoneSet) -> str:
    """What a video's done key adds to its version: the sampling and the run's models."""
    return f"{video.sampling()}\n{done.models}"


def video_key(uri: str, version: str, video: VideoConfig, done: DoneSet) -> int:
    """The done key of a video: done when every frame its sampling picks is done by these models."""
    return done_key(uri, f"{version}\n{video_marker(video, done)}")


def _segmented(page: dict[str, np.ndarray], storage: StorageConfig, video: VideoConfig) -> dict[str, np.ndarray]:
    """Each video row of a list page -> one row per segment (its header is read here)."""
    is_video = [names.is_video_name(str(u)) for u in page["uri"]]
    if not any(is_video):
        return page
    rows = []
    for i, uri in enumerate(page["uri"]):
        row = {k: page[k][i] for k in ("uri", "size", "version", "is_shard")}
        if not is_video[i]:
            rows.append(row)
            continue
        for seg in videos.plan_segments(str(uri), storage.options(str(uri)), video):
            rows.append({**row, "segment": seg.index, "segments": seg.count, "seg_start": seg.start, "seg_end": seg.end})
    return _columnar(rows)


def read_batch(batch: dict[str, np.ndarray], storage: StorageConfig, done: DoneSet,
               rows_per_batch: int, video: VideoConfig = VideoConfig(),
               meter: Any = None, journal: Any = None) -> Iterator[dict[str, np.ndarray]]:
    """_read_batch, telling `meter` (the run's meter; None: nobody) how many marker rows it
    added, so that the progress line counts images only, and `journal` when this task is a retry."""
    inflight.note_retry(journal, "read")
    markers = 0
    for block in _read_batch(batch, storage, done, rows_per_batch, video):
        markers += int(np.count_nonzero(block["members"] >= 0))
        yield block
    if meter is not None and markers:
        run_meter.send(meter, "read", markers)


def _read_batch(batch: dict[str, np.ndarray], storage: StorageConfig, done: DoneSet,
                rows_per_batch: int, video: VideoConfig) -> Iterator[dict[str, np.ndarray]]:
    """Read each file's bytes; expand each tar shard into its image members (less those already
    done: a shard can be cut short by a crash), then a marker row counting them; decode each
    video segment's sampled frames (read_video_segment). Yields batches of at most
    `rows_per_batch` rows and MAX_READ_BATCH_BYTES, so a task holds one batch of bytes
    whatever the shard sizes."""
    out = _Batcher(rows_per_batch)
    segments = batch["segment"] if "segment" in batch else np.full(len(batch["uri"]), -1)
    for i, (uri, size, version, is_shard) in enumerate(zip(batch["uri"], batch["size"], batch["version"],
                                                          batch["is_shard"])):
        uri, version = str(uri), str(version)
        opts = storage.options(uri)
        if segments[i] >= 0:
            segment = videos.Segment(int(batch["segment"][i]), int(batch["segments"][i]),
                                     float(batch["seg_start"][i]), float(batch["seg_end"][i]))
            yield from read_video_segment(out, uri, int(size), version, segment, opts, done, video)
            continue
        if not is_shard:
            try:
                data = failures.retry_transient(lambda: sources.read_bytes(uri, opts))
                yield from out.add(uri, size, version, -1, data, None, None)
            except Exception as e:
                yield from out.add(uri, size, version, -1, b"", f"read failed: {one_line(e)}", failures.read_failure_kind(e))
            continue
        seen: set[str] = set()  # a name appended to a tar again (`tar rf`) is one image: its first copy
        shard = done_key(uri, version)
        try:
            for member_uri, member_size, data in sources.iter_shard(uri, opts):
                if member_uri in seen:
                    continue
                seen.add(member_uri)
                if not done.contains(np.array([done_key(member_uri, version)]))[0]:
                    yield from out.add(member_uri, member_size, version, -1, data, None, None, shard=shard)
        except Exception as e:  # the shard becomes an error row; members read so far stay
            yield from out.add(uri, size, version, -1, b"", f"read failed: {one_line(e)}", failures.read_failure_kind(e))
            continue
        yield from out.add(uri, size, version, len(seen), b"", None, None)
    yield from out.flush()


def read_video_segment(out: _Batcher, uri: str, size: int, version: str, segment: videos.Segment,
                       opts: dict[str, Any], done: DoneSet, video: VideoConfig) -> Iterator[dict[str, np.ndarray]]:
    """One video segment -> its sampled frames not done yet (named `VIDEO#t=SECONDS`), then the
    segment's marker (`VIDEO#segment=I/N`, counting the frames sent on, keyed by this run so that
    only they count); segment 0 also sends the video's marker (`VIDEO#segments=N`, keyed by
    video_key). A video that fails (unsupported codec, corrupt, truncated) keeps the frames it
    decoded and gets one error row named by the video URI under video_key: a content error
    marks the video done, so it is recorded once."""
    whole = video_key(uri, version, video, done)
    name = f"{uri}#segment={segment.index}/{segment.count}"
    marker = done_key(name, f"{version}\n{video_marker(video, done)}\n{done.run_id}")
    sent = 0
    try:
        for frame in videos.read_segment(uri, opts, video, segment):
            furi = videos.frame_uri(uri, frame.pts_s)
            if done.contains(np.array([done_key(furi, version)]))[0]:
                continue
            sent += 1
            yield from out.add(furi, size, version, -1, b"", None, None, shard=marker, frame=frame.index,
                               pts=frame.pts_s, pixels=frame.rgb)
    except Exception as e:
        yield from out.add(uri, size, version, -1, b"", f"video: {_decode_error(e)}", failures.read_failure_kind(e),
                           key=whole)
        return
    yield from out.add(name, -1, version, sent, b"", None, None, key=marker, shard=whole)
    if segment.index == 0:
        yield from out.add(f"{uri}#segments={segment.count}", size, version, segment.count, b"", None, None, key=whole)


class _Batcher:
    """Collects read rows into bounded output batches."""

    def __init__(self, rows_per_batch: int) -> None:
        self.rows_per_batch, self.rows, self.bytes = rows_per_batch, [], 0

    def add(self, uri: str, size: int, version: str, members: int, data: bytes, error: str | None,
            kind: str | None, key: int | None = None, shard: int = 0, frame: int = -1,
            pts: float = float("nan"), pixels: np.ndarray = _NO_IMAGE) -> Iterator[dict[str, np.ndarray]]:
        """One read row; `key` defaults to done_key(uri, version)."""
        key = done_key(uri, version) if key is None else key
        self.rows.append((uri, int(size), version, key, members, data, error, kind, shard, frame, pts, pixels))
        self.bytes += len(data) + pixels.nbytes
        if len(self.rows) >= self.rows_per_batch or self.bytes >= MAX_READ_BATCH_BYTES:
            yield from self.flush()

    def flush(self) -> Iterator[dict[str, np.ndarray]]:
        if self.rows:
            columns = list(zip(*self.rows))
            self.rows, self.bytes = [], 0
            yield {
                "uri": _object_array(columns[0]), "size": np.asarray(columns[1], np.int64),
                "version": _object_array(columns[2]), "key": np.asarray(columns[3], np.int64),
                "members": np.asarray(columns[4], np.int32), "data": _object_array(columns[5]),
                "error": _object_array(columns[6]), "error_kind": _object_array(columns[7]),
                "shard": np.asarray(columns[8], np.int64), "frame": np.asarray(columns[9], np.int32),
                "pts": np.asarray(columns[10], np.float64), "pixels": _object_array(columns[11]),
            }


def decode_batch(batch: dict[str, np.ndarray], models: dict[str, ModelConfig], max_pixels: int,
                 journal: Any = None, jpegs_to_device: bool = False, decoder: Executor | None = None
                 ) -> dict[str, np.ndarray]:
    """bytes -> upright RGB -> each distinct model input (`image_0`, `image_1`, ...).

    Records the original size; see preprocess_plan for which task reads which image column.
    Guarded by the run's in-flight journal (batchseg.run.inflight; None: unguarded): an image that kills the decoding process
    repeatedly becomes an error row.
    jpegs_to_device (decode_on_device): a JPEG the device decodes as PIL does
    (imaging.device_jpeg_header) is not decoded here: its bytes go on in `jpeg`, its EXIF
    orientation in `orientation`, its upright size in height/width, for decode_on_device.
    decoder: threads to decode the images on at once (None: one after another, here).
    """
    preprocessors, _ = preprocess_plan(models)
    errors, kinds = [_text(e) for e in batch["error"]], [_text(k) for k in batch["error_kind"]]
    todo = [i for i in range(len(errors)) if errors[i] is None and batch["members"][i] < 0]
    headers = {}
    if jpegs_to_device:
        headers = {i: header for i in todo
                   if not _is_frame(batch, i) and (header := device_jpeg_header(batch["data"][i], max_pixels))}
        todo = [i for i in todo if i not in headers]
    decoded = inflight.guarded(journal, "decode", [int(batch["key"][i]) for i in todo],
                               lambda idx: list((decoder.map if decoder else map)(
                                   lambda j: _decode(_source(batch, todo[j]), preprocessors, max_pixels), idx)),
                               lambda j: _killed(preprocessors))
    images = [[_NO_IMAGE] * len(errors) for _ in preprocessors]
    heights, widths = np.full(len(errors), -1, np.int32), np.full(len(errors), -1, np.int32)
    out = {k: batch[k] for k in ("uri", "size", "version", "key", "members", *VIDEO_COLUMNS) if k in batch}
    if jpegs_to_device:
        for i, header in headers.items():
            heights[i], widths[i] = header.height, header.width
        out["jpeg"] = _object_array([batch["data"][i] if i in headers else b"" for i in range(len(errors))])
        out["orientation"] = np.array([headers[i].orientation if i in headers else 1 for i in range(len(errors))], np.int8)
    return _with_decoded(out, todo, decoded, images, heights, widths, errors, kinds)


_Decoded = tuple[list[Any], int, int, str | None, str | None]  # model inputs, height, width, error, error_kind


def _is_frame(batch: dict[str, np.ndarray], i: int) -> bool:
    return "frame" in batch and batch["frame"][i] >= 0


def _source(batch: dict[str, np.ndarray], i: int) -> bytes | np.ndarray:
    """What row i decodes from: a video frame's pixels, else the file's bytes."""
    return np.asarray(batch["pixels"][i], np.uint8) if _is_frame(batch, i) else batch["data"][i]


def _decode(data: bytes | np.ndarray, preprocessors: list[Preprocessor], max_pixels: int) -> _Decoded:
    """One image on the CPU: decode_image (a video frame comes decoded), then each
    preprocessor (imaging.model_inputs); or the one-line error."""
    try:
        if isinstance(data, np.ndarray):
            return model_inputs(data, preprocessors), *data.shape[:2], None, None
        image = decode_image(data, max_pixels)
        return model_inputs(image, preprocessors), image.height, image.width, None, None
    except Exception as e:
        return [_NO_IMAGE] * len(preprocessors), -1, -1, _decode_error(e), failures.decode_failure_kind(e)


def _killed(preprocessors: list[Preprocessor]) -> _Decoded:
    """An image given up by the in-flight journal."""
    return [_NO_IMAGE] * len(preprocessors), -1, -1, "decode killed its worker repeatedly", failures.MODEL


def _with_decoded(out: dict[str, Any], rows: list[int], decoded: list[_Decoded], images: list[list[Any]],
                  heights: np.ndarray, widths: np.ndarray, errors: list[str | None],
                  kinds: list[str | None]) -> dict[str, Any]:
    """`out` with the image (`image_k`), size and error columns, after writing each decoded
    result into its row of `images` (one list per preprocessor) and the other columns."""
    for i, (inputs, h, w, error, kind) in zip(rows, decoded):
        for column, image in zip(images, inputs):
            column[i] = image
        heights[i], widths[i], errors[i], kinds[i] = h, w, error, kind
    out.update(error=_object_array(errors), error_kind=_object_array(kinds), height=heights, width=widths)
    out.update({f"image_{k}": _object_array(column) for k, column in enumerate(images)})
    return out


def _decode_error(e: Exception) -> str:
    return str(e) if isinstance(e, DecodeError) else one_line(e)


def decode_on_device(batch: dict[str, np.ndarray], preprocessors: list[Preprocessor], max_pixels: int,
                     device: str, journal: Any = None) -> dict[str, np.ndarray]:
    """The JPEGs decode_batch passed on (`jpeg`) -> each preprocessor's model input on `device`.

    All of the batch's JPEGs in one batched decode (imaging.decode_jpegs: nvJPEG on CUDA), the
    EXIF orientation applied there, then each preprocessor's on_device: `image_k` gets (3, h, w)
    uint8 tensors on `device`. A file the device cannot decode is decoded on the CPU as
    decode_batch would have (the same arrays, or the same error row). Guarded by the journal
    like decode_batch. Returns the batch with image, size and error columns updated.
    """
    rows = [i for i, data in enumerate(batch["jpeg"]) if len(data)]
    if not rows:
        return batch

    def decode(indices: list[int]) -> list[_Decoded]:
        stored = decode_jpegs([batch["jpeg"][rows[j]] for j in indices], device)
        out = []
        for j, image in zip(indices, stored):
            if image is None:
                out.append(_decode(batch["jpeg"][rows[j]], preprocessors, max_pixels))
                continue
            upright = orient(image, int(batch["orientation"][rows[j]]))
            out.append(([prep.on_device(upright) for prep in preprocessors], *upright.shape[-2:], None, None))
        return out

    decoded = inflight.guarded(journal, "device decode", [int(batch["key"][i]) for i in rows], decode,
                               lambda j: _killed(preprocessors))
    errors, kinds = [_text(e) for e in batch["error"]], [_text(k) for k in batch["error_kind"]]
    heights, widths = batch["height"].copy(), batch["width"].copy()
    images = [list(batch[f"image_{k}"]) for k in range(len(preprocessors))]  # a block of equal shapes comes as one array
    return _with_decoded(dict(batch), rows, decoded, images, heights, widths, errors, kinds)


class Annotate:
    """Predictor actor: loads every selected model once, then per batch: one forward per task
    (in chunks of the task's batch size) over the same decoded images -> encoded rows.

    If a batched forward raises, its images are retried alone so that one bad image becomes
    one error row ("model") instead of failing its batch; out of GPU memory, the chunk is
    halved down to one image ("transient" if even that fails). A CUDA fault that poisons the
    context ends the process, so Ray starts a fresh actor; the in-flight journal isolates the
    image that caused it.

    Its timers (`times`, batchseg.run.meter.ActorTimes) split its wall time into waiting for
    input, decoding, the forward and encoding; sent to the run's meter after each call.
    """

    def __init__(self, job: JobConfig, device: str, weights: dict[str, WeightsRef | None] | None = None,
                 journal: Any = None, decodes: bool = False, meter: Any = None, decode_threads: int = 1) -> None:
        """weights: per task, what preflight pinned (None: random init); journal: see inflight.
        decodes: batches arrive as read_batch leaves them and are decoded here (decode_batch),
        so no decoded image crosses a stage boundary (on CPU, where decode shares the cores),
        by `decode_threads` threads (PIL's decode and resize release the GIL).
        meter: the run's meter (batchseg.run.meter; None: timers kept here only)."""
        self.models = {task: job.models[task] for task in job.tasks}
        self.decodes, self.max_pixels = decodes, job.max_image_pixels
        self.preprocessors, self.image_column = preprocess_plan(self.models)
        self.device, self.journal = device, journal
        inflight.note_actor(journal)
        self.backends, self.allowed = {}, {}
        for task, cfg in self.models.items():
            backend = backend_class(cfg.backend, task)
            ref = (weights or {}).get(task)
            local = fetch(ref, job.storage_options(ref.uri)) if ref else None
            self.backends[task] = backend(cfg, local, device, job.precision)
            self.allowed[task] = allowed_ids(task, cfg, backend)
            log.info("loaded %s model %s on %s", task, cfg.model, device)
        self.batch_size = {task: cfg.batch_size or job.batch_size for task, cfg in self.models.items()}
        self.thresholds = {task: cfg.score_threshold for task, cfg in self.models.items()}
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="encode")
        self.decoder = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode") if decodes and decode_threads > 1 else None
        self.meter, self.actor_id, self.times = meter, uuid.uuid4().hex[:8], run_meter.ActorTimes()
        self._first: float | None = None  # when the first batch came: start-up is not starving
        self._idle_since = 0.0

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        start = time.perf_counter()
        if self._first is None:
            self._first, self.times.first_batch_at = start, time.time()
        else:
            self.times.wait_s += start - self._idle_since
        table = self._rows(self._decoded(batch))
        self._idle_since = time.perf_counter()
        self.times.calls += 1
        self.times.images += int(np.count_nonzero(batch["members"] < 0))
        self.times.wall_s = self._idle_since - self._first
        if self.meter is not None:
            run_meter.send(self.meter, "actor", self.actor_id, self.times.as_dict())
        return table

    def _decoded(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        if self.decodes:
            batch = decode_batch(batch, self.models, self.max_pixels, self.journal, decoder=self.decoder)
        if "jpeg" in batch:  # decode_batch left JPEGs to this device (decode_on_device)
            batch = decode_on_device(batch, self.preprocessors, self.max_pixels, self.device, self.journal)
        self.times.decode_s += time.perf_counter() - start
        return batch

    def _rows(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["uri"])
        errors, kinds = [_text(e) for e in batch["error"]], [_text(k) for k in batch["error_kind"]]
        todo = [i for i in range(n) if errors[i] is None and batch["members"][i] < 0]
        shards = batch["shard"] if "shard" in batch else np.zeros(n, np.int64)
        frames = batch["frame"] if "frame" in batch else np.full(n, -1, np.int32)
        outcomes = inflight.guarded(self.journal, "predict", [int(batch["key"][i]) for i in todo],
                                    lambda idx: self._annotate(batch, [todo[j] for j in idx]),
                                    lambda j: ({}, "predict killed its worker repeatedly", failures.MODEL))
        cells: dict[int, dict[str, Any]] = {}
        for i, (cell, error, kind) in zip(todo, outcomes):
            cells[i], errors[i], kinds[i] = cell, error, kind
        rows = []
        for i in range(n):
            uri = str(batch["uri"][i])
            decoded = batch["height"][i] > 0
            row = {
                "image_id": image_id(uri), "image_uri": uri,
                "width": int(batch["width"][i]) if decoded else None,
                "height": int(batch["height"][i]) if decoded else None,
                "source_size": int(batch["size"][i]), "source_version": str(batch["version"][i]),
                "error": errors[i], "error_kind": kinds[i],
                "_key": int(batch["key"][i]), "_members": int(batch["members"][i]), "_shard": int(shards[i]),
            }
            if frames[i] >= 0:
                row.update(video_uri=videos.split_frame_uri(uri)[0], frame_index=int(frames[i]),
                           pts_s=float(batch["pts"][i]))
            elif names.is_video_name(uri):  # a video's error row
                row["video_uri"] = uri
            if errors[i] is None and batch["members"][i] < 0:
                row.update({TASK_TABLE[task].column: cells[i][task] for task in self.models})
                row["review_priority"] = review_priority.priority(cells[i], self.thresholds)
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=OUTPUT)

    def _annotate(self, batch: dict[str, np.ndarray], indices: list[int]) -> list[tuple[dict[str, Any], str | None, str | None]]:
        """(cells by task, error, error_kind) for each image at `indices`.

        Forwards run on this thread, one per group of similar shapes (detectron2 pads a batch to
        its largest image); each group's results are encoded on the encoder thread while the
        next forward runs (a forward releases the GIL), so the device does not wait for the CPU.
        """
        cells: list[dict[str, Any]] = [{} for _ in indices]
        errors: list[tuple[str, str] | None] = [None] * len(indices)
        encoding = []
        for task, backend in self.backends.items():
            todo = [j for j in range(len(indices)) if errors[j] is None]
            column = batch[f"image_{self.image_column[task]}"]
            inputs = [ModelInput(str(batch["uri"][indices[j]]), column[indices[j]], int(batch["height"][indices[j]]),
                                 int(batch["width"][indices[j]])) for j in todo]
            for group in group_by_shape([_input_size(x.image) for x in inputs], self.batch_size[task]):
                start = time.perf_counter()
                results = self._predict(backend, [inputs[g] for g in group], len(group))
                self.times.forward_s += time.perf_counter() - start
                done = []
                for g, result in zip(group, results):
                    if isinstance(result, Exception):
                        kind = failures.TRANSIENT if failures.is_out_of_memory(result) else failures.MODEL
                        errors[todo[g]] = (f"{task}: predict failed: {one_line(result)}", kind)
                    else:
                        done.append((todo[g], result))
                encoding.append(self.encoder.submit(self._encode, task, done))
        for future in encoding:
            for j, cell in future.result():
                if isinstance(cell, str):
                    errors[j] = errors[j] or (cell, failures.MODEL)
                else:
                    cells[j].update(cell)
        return [(c, *(e or (None, None))) for c, e in zip(cells, errors)]

    def _encode(self, task: str, results: list[tuple[int, Result]]) -> list[tuple[int, dict[str, Any] | str]]:
        """On the encoder thread: each result -> {task: cell}, or the one-line error."""
        start = time.perf_counter()
        spec, cfg = TASK_TABLE[task], self.models[task]
        out: list[tuple[int, dict[str, Any] | str]] = []
        for j, result in results:
            try:
                out.append((j, {task: spec.encode(result, cfg.score_threshold, self.allowed[task])}))
            except Exception as e:
                out.append((j, f"{task}: encode failed: {one_line(e)}"))
        self.times.encode_s += time.perf_counter() - start  # only this thread adds to it
        return out

    def _predict(self, backend: Backend, inputs: list[ModelInput], batch_size: int) -> list[Result | Exception]:
        out: list[Result | Exception] = []
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            try:
                out += list(backend.predict(chunk))
            except Exception as e:
                if self.device.startswith("cuda") and failures.poisons_cuda(e) and not failures.is_out_of_memory(e):
                    log.error("CUDA context poisoned (%s); restarting the predictor process", one_line(e))
                    os._exit(70)
                if len(chunk) == 1:
                    out.append(e)
                    continue
                smaller = max(1, len(chunk) // 2) if failures.is_out_of_memory(e) else 1
                log.warning("batched forward of %d failed (%s); retrying %d at a time", len(chunk), one_line(e), smaller)
                _free_device_memory()
                out += self._predict(backend, chunk, smaller)
        return out


OUTPUT = ROW.append(pa.field("_key", pa.int64())).append(pa.field("_members", pa.int32())).append(
    pa.field("_shard", pa.int64()))


def _free_device_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _input_size(image: Any) -> tuple[int, int]:
    """(h, w) of a ModelInput.image: an (h, w, 3) array or a (3, h, w) tensor."""
    return tuple(image.shape[:2]) if isinstance(image, np.ndarray) else tuple(image.shape[-2:])


def _text(value: Any) -> str | None:
    """A nullable text cell as it comes back from Arrow (None, NaN for an all-null column, str)."""
    return value if isinstance(value, str) else None


def _object_array(values) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr


def _columnar(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Listing rows -> the list stage's columns (a video's segment columns: see the top)."""
    return {
        "uri": _object_array([r["uri"] for r in rows]), "size": np.asarray([r["size"] for r in rows], np.int64),
        "version": _object_array([r["version"] for r in rows]), "is_shard": np.asarray([r["is_shard"] for r in rows], bool),
        "segment": np.asarray([r.get("segment", -1) for r in rows], np.int32),
        "segments": np.asarray([r.get("segments", 0) for r in rows], np.int32),
        "seg_start": np.asarray([r.get("seg_start", 0.0) for r in rows], np.float64),
        "seg_end": np.asarray([r.get("seg_end", 0.0) for r in rows], np.float64),
    }

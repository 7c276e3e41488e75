"""The pipeline's stages as plain functions and one callable class; no Ray in here.

Each batch is a dict of equal-length numpy arrays (Ray Data's "numpy" batch format).
Columns grow as a row moves along:
  list      uri, size, version, is_shard
  read      uri, size, version, data (bytes), error (str | None)
  decode    uri, size, version, error, height, width, image_0.. ((h, w, 3) uint8 model inputs)
  annotate  -> pyarrow Table with schema.ROW
A failure at any stage sets `error` and the row rides along to the end; nothing is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from batchseg import sources
from batchseg.config import JobConfig, ModelConfig, StorageConfig
from batchseg.errors import one_line
from batchseg.imaging import DecodeError, decode_rgb
from batchseg.runs import is_done
from batchseg.predictors.base import Backend, ModelInput, Result, backend_class, preprocess_plan, weights_uri
from batchseg.schema import ROW, image_id
from batchseg.tasks import TASK_TABLE, allowed_ids
from batchseg.weights import fetch, resolve

log = logging.getLogger(__name__)
_NO_IMAGE = np.zeros((0, 0, 3), np.uint8)


def list_root(row: dict[str, Any], storage: StorageConfig, done: np.ndarray) -> Iterator[dict[str, Any]]:
    """{"root": uri} -> one row per image file or tar shard under it, less the image files an
    earlier run already wrote at this version (`done`: runs.done_keys)."""
    for entry in sources.list_sources(row["root"], storage.options(row["root"])):
        if entry["is_shard"] or not is_done(done, entry["uri"], entry["version"]):
            yield entry


def read_batch(batch: dict[str, np.ndarray], storage: StorageConfig, done: np.ndarray) -> dict[str, np.ndarray]:
    """Read each file's bytes; expand each tar shard into one row per image member (less the
    members an earlier run already wrote: a shard can be cut short by a crash)."""
    out: dict[str, list[Any]] = {"uri": [], "size": [], "version": [], "data": [], "error": []}

    def emit(uri: str, size: int, version: str, data: bytes, error: str | None) -> None:
        for key, value in zip(out, (uri, size, version, data, error)):
            out[key].append(value)

    for uri, size, version, is_shard in zip(batch["uri"], batch["size"], batch["version"], batch["is_shard"]):
        try:
            if is_shard:
                for member_uri, member_size, data in sources.iter_shard(uri, storage.options(uri)):
                    if not is_done(done, member_uri, version):
                        emit(member_uri, member_size, version, data, None)
            else:
                emit(uri, size, version, sources.read_bytes(uri, storage.options(uri)), None)
        except Exception as e:  # the shard/file becomes an error row; members read so far stay
            emit(uri, size, version, b"", f"read failed: {one_line(e)}")
    return _columns(out)


def decode_batch(batch: dict[str, np.ndarray], models: dict[str, ModelConfig], max_pixels: int) -> dict[str, np.ndarray]:
    """bytes -> upright RGB -> each distinct model input (`image_0`, `image_1`, ...).

    Records the original size; see preprocess_plan for which task reads which image column.
    """
    preprocessors, _ = preprocess_plan(models)
    images: list[list[np.ndarray]] = [[] for _ in preprocessors]
    heights, widths, errors = [], [], []
    for data, error in zip(batch["data"], map(_text, batch["error"])):
        inputs, height, width = [_NO_IMAGE] * len(preprocessors), -1, -1
        if error is None:
            try:
                rgb = decode_rgb(data, max_pixels)
                height, width = rgb.shape[:2]
                inputs = [prep(rgb) for prep in preprocessors]
            except Exception as e:
                error = str(e) if isinstance(e, DecodeError) else one_line(e)
                height, width = -1, -1
        for column, image in zip(images, inputs):
            column.append(image)
        heights.append(height)
        widths.append(width)
        errors.append(error)
    out = {k: batch[k] for k in ("uri", "size", "version")}
    out.update(error=_object_array(errors), height=np.asarray(heights, np.int32), width=np.asarray(widths, np.int32))
    out.update({f"image_{k}": _object_array(column) for k, column in enumerate(images)})
    return out


class Annotate:
    """Predictor actor: loads every selected model once, then per batch: one forward per task
    (in chunks of the task's batch size) over the same decoded images -> encoded rows.

    If a batched forward raises, its images are retried alone so that one bad image becomes
    one error row instead of failing its whole batch.
    """

    def __init__(self, job: JobConfig, device: str) -> None:
        self.models = {task: job.models[task] for task in job.tasks}
        _, self.image_column = preprocess_plan(self.models)
        self.backends, self.allowed = {}, {}
        for task, cfg in self.models.items():
            backend = backend_class(cfg.backend, task)
            uri = weights_uri(cfg, backend)
            local = fetch(resolve(uri, job.storage_options(uri), cfg.weights_sha256, job.allow_http_weights), job.storage_options(uri)) if uri else None
            self.backends[task] = backend(cfg, local, device, job.precision)
            self.allowed[task] = allowed_ids(task, cfg, backend)
            log.info("loaded %s model %s on %s", task, cfg.model, device)
        self.batch_size = {task: cfg.batch_size or job.batch_size for task, cfg in self.models.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["uri"])
        errors = [_text(e) for e in batch["error"]]
        cells: dict[str, dict[int, Any]] = {task: {} for task in self.models}
        for task, backend in self.backends.items():
            todo = [i for i in range(n) if errors[i] is None]
            column = batch[f"image_{self.image_column[task]}"]
            inputs = [
                ModelInput(str(batch["uri"][i]), column[i], int(batch["height"][i]), int(batch["width"][i]))
                for i in todo
            ]
            spec, cfg = TASK_TABLE[task], self.models[task]
            for i, result in zip(todo, self._predict(backend, inputs, self.batch_size[task])):
                if isinstance(result, Exception):
                    errors[i] = f"{task}: predict failed: {one_line(result)}"
                    continue
                try:
                    cells[task][i] = spec.encode(result, cfg.score_threshold, self.allowed[task])
                except Exception as e:
                    errors[i] = f"{task}: encode failed: {one_line(e)}"
        rows = []
        for i in range(n):
            uri = str(batch["uri"][i])
            decoded = batch["height"][i] > 0
            row = {
                "image_id": image_id(uri),
                "image_uri": uri,
                "width": int(batch["width"][i]) if decoded else None,
                "height": int(batch["height"][i]) if decoded else None,
                "source_size": int(batch["size"][i]),
                "source_version": str(batch["version"][i]),
                "error": errors[i],
            }
            for task in self.models:
                row[TASK_TABLE[task].column] = cells[task].get(i) if errors[i] is None else None
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=ROW)

    def _predict(self, backend: Backend, inputs: list[ModelInput], batch_size: int) -> list[Result | Exception]:
        out: list[Result | Exception] = []
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            try:
                out += list(backend.predict(chunk))
            except Exception as e:
                if len(chunk) == 1:
                    out.append(e)
                    continue
                log.warning("batched forward failed (%s); retrying %d images one at a time", one_line(e), len(chunk))
                out += [self._predict(backend, [x], 1)[0] for x in chunk]
        return out


def _text(value: Any) -> str | None:
    """A nullable text cell as it comes back from Arrow (None, NaN for an all-null column, str)."""
    return value if isinstance(value, str) else None


def _object_array(values: list[Any]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def _columns(out: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    return {
        "uri": np.asarray(out["uri"], dtype=object),
        "size": np.asarray(out["size"], dtype=np.int64),
        "version": np.asarray(out["version"], dtype=object),
        "data": _object_array(out["data"]),
        "error": _object_array(out["error"]),
    }

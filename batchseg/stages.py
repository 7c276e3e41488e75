"""The pipeline's stages as plain functions and one callable class; no Ray in here.

Each batch is a dict of equal-length numpy arrays (Ray Data's "numpy" batch format).
Columns grow as a row moves along:
  list      uri, size, version, is_shard
  read      uri, size, version, data (bytes), error (str | None)
  decode    uri, size, version, error, image ((h, w, 3) uint8 model input), height, width
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
from batchseg.encoding import encode_instances
from batchseg.errors import one_line
from batchseg.imaging import DecodeError, decode_rgb
from batchseg.predictors.base import Detections, ModelInput, backend_class
from batchseg.schema import ROW, image_id
from batchseg.weights import local_weights

log = logging.getLogger(__name__)
_NO_IMAGE = np.zeros((0, 0, 3), np.uint8)


def list_root(row: dict[str, Any], storage: StorageConfig) -> Iterator[dict[str, Any]]:
    """{"root": uri} -> one row per image file or tar shard under it."""
    yield from sources.list_sources(row["root"], storage.options(row["root"]))


def read_batch(batch: dict[str, np.ndarray], storage: StorageConfig) -> dict[str, np.ndarray]:
    """Read each file's bytes; expand each tar shard into one row per image member."""
    out: dict[str, list[Any]] = {"uri": [], "size": [], "version": [], "data": [], "error": []}

    def emit(uri: str, size: int, version: str, data: bytes, error: str | None) -> None:
        for key, value in zip(out, (uri, size, version, data, error)):
            out[key].append(value)

    for uri, size, version, is_shard in zip(batch["uri"], batch["size"], batch["version"], batch["is_shard"]):
        try:
            if is_shard:
                for member_uri, member_size, data in sources.iter_shard(uri, storage.options(uri)):
                    emit(member_uri, member_size, version, data, None)
            else:
                emit(uri, size, version, sources.read_bytes(uri, storage.options(uri)), None)
        except Exception as e:  # the shard/file becomes an error row; members read so far stay
            emit(uri, size, version, b"", f"read failed: {one_line(e)}")
    return _columns(out)


def decode_batch(batch: dict[str, np.ndarray], model: ModelConfig, max_pixels: int) -> dict[str, np.ndarray]:
    """bytes -> upright RGB -> the model's input array; records the original size."""
    preprocess = backend_class(model.backend).preprocessor(model)
    images, heights, widths, errors = [], [], [], []
    for data, error in zip(batch["data"], map(_text, batch["error"])):
        image, height, width = _NO_IMAGE, -1, -1
        if error is None:
            try:
                rgb = decode_rgb(data, max_pixels)
                height, width = rgb.shape[:2]
                image = preprocess(rgb)
            except Exception as e:
                error = str(e) if isinstance(e, DecodeError) else one_line(e)
        images.append(image)
        heights.append(height)
        widths.append(width)
        errors.append(error)
    out = {k: batch[k] for k in ("uri", "size", "version")}
    out.update(
        error=_object_array(errors),
        image=_object_array(images),
        height=np.asarray(heights, np.int32),
        width=np.asarray(widths, np.int32),
    )
    return out


class Annotate:
    """Predictor actor: loads the model once, then batch -> one forward -> encoded rows.

    If a batched forward raises, each image is retried alone so that one bad image becomes
    one error row instead of failing its whole batch.
    """

    def __init__(self, job: JobConfig, task: str, device: str) -> None:
        self.model_cfg = job.models[task]
        weights = self.model_cfg.weights
        local = local_weights(weights, job.storage_options(weights)) if weights else None
        self.backend = backend_class(self.model_cfg.backend)(self.model_cfg, local, device, job.precision)
        log.info("loaded %s model %s on %s", task, self.model_cfg.model, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["uri"])
        errors = [_text(e) for e in batch["error"]]
        todo = [i for i in range(n) if errors[i] is None]
        inputs = [
            ModelInput(str(batch["uri"][i]), batch["image"][i], int(batch["height"][i]), int(batch["width"][i]))
            for i in todo
        ]
        found: dict[int, Detections] = {}
        for i, det in zip(todo, self._predict(inputs)):
            if isinstance(det, Exception):
                errors[i] = f"predict failed: {one_line(det)}"
            else:
                found[i] = det
        rows = []
        for i in range(n):
            uri = str(batch["uri"][i])
            decoded = batch["height"][i] > 0
            instances = None
            if i in found:
                try:
                    instances = encode_instances(found[i], self.model_cfg.score_threshold)
                except Exception as e:
                    errors[i] = f"encode failed: {one_line(e)}"
            rows.append({
                "image_id": image_id(uri),
                "image_uri": uri,
                "width": int(batch["width"][i]) if decoded else None,
                "height": int(batch["height"][i]) if decoded else None,
                "source_size": int(batch["size"][i]),
                "source_version": str(batch["version"][i]),
                "error": errors[i],
                "instances": instances if errors[i] is None else None,
            })
        return pa.Table.from_pylist(rows, schema=ROW)

    def _predict(self, inputs: list[ModelInput]) -> list[Detections | Exception]:
        if not inputs:
            return []
        try:
            return list(self.backend.predict(inputs))
        except Exception as e:
            if len(inputs) == 1:
                return [e]
            log.warning("batched forward failed (%s); retrying %d images one at a time", one_line(e), len(inputs))
            return [self._predict([x])[0] for x in inputs]


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

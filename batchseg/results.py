"""Read a run's output back: rows streamed from its Parquet files, and its run.json.

RESULTS is a run's output folder (holding annotations/ and run.json) or its annotations/
folder, local or any fsspec URI. Rows come one Parquet batch at a time, so memory stays
flat whatever the number of images.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from batchseg.config import ConfigError

ANNOTATIONS = "annotations"


@dataclass
class Results:
    uri: str  # the annotations folder
    fs: Any  # fsspec filesystem
    files: list[str]  # Parquet files, sorted
    run: dict[str, Any]  # run.json ({} if absent)

    @property
    def categories(self) -> dict[str, Any]:
        return self.run.get("categories", {})

    def rows(self, columns: list[str] | None = None, batch_size: int = 256) -> Iterator[dict[str, Any]]:
        """Every row (only `columns`, if given), file by file, batch by batch."""
        for path in self.files:
            with self.fs.open(path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
                    yield from batch.to_pylist()


def open_results(uri: str, storage_options: dict[str, Any] | None = None) -> Results:
    """Raise ConfigError (one line) when `uri` holds no batchseg dataset."""
    fs, path = url_to_fs(uri.rstrip("/"), **(storage_options or {}))
    for folder in (f"{path}/{ANNOTATIONS}", path):
        files = sorted(p for p in (fs.find(folder) if fs.isdir(folder) else []) if p.endswith(".parquet"))
        if files:
            break
    else:
        raise ConfigError(f"no batchseg dataset at {uri}: expected Parquet files in {uri}/{ANNOTATIONS}/")
    run_json = f"{folder.rsplit('/', 1)[0]}/run.json" if folder.endswith(f"/{ANNOTATIONS}") else f"{path}/run.json"
    run = json.loads(fs.cat(run_json)) if fs.exists(run_json) else {}
    return Results(uri=fs.unstrip_protocol(folder), fs=fs, files=files, run=run)

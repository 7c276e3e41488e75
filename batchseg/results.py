"""Read a run's output back: rows streamed from its Parquet files, and its run.json.

RESULTS is an output folder (holding annotations/ and run.json) or its annotations/ folder,
local or any fsspec URI. All runs read as one dataset with the newest row per image. Rows
come one Parquet batch at a time; the only state kept is a sorted array of the image ids of
newer runs (8 bytes per image).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from batchseg.config import ConfigError
from batchseg.schema import ANNOTATIONS



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
        """Every image once, with its newest row: runs are read newest first and an image
        already seen in a newer run is skipped. Rows carry `image_id` plus `columns` (or all)."""
        columns = None if columns is None else list(dict.fromkeys(["image_id", *columns]))
        seen = np.zeros(0, np.int64)  # sorted ids of newer runs: 8 bytes per image
        for files in self._runs_newest_first():
            this_run = []
            for path in files:
                with self.fs.open(path, "rb") as f:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
                        ids = batch.column("image_id").to_numpy()
                        fresh = ~np.isin(ids, seen, assume_unique=False)
                        this_run.append(ids)
                        for row, keep in zip(batch.to_pylist(), fresh):
                            if keep:
                                yield row
            if this_run:
                seen = np.union1d(seen, np.concatenate(this_run))

    def _runs_newest_first(self) -> list[list[str]]:
        """Files grouped by their run=RUN_ID partition (run ids sort by time), newest first."""
        groups: dict[str, list[str]] = {}
        for path in self.files:
            run = next((part[4:] for part in path.split("/") if part.startswith("run=")), "")
            groups.setdefault(run, []).append(path)
        return [groups[run] for run in sorted(groups, reverse=True)]


def parquet_files(fs, folder: str) -> list[str]:
    """Finished Parquet files under `folder`, sorted (files still being written end otherwise)."""
    return sorted(p for p in (fs.find(folder) if fs.isdir(folder) else []) if p.endswith(".parquet"))


def open_results(uri: str, storage_options: dict[str, Any] | None = None) -> Results:
    """Raise ConfigError (one line) when `uri` holds no batchseg dataset."""
    fs, path = url_to_fs(uri.rstrip("/"), **(storage_options or {}))
    for folder in (f"{path}/{ANNOTATIONS}", path):
        files = parquet_files(fs, folder)
        if files:
            break
    else:
        raise ConfigError(f"no batchseg dataset at {uri}: expected Parquet files in {uri}/{ANNOTATIONS}/")
    run_json = f"{folder.rsplit('/', 1)[0]}/run.json" if folder.endswith(f"/{ANNOTATIONS}") else f"{path}/run.json"
    run = json.loads(fs.cat(run_json)) if fs.exists(run_json) else {}
    return Results(uri=fs.unstrip_protocol(folder), fs=fs, files=files, run=run)

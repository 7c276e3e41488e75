"""Runs over one output: each run writes its own partition, never a torn file, under a lease.

    OUTPUT/annotations/run=RUN_ID/part-*.parquet   one Hive partition per run
    OUTPUT/runs/RUN_ID.json                        that run's run.json (OUTPUT/run.json: the latest)
    OUTPUT/_lease.json                             held while a run writes

A run skips every image whose (URI, version) an earlier run already wrote, so running the same
command again after a crash finishes only the rest, and a scheduled run over a growing lake
annotates only new or changed images. Readers take the newest row per image (results.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from ray.data import Datasink

from batchseg.config import ConfigError
from batchseg.results import parquet_files
from batchseg.schema import ANNOTATIONS, ROW

LEASE = "_lease.json"
PARTIAL = ".inprogress"  # suffix of a file still being written; readers skip it
LEASE_TTL_S = 300  # a lease whose heartbeat is older than this is abandoned
HEARTBEAT_S = 30


class OutputLocked(ConfigError):
    """Another run holds the output's lease."""


def new_run_id() -> str:
    """Sortable: UTC time, then a random suffix so two runs in one second differ."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def done_key(uri: str, version: str) -> int:
    """64-bit key of an image at one version."""
    return int.from_bytes(hashlib.sha256(f"{uri}\n{version}".encode()).digest()[:8], "big", signed=True)


def done_keys(fs, annotations: str, retry_failed: bool) -> np.ndarray:
    """Sorted keys of every (URI, version) already written under `annotations` (error rows too,
    unless retry_failed: a broken file is recorded once, not retried forever)."""
    keys = []
    for path in parquet_files(fs, annotations):
        try:
            with fs.open(path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(columns=["image_uri", "source_version", "error"]):
                    for uri, version, error in zip(*(batch.column(i).to_pylist() for i in range(3))):
                        if error is None or not retry_failed:
                            keys.append(done_key(uri, version or ""))
        except (OSError, pa.ArrowException) as e:
            raise ConfigError(
                f"cannot read {fs.unstrip_protocol(path)} from an earlier run ({type(e).__name__}); "
                "remove it, or start over with --overwrite"
            ) from None
    return np.unique(np.asarray(keys, dtype=np.int64))


def is_done(keys: np.ndarray, uri: str, version: str) -> bool:
    if not len(keys):
        return False
    key = done_key(uri, version)
    i = np.searchsorted(keys, key)
    return bool(i < len(keys) and keys[i] == key)


class AtomicParquetSink(Datasink):
    """Writes each task's rows as one Parquet file in the run's partition, atomically: a local
    file is written aside and renamed; an object-store upload appears only when complete."""

    def __init__(self, output: str, storage_options: dict[str, Any], run_id: str, rows_per_file: int) -> None:
        self.output, self.storage_options = output.rstrip("/"), storage_options
        self.run_id, self.rows_per_file = run_id, rows_per_file

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks, ctx) -> int:
        tables = [b for b in blocks if b.num_rows]  # Annotate returns Arrow tables with schema.ROW
        if not tables:
            return 0
        table = pa.concat_tables(tables)
        fs, root = url_to_fs(self.output, **self.storage_options)
        final = f"{root}/{ANNOTATIONS}/run={self.run_id}/part-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"
        local = isinstance(fs, LocalFileSystem)
        target = final + PARTIAL if local else final
        fs.makedirs(fs._parent(final), exist_ok=True)
        with fs.open(target, "wb") as f:
            pq.write_table(table.cast(ROW), f)
        if local:
            os.replace(target, final)
        return table.num_rows


class Lease:
    """OUTPUT/_lease.json while a run writes; a second run on the same output is refused.

    A lease is abandoned when its holder is gone: same host and the pid is dead, or the
    heartbeat (renewed every 30 s) is older than 5 minutes.
    """

    def __init__(self, output: str, storage_options: dict[str, Any], run_id: str) -> None:
        self.fs, root = url_to_fs(output.rstrip("/"), **storage_options)
        if isinstance(self.fs, LocalFileSystem):  # object stores need no folders
            self.fs.makedirs(root, exist_ok=True)
        self.path = f"{root}/{LEASE}"
        self.me = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()

    def __enter__(self) -> "Lease":
        if self.fs.exists(self.path):
            held = json.loads(self.fs.cat(self.path))
            if not _abandoned(held):
                raise OutputLocked(
                    f"output is being written by run {held['run_id']} (host {held['host']}, pid {held['pid']}, "
                    f"heartbeat {held['heartbeat']}); wait for it, or delete {LEASE} if that run is gone"
                )
        self._write()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.fs.rm(self.path)

    def _write(self) -> None:
        stamp = datetime.now(timezone.utc).isoformat()
        self.fs.pipe(self.path, json.dumps({**self.me, "heartbeat": stamp}).encode())

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._write()


def _abandoned(held: dict[str, Any]) -> bool:
    if held.get("host") == socket.gethostname():
        try:
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    age = time.time() - datetime.fromisoformat(held["heartbeat"]).timestamp()
    return age > LEASE_TTL_S

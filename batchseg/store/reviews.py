"""The reviews dataset: what people submitted in an annotation tool, beside the runs.

    OUTPUT/reviews/pull=PULL_ID/part-NNNNN.parquet   rows of schema.REVIEW, one per reviewed image
    OUTPUT/reviews/pulls/PULL_ID.json                the pull's receipt: it publishes the pull

A pull writes its parts first (each atomically, see store.storage.atomic_open), then its
receipt. Readers read only pulls with a receipt, so a pull cut off anywhere leaves nothing
visible; its parts are ignored and the next pull starts again from the last published
high-water mark. Pull ids sort by time (UTC to the microsecond, then a random suffix).

The newest review of an image wins: the one of the newest pull, and within a pull the one
saved last (`reviewed_at`). An annotation edited after a pull is pulled again by the next one,
so its new version replaces the old one.

Reading keeps about 30 bytes per published review row in memory (image id, time, place) to pick the
winners, then streams the rows one Parquet batch at a time.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from batchseg.rows.schema import REVIEW, REVIEWS
from batchseg.store.storage import atomic_open, atomic_write

log = logging.getLogger(__name__)
RECEIPTS = "pulls"  # OUTPUT/reviews/pulls/PULL_ID.json
ROWS_PER_FILE = 10_000


def new_pull_id() -> str:
    """Sortable: UTC time to the microsecond (pulls in one second stay in order), then a random
    suffix so two pulls at once differ."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ") + "-" + uuid.uuid4().hex[:6]


class PullWriter:
    """Writes one pull: `add(row)` per review (dicts of schema.REVIEW's columns, `pull` filled
    in here), parts of `rows_per_file` rows as they fill, then `publish(receipt)`. Memory: one
    part's rows."""

    def __init__(self, output: str, storage_options: dict[str, Any] | None = None, pull_id: str | None = None,
                 rows_per_file: int = ROWS_PER_FILE) -> None:
        self.fs, root = url_to_fs(output.rstrip("/"), **(storage_options or {}))
        self.folder = f"{root}/{REVIEWS}"
        self.pull_id = pull_id or new_pull_id()
        self.rows_per_file = rows_per_file
        self.parts: list[str] = []
        self.rows = 0
        self._pending: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self._pending.append({**row, "pull": self.pull_id})
        if len(self._pending) >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        table = pa.Table.from_pylist(self._pending, schema=REVIEW)
        path = f"{self.folder}/pull={self.pull_id}/part-{len(self.parts):05d}.parquet"
        with atomic_open(self.fs, path) as f:
            pq.write_table(table, f)
        self.parts.append(path)
        self.rows += table.num_rows
        self._pending = []

    def publish(self, receipt: dict[str, Any]) -> dict[str, Any]:
        """Write the last part, then the receipt (what makes the pull visible). Returns it."""
        self.flush()
        receipt = {**receipt, "pull": self.pull_id, "rows": self.rows, "parts": len(self.parts),
                   "published_at": datetime.now(timezone.utc).isoformat()}
        path = f"{self.folder}/{RECEIPTS}/{self.pull_id}.json"
        atomic_write(self.fs, path, (json.dumps(receipt, indent=2, sort_keys=True, default=str) + "\n").encode())
        return receipt


@dataclass
class Reviews:
    """The published pulls of an output folder. Empty (no pulls) where nothing was pulled."""

    fs: Any
    folder: str  # OUTPUT/reviews inside fs
    receipts: list[dict[str, Any]]  # of the published pulls, oldest first
    _winners: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def pulls(self) -> list[str]:
        """Ids of the published pulls, oldest first."""
        return [r["pull"] for r in self.receipts]

    def categories(self) -> dict[str, Any]:
        """Per task, the category table the newest pull mapped labels with ({} without pulls)."""
        return self.receipts[-1].get("categories", {}) if self.receipts else {}

    def rows(self, columns: list[str] | None = None, batch_size: int = 256) -> Iterator[dict[str, Any]]:
        """The newest review of every reviewed image: dicts with `image_id` and `columns` (or
        all of schema.REVIEW's), pull after pull, in file order."""
        columns = None if columns is None else list(dict.fromkeys(["image_id", *columns]))
        for path, keep in self._files_with_winners():
            offset = 0
            with self.fs.open(path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
                    at = np.arange(offset, offset + batch.num_rows)
                    offset += batch.num_rows
                    wanted = np.isin(at, keep, assume_unique=True)
                    if wanted.any():
                        yield from batch.filter(pa.array(wanted)).to_pylist()

    def image_ids(self) -> np.ndarray:
        """Sorted (n,) int64: the ids of every reviewed image."""
        ids = [self._column(path, "image_id") for path in self._files()]
        return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)

    def _files(self) -> list[str]:
        return [path for _, path in self._files_by_pull()]

    def _files_by_pull(self) -> list[tuple[int, str]]:
        """(pull number, part file), oldest pull first."""
        return [(i, path) for i, r in enumerate(self.receipts)
                for path in sorted(self.fs.glob(f"{self.folder}/pull={r['pull']}/part-*.parquet"))]

    def _column(self, path: str, name: str) -> np.ndarray:
        with self.fs.open(path, "rb") as f:
            column = pq.read_table(f, columns=[name]).column(name)
        if pa.types.is_timestamp(column.type):
            column = column.cast(pa.int64()).fill_null(np.iinfo(np.int64).min)
        return column.to_numpy()

    def _files_with_winners(self) -> list[tuple[str, np.ndarray]]:
        """(file, sorted row numbers of the winning reviews in it), for files with any."""
        if self._winners is None:
            by_pull = self._files_by_pull()
            files = [path for _, path in by_pull]
            ids, times, pull_no, file_no, row_no = [], [], [], [], []
            for i, (pull, path) in enumerate(by_pull):
                image = self._column(path, "image_id")
                ids.append(image)
                times.append(self._column(path, "reviewed_at"))
                pull_no.append(np.full(len(image), pull, np.int32))
                file_no.append(np.full(len(image), i, np.int32))
                row_no.append(np.arange(len(image), dtype=np.int32))
            self._winners = {}
            if files:
                image, time, pull, where, row = (np.concatenate(a) for a in (ids, times, pull_no, file_no, row_no))
                order = np.lexsort((where, time, pull, image))  # per image: newest pull, then saved last
                last = order[np.append(image[order][1:] != image[order][:-1], True)]
                for i, path in enumerate(files):
                    keep = np.sort(row[last][where[last] == i])
                    if len(keep):
                        self._winners[path] = keep
        return list(self._winners.items())


def open_reviews(output: str, storage_options: dict[str, Any] | None = None) -> Reviews:
    """The reviews of OUTPUT (an output folder, local or any fsspec URI): its published pulls."""
    fs, root = url_to_fs(output.rstrip("/"), **(storage_options or {}))
    folder = f"{root}/{REVIEWS}"
    receipts = []
    for path in sorted(fs.glob(f"{folder}/{RECEIPTS}/*.json")):
        try:
            receipt = json.loads(fs.cat_file(path))
        except (ValueError, OSError) as e:
            log.warning("skipping pull receipt %s: not readable (%s)", fs.unstrip_protocol(path), e)
            continue
        if isinstance(receipt, dict) and receipt.get("pull"):
            receipts.append(receipt)
    return Reviews(fs=fs, folder=folder, receipts=receipts)

"""Where a run's rows land: each write task commits its own files, under deterministic names.

A write task with index N writes, in this order:
  OUTPUT/annotations/run=RUN_ID/part-N.parquet   the rows (schema.ROW)
  OUTPUT/_ledger/run=RUN_ID/part-N.parquet       what they make done (batchseg.store.ledger)
  OUTPUT/runs/RUN_ID.failed/part-N.jsonl         {"image_uri", "error", "error_kind"} per failed row
Every file appears whole or not at all (storage.atomic_write), and a write task that Ray
retries after it committed writes the same names again, so a retry never doubles rows. A
crash between the annotations and the ledger part costs a re-annotation next run (and, should
the run after go back to an earlier model, the older entry decides what is done).
Each task returns its counts; the driver adds them up (no driver pass over the rows).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from ray.data import Datasink

from batchseg.store import ledger
from batchseg.rows.schema import ANNOTATIONS, LEDGER, ROW, RUNS
from batchseg.store.storage import atomic_write


class RunSink(Datasink):
    def __init__(self, output: str, storage_options: dict[str, Any], run_id: str, rows_per_file: int,
                 columns: list[str], fence: Callable[[], None] | None = None) -> None:
        """`columns`: the run's task columns, to count what was found. `fence()` raises when the
        run no longer holds its output's lease; it is called before each commit."""
        self.output, self.storage_options = output.rstrip("/"), storage_options
        self.run_id, self.rows_per_file, self.columns, self.fence = run_id, rows_per_file, columns, fence
        self.counts: dict[str, Any] = empty_counts(columns)

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[pa.Table], ctx) -> dict[str, Any]:
        tables = [b for b in blocks if b.num_rows]
        if not tables:
            return empty_counts(self.columns)
        table = pa.concat_tables(tables)
        fs, root = url_to_fs(self.output, **self.storage_options)
        name = f"part-{ctx.task_idx:05d}"
        images = table.filter(pc.less(table["_members"], 0))
        if self.fence:
            self.fence()
        if images.num_rows:
            atomic_write(fs, f"{root}/{ANNOTATIONS}/run={self.run_id}/{name}.parquet",
                               _parquet(images.select(ROW.names).cast(ROW)))
        atomic_write(fs, f"{root}/{LEDGER}/run={self.run_id}/{name}.parquet", _parquet(ledger_part(table)))
        failed = images.filter(pc.is_valid(images["error"])).select(["image_uri", "error", "error_kind"])
        if failed.num_rows:
            lines = "".join(json.dumps(row) + "\n" for row in failed.to_pylist())
            atomic_write(fs, f"{root}/{RUNS}/{self.run_id}.failed/{name}.jsonl", lines.encode())
        return count(images, self.columns)

    def on_write_complete(self, write_result) -> None:
        for part in write_result.write_returns:
            merge_counts(self.counts, part)


def ledger_part(table: pa.Table) -> pa.Table:
    """The ledger entries of a write task's rows (images, frames and markers; `_shard`: the
    marker each counts towards, as the read stage named it)."""
    return ledger.entries(table["_key"].to_numpy(), table["image_id"].to_numpy(), table["error_kind"].to_pylist(),
                          table["_shard"].to_numpy(), table["_members"].to_numpy())


def empty_counts(columns: list[str]) -> dict[str, Any]:
    return {"images": {"in": 0, "annotated": 0, "failed": 0},
            "failed_by_kind": {}, "found": {c: {} for c in columns}}


def count(images: pa.Table, columns: list[str]) -> dict[str, Any]:
    """Images in / annotated / failed (by kind), and per task column the items found per
    category id, from one write task's rows (category ids only: the masks are not touched)."""
    failed = images.num_rows - images["error"].null_count
    kinds = Counter(k for k in images["error_kind"].to_pylist() if k)
    found = {}
    for column in columns:
        ids = pc.struct_field(pc.list_flatten(images[column]), [0])
        found[column] = {str(e["values"]): e["counts"] for e in pc.value_counts(ids).to_pylist()}
    return {"images": {"in": images.num_rows, "annotated": images.num_rows - failed, "failed": failed},
            "failed_by_kind": dict(kinds), "found": found}


def merge_counts(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part["images"].items():
        total["images"][key] += value
    for kind, n in part["failed_by_kind"].items():
        total["failed_by_kind"][kind] = total["failed_by_kind"].get(kind, 0) + n
    for column, per_category in part["found"].items():
        into = total["found"].setdefault(column, {})
        for category, n in per_category.items():
            into[category] = into.get(category, 0) + n


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()

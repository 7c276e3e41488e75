"""run.json: what a run did, read back from what it wrote.

Counts come from the Parquet files on disk (only the `error` column and the task columns'
category-id leaves are read, never the masks), so run.json cannot disagree with the dataset.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow
import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.parquet as pq

_PACKAGES = ("batchseg", "torch", "torchvision", "detectron2", "ray", "pyarrow", "pycocotools")


def count_rows(fs: pyarrow.fs.FileSystem, path: str, columns: list[str]) -> dict[str, Any]:
    """Stream the Parquet files under `path`: images in / annotated / failed, and for each task
    column the number of found items (instances, segments, people) in all and per category."""
    images = failed = 0
    found: dict[str, Counter[int]] = {c: Counter() for c in columns}
    leaves = [f"{c}.list.element.category_id" for c in columns]  # read alone, never the masks
    for batch in _batches(fs, path, ["error", *leaves]):
        images += batch.num_rows
        failed += batch.num_rows - batch.column("error").null_count
        for c in columns:
            ids = pc.struct_field(pc.list_flatten(batch.column(c)), [0])
            for entry in pc.value_counts(ids).to_pylist():
                found[c][entry["values"]] += entry["counts"]
    return {
        "images": {"in": images, "annotated": images - failed, "failed": failed},
        "found": {
            c: {"total": sum(n.values()), "per_category": {str(k): v for k, v in sorted(n.items())}}
            for c, n in found.items()
        },
    }


def write_failed(fs: pyarrow.fs.FileSystem, path: str, out: pyarrow.fs.OutputStream) -> int:
    """Stream `{"image_uri", "error"}` JSON lines of the failed rows under `path` into `out`."""
    count = 0
    for batch in _batches(fs, path, ["image_uri", "error"]):
        for row in batch.filter(pc.is_valid(batch.column("error"))).to_pylist():
            out.write((json.dumps(row) + "\n").encode())
            count += 1
    return count


def _batches(fs: pyarrow.fs.FileSystem, path: str, columns: list[str]) -> Iterator[pyarrow.RecordBatch]:
    """`columns` (leaf paths allowed) of every Parquet file under `path`, batch by batch."""
    for info in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True)):
        if info.is_file and info.path.endswith(".parquet"):
            with fs.open_input_file(info.path) as f:
                yield from pq.ParquetFile(f).iter_batches(columns=columns)


_STAGE = re.compile(r"^Operator \d+ (?P<name>.+?): (?P<tasks>\d+) tasks executed, (?P<blocks>\d+) blocks produced in (?P<wall>[\d.]+)s", re.M)


def stages(stats_text: str) -> list[dict[str, Any]]:
    """Ray Data's per-operator summary (Dataset.stats()) as [{"stage", "tasks", "blocks", "wall_s"}]."""
    return [
        {"stage": m["name"], "tasks": int(m["tasks"]), "blocks": int(m["blocks"]), "wall_s": float(m["wall"])}
        for m in _STAGE.finditer(stats_text)
    ]


def versions() -> dict[str, str | None]:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found

"""run.json: what a run did, read back from what it wrote.

Counts come from the Parquet files on disk (only the `error` column and the instances'
category-id leaf are read, never the masks), so run.json cannot disagree with the dataset.
"""

from __future__ import annotations

import importlib.metadata
from collections import Counter
from typing import Any

import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.parquet as pq

from batchseg.predictors.base import Category

_PACKAGES = ("batchseg", "torch", "torchvision", "detectron2", "ray", "pyarrow", "pycocotools")
_CATEGORY_LEAF = "instances.list.element.category_id"  # read alone, not the RLE strings


def count_rows(fs: pyarrow.fs.FileSystem, path: str) -> dict[str, Any]:
    """Stream the Parquet files under `path`: images in / annotated / failed, instances per category."""
    images = failed = 0
    per_category: Counter[int] = Counter()
    for info in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True)):
        if not info.is_file or not info.path.endswith(".parquet"):
            continue
        with fs.open_input_file(info.path) as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=["error", _CATEGORY_LEAF]):
                images += batch.num_rows
                failed += batch.num_rows - batch.column(0).null_count
                ids = pc.struct_field(pc.list_flatten(batch.column(1)), [0])
                for entry in pc.value_counts(ids).to_pylist():
                    per_category[entry["values"]] += entry["counts"]
    return {
        "images": {"in": images, "annotated": images - failed, "failed": failed},
        "instances": sum(per_category.values()),
        "instances_per_category": {str(k): v for k, v in sorted(per_category.items())},
    }


def versions() -> dict[str, str | None]:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def category_table(label_map: dict[int, Category]) -> list[dict[str, Any]]:
    unique = {c.id: c.name for c in label_map.values()}
    return [{"id": i, "name": unique[i]} for i in sorted(unique)]

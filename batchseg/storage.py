"""Filesystems for the job's output, from the same storage options the inputs use."""

from __future__ import annotations

import json
from typing import Any

import fsspec
import pyarrow.fs
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from batchseg.config import JobConfig


def output_fs(job: JobConfig) -> tuple[pyarrow.fs.FileSystem, str]:
    """(pyarrow filesystem, root path inside it) for job.output; creates a local root."""
    fs, root = url_to_fs(job.output, **job.storage_options(job.output))
    root = root.rstrip("/")
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(root, exist_ok=True)
        return pyarrow.fs.LocalFileSystem(), root
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), root


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def write_json(uri: str, obj: Any, storage_options: dict[str, Any]) -> None:
    with fsspec.open(uri, "w", **storage_options) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")

"""Read a run's output back: rows streamed from its Parquet files, and each run's report.

RESULTS is an output folder (holding annotations/ and runs/) or its annotations/ folder,
local or any fsspec URI. All runs read as one dataset with the newest row per image: runs are
read newest first and an image already seen is skipped, so duplicates within a run go too.
Rows come one Parquet batch at a time; the only state kept is the set of image ids seen so
far (8 bytes per image, in sorted levels: see SeenIds). Files that cannot be read as Parquet
(left torn by an older version, or being written by another tool) are skipped with a warning.

With reviews (`open_results(OUTPUT, reviews=True)`), rows are the merged view: an image's
newest review (store.reviews) where one exists, its newest prediction otherwise, each with a
`source` column ("human" or "model"). Review rows come first; their ids seed the set of ids
seen, so the runs' rows of reviewed images are skipped without being read twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from batchseg.config import ConfigError
from batchseg.errors import one_line
from batchseg.rows.schema import ANNOTATIONS, LEDGER, REVIEW, ROW, RUNS, TRACKS
from batchseg.store.reviews import Reviews, open_reviews
from batchseg.store.tracks import TrackIds

log = logging.getLogger(__name__)
REQUIRED = ("image_id", "image_uri", "error")  # the columns every batchseg row has
READ_BLOCK = 8 * 2**20  # bytes per ranged read: enough for a row group's columns, not a whole file


class SeenIds:
    """A growing set of int64 ids, kept as sorted arrays ("levels") merged like a binary counter.

    `add` costs O(n log n) over all ids added, `contains` O(levels x log n) per id with
    levels <= log2(n): flat per row however many ids newer runs hold (np.isin re-sorted the
    whole set on every call).
    """

    def __init__(self) -> None:
        self.levels: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(level) for level in self.levels)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 -> (n,) bool."""
        found = np.zeros(len(ids), bool)
        for level in self.levels:
            at = np.searchsorted(level, ids)
            found |= level[np.minimum(at, len(level) - 1)] == ids
        return found

    def add(self, ids: np.ndarray) -> None:
        new = np.unique(ids)
        new = new[~self.contains(new)]  # levels stay disjoint, so len() counts each id once
        while self.levels and len(self.levels[-1]) <= len(new):
            new = np.union1d(self.levels.pop(), new)
        if len(new):
            self.levels.append(new)


@dataclass
class Results:
    uri: str  # the annotations folder
    fs: Any  # fsspec filesystem
    files: list[str]  # Parquet files, sorted
    run: dict[str, Any]  # the latest run's report (run.json; {} if absent)
    root: str = ""  # the output folder inside `fs` (holds runs/)
    reviews: Reviews | None = None  # set: rows() is the merged view (module docstring)
    _run_info: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def categories(self) -> dict[str, Any]:
        """Per task, the category table the run used. Raises ConfigError without a run report:
        ids alone would make exports with no or unnamed categories."""
        if "categories" not in self.run:
            raise ConfigError(f"no run report next to {self.uri} (run.json or runs/RUN_ID.json) to name its "
                              "categories; give the run's output folder, as batchseg run wrote it")
        return self.run["categories"]

    def rows(self, columns: list[str] | None = None, batch_size: int = 256,
             optional: list[str] = ()) -> Iterator[dict[str, Any]]:
        """Every image once, with its newest row: `image_id`, `run` (the run id) and `columns`
        (or all columns), plus those of `optional` that a file has (columns newer than some
        files, e.g. the video ones); with reviews, also `source` and a review's row where there
        is one; a tracked video frame's instances get their stored `track_id` (store.tracks;
        read with `video_uri`)."""
        columns = None if columns is None else list(dict.fromkeys(["image_id", *columns]))
        optional = [c for c in optional if c not in (columns or ())]
        if columns and "instances" in columns and "video_uri" not in columns + optional:
            optional.append("video_uri")
        seen = SeenIds()
        tracked = TrackIds(self.fs, self.root)
        if self.reviews is not None:
            yield from self._review_rows(columns, seen, batch_size)
        for run, files in self._runs_newest_first():
            for path in files:
                for batch in self._batches(path, columns, batch_size, optional):
                    ids = batch.column("image_id").to_numpy()
                    first = np.zeros(len(ids), bool)  # an id twice in one batch: keep the first
                    first[np.unique(ids, return_index=True)[1]] = True
                    keep = first & ~seen.contains(ids)
                    seen.add(ids[keep])
                    for row, wanted in zip(batch.to_pylist(), keep):
                        if wanted:
                            row["run"] = run
                            if self.reviews is not None:
                                row["source"] = "model"
                            yield tracked.fill(row)

    def _review_rows(self, columns: list[str] | None, seen: SeenIds, batch_size: int) -> Iterator[dict[str, Any]]:
        """Reviews as result rows: the columns a review lacks are null (error too: a review is
        a success), `run` is "" (no model made them) and `pull` names the pull. Adds their ids to `seen`."""
        seen.add(self.reviews.image_ids())
        names = columns or list(ROW.names)
        have = [c for c in names if c in REVIEW.names]
        for review in self.reviews.rows(list(dict.fromkeys([*have, "pull"])), batch_size):
            row = {c: review.get(c) for c in names}
            row.update(run="", source="human", pull=review["pull"])
            yield row

    def run_info(self, run_id: str) -> dict[str, Any]:
        """That run's report, OUTPUT/runs/RUN_ID.json ({} if absent): config, provenance, counts."""
        if run_id not in self._run_info:
            path = f"{self.root}/{RUNS}/{run_id}.json"
            self._run_info[run_id] = json.loads(self.fs.cat(path)) if run_id and self.fs.exists(path) else {}
        return self._run_info[run_id]

    def _batches(self, path: str, columns: list[str] | None, batch_size: int,
                 optional: list[str] = ()) -> Iterator[pa.RecordBatch]:
        """The file's record batches of `columns` (all: None), plus those of `optional` it has."""
        try:
            f = self.fs.open(path, "rb", block_size=READ_BLOCK)
            reader = pq.ParquetFile(f, pre_buffer=False)  # pre-buffering reads a file's columns whole
        except (OSError, pa.ArrowException) as e:
            log.warning("skipping %s: not a readable Parquet file (%s)", self.fs.unstrip_protocol(path), e)
            return
        with f:
            missing = set(REQUIRED) - set(reader.schema_arrow.names)  # other columns may postdate the file
            if missing:
                log.warning("skipping %s: not batchseg's (no %s column)", self.fs.unstrip_protocol(path), sorted(missing)[0])
                return
            if columns is not None:
                columns = columns + [c for c in optional if c in reader.schema_arrow.names]
            yield from reader.iter_batches(batch_size=batch_size, columns=columns)

    def _runs_newest_first(self) -> list[tuple[str, list[str]]]:
        """(run id, its files), grouped by the run=RUN_ID partition (run ids sort by time)."""
        groups: dict[str, list[str]] = {}
        for path in self.files:
            groups.setdefault(run_of(path), []).append(path)
        return [(run, groups[run]) for run in sorted(groups, reverse=True)]


def run_of(path: str) -> str:
    """The run id of a file under annotations/run=RUN_ID/ ("" outside a run partition)."""
    return next((part[4:] for part in path.split("/") if part.startswith("run=")), "")


def parquet_files(fs, folder: str) -> list[str]:
    """Finished Parquet files under `folder`, sorted (files still being written end otherwise),
    less the run ledgers and reports an output folder also holds."""
    skip = (f"/{LEDGER}/", f"/{RUNS}/", f"/{TRACKS}/")
    return sorted(p for p in (fs.find(folder) if fs.isdir(folder) else [])
                  if p.endswith(".parquet") and not any(s in f"/{p}" for s in skip))


def open_results(uri: str, storage_options: dict[str, Any] | None = None, reviews: bool = False) -> Results:
    """RESULTS as the CLI takes it: an output folder, its annotations/ folder, or one run's
    annotations/run=RUN_ID/ partition (that run only). Raise ConfigError (one line) when `uri`
    holds no batchseg dataset. reviews: the merged view with the output's reviews (module
    docstring)."""
    fs, path = url_to_fs(uri.rstrip("/"), **(storage_options or {}))
    name = path.rsplit("/", 1)[-1]
    given_output = name != ANNOTATIONS and not run_of(name) and fs.isdir(f"{path}/{ANNOTATIONS}")
    folder = f"{path}/{ANNOTATIONS}" if given_output else path
    files = parquet_files(fs, folder)
    if not files:
        raise ConfigError(f"no batchseg dataset at {uri}: expected Parquet files in {uri}/{ANNOTATIONS}/")
    with fs.open(files[0], "rb") as f:
        try:
            names = set(pq.ParquetFile(f).schema_arrow.names)
        except (OSError, pa.ArrowException):
            names = set(REQUIRED)  # torn: _batches skips it with a warning
    if not set(REQUIRED) <= names:
        raise ConfigError(f"{uri} is not a batchseg dataset: {fs.unstrip_protocol(files[0])} has no "
                          f"{sorted(set(REQUIRED) - names)[0]} column; give a folder batchseg run wrote")
    partition = run_of(folder.rsplit("/", 1)[-1])
    annotations = folder.rsplit("/", 1)[0] if partition else folder
    root = annotations.rsplit("/", 1)[0] if annotations.rsplit("/", 1)[-1] == ANNOTATIONS else annotations
    merged = open_reviews(fs.unstrip_protocol(root), storage_options) if reviews else None
    return Results(uri=fs.unstrip_protocol(folder), fs=fs, files=files, run=_report(fs, root, partition), root=root,
                   reviews=merged)


def _report(fs, root: str, run_id: str = "") -> dict[str, Any]:
    """A run's report: runs/RUN_ID.json for one run, else run.json (the latest), else the newest
    readable runs/*.json; {} if none. An unreadable report is skipped with a warning."""
    if run_id:
        paths = [f"{root}/{RUNS}/{run_id}.json"]
    else:
        paths = [f"{root}/run.json", *sorted(fs.glob(f"{root}/{RUNS}/*.json"), reverse=True)]
    for path in paths:
        try:
            report = json.loads(fs.cat_file(path))
        except FileNotFoundError:
            continue
        except (ValueError, OSError) as e:
            log.warning("skipping %s: not a readable run report (%s)", fs.unstrip_protocol(path), one_line(e))
            continue
        if isinstance(report, dict):
            return report
    return {}

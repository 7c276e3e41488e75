"""Stored track ids: one file per tracked video, and the join that puts them on rows.

    OUTPUT/tracks/video-VIDEO_ID.parquet   image_id, run, track_ids (per instance, in order)
    OUTPUT/tracks/run-RUN_ID.done          (empty) the videos of that run's rows are tracked

VIDEO_ID is schema.image_id(video_uri). A file holds the tracks of every frame of its video as
the newest rows stood when it was written (batchseg.run.tracking writes it after each run that
annotated frames of the video, over all of its frames: ids are video-wide and consistent, not
stitched when read). It is replaced whole (storage.atomic_write), so a retry writes the same.
A run without a `.done` marker (one with `video.track` off, or whose tracking step did not
finish) has its videos tracked by the next run with `video.track` on (`untracked_runs`).
`TrackIds.fill` sets `track_id` on a row's instances when the file names that row's run.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchseg.rows.schema import TRACKS, image_id
from batchseg.store.storage import atomic_write

SCHEMA = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("run", pa.string(), nullable=False),  # the run whose row the ids belong to
    pa.field("track_ids", pa.list_(pa.int32()), nullable=False),  # one per instance, in the row's order
])


def path(root: str, video_uri: str) -> str:
    return f"{root}/{TRACKS}/video-{image_id(video_uri)}.parquet"


def write(fs, root: str, video_uri: str, table: pa.Table) -> None:
    """Replace the video's tracks with `table` (SCHEMA)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table.cast(SCHEMA).replace_schema_metadata({b"video_uri": video_uri.encode()}), sink)
    atomic_write(fs, path(root, video_uri), sink.getvalue().to_pybytes())


def untracked_runs(fs, root: str, runs: set[str]) -> set[str]:
    """Those of `runs` without a `.done` marker."""
    folder = f"{root}/{TRACKS}"
    marked = {p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)} if fs.isdir(folder) else set()
    return {r for r in runs if f"run-{r}.done" not in marked}


def mark_tracked(fs, root: str, runs: set[str]) -> None:
    """Record that the videos of `runs` are tracked (after their tracks files are written)."""
    for run in sorted(runs):
        atomic_write(fs, f"{root}/{TRACKS}/run-{run}.done", b"")


class TrackIds:
    """Reads tracks files on demand (the last few videos kept) to fill rows' track ids."""

    def __init__(self, fs, root: str, keep: int = 4) -> None:
        self.fs, self.root, self.keep = fs, root, keep
        self._videos: OrderedDict[str, dict[int, tuple[str, list[int]]]] = OrderedDict()

    def fill(self, row: dict[str, Any]) -> dict[str, Any]:
        """`row` with `track_id` on each instance: the stored id if the video's tracks file
        covers this row (same image, same run), else None."""
        instances = row.get("instances")
        if not instances:
            return row
        stored = self._tracks(row.get("video_uri")).get(row["image_id"]) if row.get("video_uri") else None
        ids = stored[1] if stored and stored[0] == row.get("run") and len(stored[1]) == len(instances) else None
        for k, instance in enumerate(instances):
            instance["track_id"] = ids[k] if ids else None
        return row

    def _tracks(self, video_uri: str) -> dict[int, tuple[str, list[int]]]:
        if video_uri not in self._videos:
            try:
                table = pq.read_table(io.BytesIO(self.fs.cat_file(path(self.root, video_uri))))
                found = {i: (r, t) for i, r, t in zip(table["image_id"].to_pylist(), table["run"].to_pylist(),
                                                        table["track_ids"].to_pylist())}
            except FileNotFoundError:
                found = {}
            self._videos[video_uri] = found
            while len(self._videos) > self.keep:
                self._videos.popitem(last=False)
        self._videos.move_to_end(video_uri)
        return self._videos[video_uri]

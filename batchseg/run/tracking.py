"""After a run with `video.track`: track the videos it annotated frames of (rows.tracks) and
store their track ids (store.tracks), as Ray Data work: the driver handles video URIs only.

The videos of earlier runs whose tracking never happened (`video.track` was off, or their
tracking step did not finish: no `tracks/run-RUN_ID.done` marker) are tracked too, so turning
`video.track` on for videos already done tracks them without annotating anything again. Once
tracked, a run is marked, and later runs look at their own rows only.

Each video is tracked over all of its frames, the newest row of each (earlier runs' frames
too), so the ids stay consistent when a later run adds frames (a new sampling, a video cut
short by a crash). Frames are grouped into the segments the read stage cut (video.segment_s
from video.start): linked per segment, stitched at the borders.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from fsspec.core import url_to_fs

from batchseg.config import JobConfig, VideoConfig
from batchseg.rows import tracks
from batchseg.rows.schema import ANNOTATIONS
from batchseg.store import tracks as stored
from batchseg.store.results import parquet_files, run_of

COLUMNS = ["image_id", "video_uri", "pts_s", "instances", "error"]


def track_run(job: JobConfig, run_id: str) -> dict[str, Any]:
    """Track every video with frames from this run or an untracked earlier one (module
    docstring); returns {"runs" (whose videos were looked at), "videos", "frames", "tracks",
    "ms_per_frame"}."""
    opts = job.storage_options(job.output)
    fs, root = url_to_fs(job.output.rstrip("/"), **opts)
    files = parquet_files(fs, f"{root}/{ANNOTATIONS}")
    pending = stored.untracked_runs(fs, root, {run_of(f) for f in files} - {""})  # "": files of before run partitions
    figures = {"runs": len(pending), "videos": 0, "frames": 0, "tracks": 0, "ms_per_frame": 0.0}
    theirs = [f for f in files if run_of(f) in pending]
    touched = _videos(ray.data.read_parquet(theirs, filesystem=_arrow_fs(fs), columns=["video_uri"])) if theirs else []
    if touched:
        figures.update(_track(job, fs, files, touched, opts))
    stored.mark_tracked(fs, root, pending)
    return figures


def _track(job: JobConfig, fs, files: list[str], touched: list[str], opts: dict[str, Any]) -> dict[str, Any]:
    """Track `touched` videos over all their frames in `files`; returns the figures."""
    ds = ray.data.read_parquet(files, filesystem=_arrow_fs(fs), columns=COLUMNS, include_paths=True)
    ds = ds.map_batches(_of_videos, fn_kwargs={"videos": touched}, batch_format="pyarrow", num_cpus=0)
    # one shuffle partition per video up to the cluster's CPUs (the default, 200, is mostly empty tasks)
    partitions = max(1, min(len(touched), int(ray.cluster_resources().get("CPU", 1))))
    done = ds.groupby("video_uri", num_partitions=partitions).map_groups(
        _track_one, fn_kwargs={"output": job.output, "opts": opts, "video": job.video}, batch_format="pyarrow",
        num_cpus=1,
    ).take_all()
    frames = sum(r["frames"] for r in done)
    return {"videos": len(done), "frames": frames, "tracks": sum(r["tracks"] for r in done),
            "ms_per_frame": round(1000 * sum(r["seconds"] for r in done) / max(1, frames), 3)}


def _videos(ds) -> list[str]:
    """The distinct non-null video URIs of a dataset with a video_uri column."""
    values = ds.unique("video_uri")
    return sorted(v for v in values if v)


def _arrow_fs(fs):
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def _of_videos(batch: pa.Table, videos: list[str]) -> pa.Table:
    """Frames of `videos` (error rows dropped), with their run (from the file's partition)."""
    import pyarrow.compute as pc

    keep = pc.and_(pc.is_in(batch["video_uri"], pa.array(videos, pa.string())),
                   pc.and_(pc.is_null(batch["error"]), pc.is_valid(batch["pts_s"])))
    batch = batch.filter(pc.fill_null(keep, False))
    runs = pa.array([run_of(p) for p in batch["path"].to_pylist()], pa.string())
    return batch.drop_columns(["path", "error"]).append_column("run", runs)


def _track_one(group: pa.Table, output: str, opts: dict[str, Any], video: VideoConfig) -> pa.Table:
    """One video's frames (any runs) -> its tracks file; returns one figures row."""
    started = time.perf_counter()
    uri = group["video_uri"][0].as_py()
    order = np.lexsort((-_run_rank(group["run"].to_pylist()), group["image_id"].to_numpy()))
    ids = group["image_id"].to_numpy()[order]
    newest = order[np.append(True, ids[1:] != ids[:-1])]  # the newest row per frame
    frames = group.take(pa.array(newest)).sort_by("pts_s")
    pts = frames["pts_s"].to_numpy()
    instances = frames["instances"].to_pylist()
    segment = np.maximum(0, np.floor((pts - video.start) / video.segment_s)).astype(int)
    bounds = np.flatnonzero(np.diff(segment)) + 1
    cut = [list(range(a, b)) for a, b in zip([0, *bounds], [*bounds, len(pts)])]
    per_segment = tracks.track_video([[instances[i] or [] for i in rows] for rows in cut], video.track_iou)
    track_ids = [ids_ for seg in per_segment for ids_ in seg]
    fs, root = url_to_fs(output.rstrip("/"), **opts)
    stored.write(fs, root, uri, pa.table({"image_id": frames["image_id"], "run": frames["run"],
                                          "track_ids": pa.array(track_ids, pa.list_(pa.int32()))}))
    found = max((t for ids_ in track_ids for t in ids_), default=0)
    return pa.table({"video_uri": [uri], "frames": [len(pts)], "tracks": [found],
                     "seconds": [time.perf_counter() - started]})


def _run_rank(runs: list[str]) -> np.ndarray:
    """Run ids -> ranks in time order (run ids sort by time)."""
    order = {r: k for k, r in enumerate(sorted(set(runs)))}
    return np.array([order[r] for r in runs], np.int64)

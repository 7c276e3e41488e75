"""What is done, in a few bytes per image: per-run ledgers and the done set a run plans with.

"Done" means: this image, at this version, by these models (task fingerprints), for these
tasks. Every write task writes, after its annotations part, a ledger part with one entry per
row it wrote:

    OUTPUT/_ledger/run=RUN_ID/part-NNNNN.parquet   key, image, status, shard, members
    OUTPUT/_ledger/base-RUN_ID.parquet             compaction: newest entry per image of all
                                                   runs <= RUN_ID, plus their run index

`key` is done_key(URI, version) and `image` the image's id (schema.image_id(URI)): only an
image's newest entry counts, so an image put back to an earlier version is annotated again,
and a newer failure hides an older success. `shard` is the done key of the marker an entry
counts towards: the tar shard an image came from, the video segment a frame came from, or the
video a segment belongs to (0 for plain files). `status`: OK, CONTENT (the bytes are not an image: done for
every model until the version changes or --retry-failed), MODEL (the model failed: done for
that model), TRANSIENT (throttling, out of memory: never done, tried again next run), SHARD
(a marker: a tar shard read to its end, `members` counting its distinct images; a video
segment decoded to its end, `members` counting the frames it sent on; a video, `members`
counting its segments). The
fingerprints of a run's tasks are in its report, OUTPUT/runs/RUN_ID.json (written when the
run starts), so an entry is done for a new run only if its run's fingerprints cover every
task of the new run with the same fingerprint. A shard is done when all `members` of its
member entries are done; otherwise it is read again and only the members not done are
annotated. Markers nest one level: a video is done when its segments are, a segment when
the frames it sent on are (run.stages.read_batch names what each waits for).

Planning (`plan`, `done_with_figures`) reads only ledgers -- ~18 bytes per image, never the
annotations -- in one Ray task, not on the driver, and returns the sorted int64 keys that are
done for this run; listing and read tasks look keys up with np.searchsorted (DoneSet).

With skip_reviewed, the ids of the images people reviewed (store.reviews: the reviews' image_id
column, 8 bytes an image) make an image's newest entry done whatever its run's fingerprints
or status, so the image is left out at the version the ledger knows (a changed file is
annotated again: the review was of the old one).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from batchseg.rows.schema import LEDGER, RUNS
from batchseg.store.reviews import open_reviews

log = logging.getLogger(__name__)

OK, CONTENT, MODEL, SHARD, TRANSIENT = 0, 1, 2, 3, 4
STATUS_OF_KIND = {None: OK, "content": CONTENT, "model": MODEL, "transient": TRANSIENT}
SCHEMA = pa.schema([
    pa.field("key", pa.int64(), nullable=False),
    pa.field("image", pa.int64(), nullable=False),  # schema.image_id of the image (or shard) URI
    pa.field("status", pa.int8(), nullable=False),
    pa.field("shard", pa.int64(), nullable=False),  # the image's shard key; 0 for plain files
    pa.field("members", pa.int32(), nullable=False),  # SHARD entries: images in the shard; else 0
])
COMPACT_AFTER = 16  # run ledgers newer than the newest base that trigger a new base
_READERS = 16  # ledger files fetched at once


def done_key(uri: str, version: str) -> int:
    """64-bit key of an image (or shard) at one version."""
    return int.from_bytes(hashlib.sha256(f"{uri}\n{version}".encode()).digest()[:8], "big", signed=True)


def done_keys_of(uris, versions) -> np.ndarray:
    """done_key for each (uri, version) pair -> (n,) int64."""
    return np.fromiter((done_key(str(u), str(v or "")) for u, v in zip(uris, versions)), np.int64, len(uris))


@dataclass(frozen=True)
class DoneSet:
    """The sorted done keys of a run, shared with every worker through the object store.

    Holds an ObjectRef, not the array: a task's first lookup maps the array from the
    node's shared memory (zero copy), so 10^8 keys cost 800 MB per node, not per task.
    """

    ref: Any  # ObjectRef of a sorted (n,) int64 array; None = nothing done
    run_id: str = ""  # the run reading with it: a video segment's marker waits for this run's frames
    models: str = ""  # models_digest of the run's task fingerprints: a video is done per model

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """(n,) int64 -> (n,) bool."""
        return find_sorted(_resolve(self.ref), keys)[1]


def find_sorted(values: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binary search of `keys` (n,) in sorted `values` (m,): (at, hit), both (n,); values[at[i]]
    == keys[i] where hit[i]. O(n log m), no copy of `values`."""
    if not len(values):
        return np.zeros(len(keys), np.intp), np.zeros(len(keys), bool)
    at = np.minimum(np.searchsorted(values, keys), len(values) - 1)
    return at, values[at] == keys


_resolved: dict[Any, np.ndarray] = {}


def _resolve(ref: Any) -> np.ndarray:
    if ref is None:
        return np.zeros(0, np.int64)
    if ref not in _resolved:
        import ray  # here, not at the top: the stages import this module without Ray on a bare GPU box

        _resolved.clear()  # one run at a time per worker process
        _resolved[ref] = ray.get(ref)
    return _resolved[ref]


def entries(keys: np.ndarray, images: np.ndarray, kinds: list[str | None], shards: np.ndarray,
            members: np.ndarray) -> pa.Table:
    """A write task's ledger part: one entry per row.

    keys: (n,) int64 done keys.  images: (n,) int64 image ids.  kinds: error_kind per row
    (None = success).  shards: (n,) int64 shard keys (0 for plain files).  members: (n,)
    int32, >= 0 for shard markers (the shard's image count), -1 for image rows.
    """
    status = np.array([SHARD if m >= 0 else STATUS_OF_KIND[k] for k, m in zip(kinds, members)], np.int8)
    return pa.table({"key": keys, "image": images, "status": status, "shard": shards,
                     "members": np.maximum(members, 0).astype(np.int32)}, schema=SCHEMA)


def plan(output: str, storage_options: dict[str, Any], needed: dict[str, str], retry_failed: bool,
         skip_reviewed: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """(sorted done keys for a run needing `needed` task fingerprints, figures); run as a Ray
    task with PLAN_TASK (job.run), so the driver never holds the ledger."""
    fs, root = url_to_fs(output.rstrip("/"), **storage_options)
    reviewed = open_reviews(output, storage_options).image_ids() if skip_reviewed else None
    return done_with_figures(fs, root, needed, retry_failed, reviewed)


# Asks for no CPU: it runs while the predictor actors start, and on device cpu they take every
# CPU (batchseg.run.placement); like the listing, it mostly waits on storage.
PLAN_TASK = {"num_returns": 2, "num_cpus": 0, "max_retries": 3}  # ray.remote(**PLAN_TASK)(plan)


def done_with_figures(fs, root: str, needed: dict[str, str], retry_failed: bool,
                      reviewed: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(sorted (n,) int64 done keys, {"ledger_entries", "runs", "done": images, "done_shards"},
    plus "reviewed": images done only because people reviewed them, when `reviewed` (sorted
    (m,) int64 image ids) is given)."""
    table, runs = read_ledger(fs, root)
    done = done_mask(table, runs, needed, retry_failed)
    stats: dict[str, Any] = {}
    if reviewed is not None and table.num_rows:
        by_people = find_sorted(reviewed, table["image"].to_numpy())[1] & (table["status"].to_numpy() != SHARD)
        stats["reviewed"] = int(np.count_nonzero(by_people & ~done))
        done = _with_shards(table, done | by_people)
    done_shards = int(np.count_nonzero(done & (table["status"].to_numpy() == SHARD)))
    stats = {"ledger_entries": table.num_rows, "runs": len(runs), "done": int(np.count_nonzero(done)) - done_shards,
             "done_shards": done_shards, **stats}
    return np.sort(table["key"].to_numpy()[done]), stats


def read_ledger(fs, root: str) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Newest entry per image over every run (columns key, image, status, members, run = index into
    the returned runs [{"run_id", "fingerprints"}], in run order). Writes a new base when
    COMPACT_AFTER run ledgers have piled up since the newest one."""
    folder = f"{root}/{LEDGER}"
    files = [p for p in (fs.find(folder) if fs.isdir(folder) else []) if p.endswith(".parquet")]
    bases = sorted(p for p in files if p.rsplit("/", 1)[-1].startswith("base-"))
    base_run = _run_of_base(bases[-1]) if bases else ""
    parts: dict[str, list[str]] = {}
    for path in files:
        run = _run_of_part(path)
        if run and run > base_run:
            parts.setdefault(run, []).append(path)
    runs, tables = [], []
    if bases:
        base = _read(fs, bases[-1])
        runs = json.loads(base.schema.metadata[b"batchseg.runs"])
        tables.append(base)
    fingerprints = _fingerprints(fs, root, sorted(parts))
    for run in sorted(parts):
        index = len(runs)
        runs.append({"run_id": run, "fingerprints": fingerprints[run]})
        for t in _read_all(fs, parts[run]):
            tables.append(t.append_column("run", pa.array(np.full(t.num_rows, index, np.int32))))
    table = newest_per_image(pa.concat_tables(tables) if tables else _empty())
    if len(parts) >= COMPACT_AFTER:
        _write_base(fs, folder, table, runs)
    return table, runs


def newest_per_image(table: pa.Table) -> pa.Table:
    """Keep, for each image, the entry of the latest run. `table` holds the runs in time order
    (base first), so a stable sort by image leaves each image's newest entry last."""
    if not table.num_rows:
        return table
    image = table["image"].to_numpy()
    order = np.argsort(image, kind="stable")
    image = image[order]
    last = np.append(image[1:] != image[:-1], True)
    return table.take(pa.array(order[last]))


def done_mask(table: pa.Table, runs: list[dict[str, Any]], needed: dict[str, str], retry_failed: bool) -> np.ndarray:
    """Per entry of `table` (read_ledger's), (n,) bool: done for a run whose tasks have
    fingerprints `needed` (task -> fp)."""
    if not table.num_rows:
        return np.zeros(0, bool)
    covers = np.array([all(r["fingerprints"].get(t) == fp for t, fp in needed.items()) for r in runs], bool)
    status, same_model = table["status"].to_numpy(), covers[table["run"].to_numpy()]
    failed_done = ((status == CONTENT) | ((status == MODEL) & same_model)) & (not retry_failed)
    done = ((status == OK) & same_model) | failed_done
    return _with_shards(table, done)


def _with_shards(table: pa.Table, done: np.ndarray) -> np.ndarray:
    """`done` plus the SHARD entries whose members are all done (a shard is done when all its
    members are; a video's members are markers, hence two levels)."""
    status = table["status"].to_numpy()
    is_shard = status == SHARD
    if not is_shard.any():
        return done
    key, shard, members, base = table["key"].to_numpy(), table["shard"].to_numpy(), table["members"].to_numpy(), done
    for _ in range(2):
        done = base | (is_shard & (_done_members(key, shard, done) >= members))
    return done


def models_digest(fingerprints: dict[str, str]) -> str:
    """A run's task fingerprints ({task: fingerprint}) as one short text."""
    return hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()[:16]


def _done_members(key: np.ndarray, shard: np.ndarray, done: np.ndarray) -> np.ndarray:
    """Per entry: how many done entries name it as their shard (0 for entries that are not shards)."""
    values, counts = np.unique(shard[done & (shard != 0)], return_counts=True)
    out = np.zeros(len(key), np.int64)
    at, hit = find_sorted(values, key)
    out[hit] = counts[at[hit]]
    return out


def _fingerprints(fs, root: str, run_ids: list[str]) -> dict[str, dict[str, str]]:
    """run id -> {task: fingerprint} from each run's report (written when the run starts)."""
    def one(run_id: str) -> dict[str, str]:
        try:
            report = json.loads(fs.cat_file(f"{root}/{RUNS}/{run_id}.json"))
        except FileNotFoundError:
            log.warning("run %s has a ledger but no report; its rows count as done by no model", run_id)
            return {}
        return {t: v["fingerprint"] for t, v in (report.get("provenance") or {}).get("tasks", {}).items()}

    with ThreadPoolExecutor(_READERS) as pool:
        return dict(zip(run_ids, pool.map(one, run_ids)))


def _read_all(fs, paths: list[str]) -> list[pa.Table]:
    with ThreadPoolExecutor(_READERS) as pool:
        return list(pool.map(lambda p: _read(fs, p), paths))


def _read(fs, path: str) -> pa.Table:
    table = pq.read_table(io.BytesIO(fs.cat_file(path)))
    if "image" not in table.column_names:  # written before entries named their image: one per key
        table = table.add_column(1, "image", table["key"])
    return table


def _empty() -> pa.Table:
    return SCHEMA.empty_table().append_column("run", pa.array([], pa.int32()))


def _write_base(fs, folder: str, table: pa.Table, runs: list[dict[str, Any]]) -> None:
    from batchseg.store.storage import atomic_write

    table = table.replace_schema_metadata({b"batchseg.runs": json.dumps(runs).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    path = f"{folder}/base-{runs[-1]['run_id']}.parquet"
    atomic_write(fs, path, sink.getvalue().to_pybytes())
    for old in fs.glob(f"{folder}/base-*.parquet"):  # superseded: the new base holds all they held
        if old != path:
            fs.rm(old)
    log.info("ledger compacted: %d entries of %d runs", table.num_rows, len(runs))


def _run_of_part(path: str) -> str:
    return next((p[4:] for p in path.split("/") if p.startswith("run=")), "")


def _run_of_base(path: str) -> str:
    return path.rsplit("/", 1)[-1].removeprefix("base-").removesuffix(".parquet")

"""Lake scale: planning a run and reading results over many runs, old against new in one run.
Prints figures; asserts nothing.

    python benchmarks/scale.py [--runs 1000] [--rows-per-run 10000] [--s3-rows 100000] [--listing-keys 1000000]

(a) a synthetic output of RUNS x ROWS_PER_RUN small rows on local disk, each run with its
    annotations part, its ledger part and its report:
    - planning: the old driver pass (every Parquet file's image_uri/source_version/error into
      Python lists, kept verbatim below) against the new one (ledger.plan in a Ray task; the
      driver holds an ObjectRef), time and peak RSS of the process that does the work, and the
      driver's RSS during the new plan;
    - reader rows/s over the oldest run with 0 and with all the other rows newer (old: np.isin
      against the sorted ids of newer runs, kept verbatim below; new: results.SeenIds).
(b) S3_ROWS rows of realistic size (~20 KB of RLE each) on a moto S3 server behind a counting
    proxy: bytes read from the store while planning, old against new, against the dataset size.
(c) listing rate and peak memory: benchmarks/listing.py (old find+sort against the streaming
    listing), run from here with LISTING_KEYS local keys and LISTING_KEYS / 10 on S3.
Each measured planning runs in a fresh process; RSS figures are its VmHWM less the resident
set it had before the work (interpreter and imports).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from batchseg import ledger  # noqa: E402
from batchseg.rows.schema import ROW  # noqa: E402

FINGERPRINTS = {"instance": "f" * 32}


# ---------------------------------------------------------------------------------------------
# before: the planning and reader code this change replaced, verbatim (batchseg 28b897f)


def old_done_keys(fs, annotations: str, retry_failed: bool) -> np.ndarray:
    import hashlib

    def done_key(uri: str, version: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{uri}\n{version}".encode()).digest()[:8], "big", signed=True)

    keys = []
    paths = sorted(p for p in (fs.find(annotations) if fs.isdir(annotations) else []) if p.endswith(".parquet"))
    for path in paths:
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=["image_uri", "source_version", "error"]):
                for uri, version, error in zip(*(batch.column(i).to_pylist() for i in range(3))):
                    if error is None or not retry_failed:
                        keys.append(done_key(uri, version or ""))
    return np.unique(np.asarray(keys, dtype=np.int64))


def old_fresh(ids: np.ndarray, seen: np.ndarray) -> np.ndarray:
    return ~np.isin(ids, seen, assume_unique=False)


# ---------------------------------------------------------------------------------------------
# synthetic outputs


def run_id(r: int) -> str:
    return f"20260101T000000Z-{r:06d}"


def write_output(root: Path, runs: int, rows_per_run: int, instances=None, fs=None) -> int:
    """RUNS runs of distinct images; returns the bytes of annotations written."""
    total = 0
    for r in range(runs):
        uris = [f"s3://lake/img/{r * rows_per_run + i:010d}.jpg" for i in range(rows_per_run)]
        versions = ["etag"] * rows_per_run
        keys = ledger.done_keys_of(uris, versions)
        table = pa.table({
            "image_id": pa.array(np.arange(r * rows_per_run, (r + 1) * rows_per_run, dtype=np.int64)),
            "image_uri": uris, "width": pa.array(np.full(rows_per_run, 640, np.int32)),
            "height": pa.array(np.full(rows_per_run, 480, np.int32)),
            "source_size": pa.array(np.full(rows_per_run, 100_000, np.int64)), "source_version": versions,
            "instances": instances(rows_per_run) if instances else pa.nulls(rows_per_run, ROW.field("instances").type),
        })
        table = pa.table({f.name: table[f.name] if f.name in table.column_names else pa.nulls(rows_per_run, f.type)
                          for f in ROW}, schema=ROW)
        entries = ledger.entries(keys, table["image_id"].to_numpy(), [None] * rows_per_run,
                                 np.zeros(rows_per_run, np.int64),
                                 np.full(rows_per_run, -1, np.int32))
        report = {"run_id": run_id(r), "provenance": {"tasks": {t: {"fingerprint": fp} for t, fp in FINGERPRINTS.items()}}}
        total += _put(root, f"annotations/run={run_id(r)}/part-00000.parquet", _parquet(table), fs)
        _put(root, f"_ledger/run={run_id(r)}/part-00000.parquet", _parquet(entries), fs)
        _put(root, f"runs/{run_id(r)}.json", json.dumps(report).encode(), fs)
    return total


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _put(root, name: str, data: bytes, fs) -> int:
    if fs is None:
        path = Path(root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        fs.pipe_file(f"{root}/{name}", data)
    return len(data)


def realistic_instances(rng):
    """~20 KB of RLE per row: 10 instances with 2 KB of counts each."""
    from batchseg.rows.schema import INSTANCE

    alphabet = np.frombuffer(b"0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz", np.uint8)

    def make(n: int) -> pa.Array:
        rows = []
        for _ in range(n):
            rows.append([{"category_id": 1, "bbox": [1.0, 2.0, 30.0, 40.0], "score": 0.9, "area": 1200,
                          "segmentation": {"size": [480, 640], "counts": rng.choice(alphabet, 2048).tobytes().decode()}}
                         for _ in range(10)])
        return pa.array(rows, pa.list_(pa.field("item", INSTANCE, nullable=False)))

    return make


# ---------------------------------------------------------------------------------------------
# measurements in child processes


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def child(what: str, root: str, options: str) -> None:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(root, **json.loads(options))
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    if what == "old":
        done = old_done_keys(fs, f"{path}/annotations", False)
    else:
        done, _ = ledger.done_with_figures(fs, path, FINGERPRINTS, False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mib": (_rss_kib("VmHWM") - base) / 1024, "done": int(len(done))}))


def measure(what: str, root: str, options: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", what, root, json.dumps(options)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_planning_local(root: Path, runs: int, rows_per_run: int) -> None:
    rows = runs * rows_per_run
    print(f"(a) planning over {rows:,} rows in {runs} runs, local disk")
    old = measure("old", str(root), {})
    print(f"    old (driver reads every Parquet file): {old['seconds']:7.1f} s, peak RSS +{old['peak_mib']:6.0f} MiB, "
          f"{old['done']:,} done")
    first = measure("new", str(root), {})
    print(f"    new, first plan (reads {runs} ledgers, writes a base): {first['seconds']:6.1f} s, "
          f"peak RSS +{first['peak_mib']:6.0f} MiB, {first['done']:,} done")
    again = measure("new", str(root), {})
    print(f"    new, next plan (reads the base):        {again['seconds']:6.1f} s, peak RSS +{again['peak_mib']:6.0f} MiB")
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    keys_ref, stats_ref = ray.remote(**ledger.PLAN_TASK)(ledger.plan).remote(str(root), {}, FINGERPRINTS, False)
    stats = ray.get(stats_ref)
    seconds = time.perf_counter() - start
    print(f"    new through Ray (ledger.plan task): {seconds:6.1f} s; driver RSS +{(_rss_kib('VmRSS') - base) / 1024:.0f} MiB "
          f"while {stats['done']:,} keys sit in the object store")
    del keys_ref
    ray.shutdown()


def bench_reader(root: Path, runs: int, rows_per_run: int) -> None:
    from batchseg.store.results import SeenIds, open_results

    results = open_results(str(root))
    oldest = results._runs_newest_first()[-1][1]
    newer = np.arange(rows_per_run, runs * rows_per_run, dtype=np.int64)  # every other run's image ids

    def rate(fresh, path_list) -> float:
        n, start = 0, time.perf_counter()
        for path in path_list:
            for batch in results._batches(path, None, 256):
                ids = batch.column("image_id").to_numpy()
                for row, keep in zip(batch.to_pylist(), fresh(ids)):
                    n += bool(keep)
        return n / (time.perf_counter() - start)

    empty, full = SeenIds(), SeenIds()
    for chunk in np.array_split(newer, runs - 1):  # as the reader builds it: one add per run
        full.add(chunk)
    print(f"(a) reader rows/s over the oldest run ({rows_per_run:,} rows), 256-row batches")
    rate(lambda ids: ~empty.contains(ids), oldest)  # warm the page cache
    old0 = rate(lambda ids: old_fresh(ids, np.zeros(0, np.int64)), oldest)
    old1 = rate(lambda ids: old_fresh(ids, newer), oldest)
    new0 = rate(lambda ids: ~empty.contains(ids), oldest)
    new1 = rate(lambda ids: ~full.contains(ids), oldest)
    print(f"    old: {old0:9,.0f} rows/s with 0 newer rows, {old1:9,.0f} with {len(newer):,} ({old1 / old0:.2f}x)")
    print(f"    new: {new0:9,.0f} rows/s with 0 newer rows, {new1:9,.0f} with {len(newer):,} ({new1 / new0:.2f}x; "
          f"{len(full.levels)} levels)")
    start, n = time.perf_counter(), 0
    for _ in results.rows(["image_uri"]):
        n += 1
    print(f"    new, whole dataset newest-first: {n:,} rows at {n / (time.perf_counter() - start):,.0f} rows/s")


def bench_planning_s3(rows: int) -> None:
    import socket

    import s3fs

    from tests.faulty_proxy import FaultyProxy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("bench")
        per_run = 2000
        size = write_output("bench/out", rows // per_run, per_run, realistic_instances(np.random.default_rng(0)), fs)
        print(f"(b) planning over {rows:,} rows of ~{size / rows / 1024:.0f} KB ({size / 2**30:.2f} GiB) on a moto S3 server")
        for what in ("old", "new"):
            with FaultyProxy(endpoint) as proxy:
                result = measure(what, "s3://bench/out", {"client_kwargs": {"endpoint_url": proxy.url},
                                                          "skip_instance_cache": True})
            print(f"    {what}: read {proxy.bytes_out / 2**20:8.1f} MiB = {100 * proxy.bytes_out / size:6.2f} % of the "
                  f"dataset in {result['seconds']:.1f} s ({len(proxy.requests_seen)} requests)")
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--rows-per-run", type=int, default=10_000)
    parser.add_argument("--s3-rows", type=int, default=100_000)
    parser.add_argument("--listing-keys", type=int, default=1_000_000)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    if "a" not in skip:
        root = Path(tempfile.mkdtemp(prefix="batchseg-scale-"))
        try:
            start = time.perf_counter()
            size = write_output(root, args.runs, args.rows_per_run)
            print(f"synthetic output: {args.runs * args.rows_per_run:,} rows, {args.runs} runs, "
                  f"{size / 2**20:.0f} MiB of annotations, made in {time.perf_counter() - start:.0f} s")
            bench_reader(root, args.runs, args.rows_per_run)
            bench_planning_local(root, args.runs, args.rows_per_run)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if "b" not in skip:
        bench_planning_s3(args.s3_rows)
    if "c" not in skip:
        sys.path.insert(0, str(REPO / "benchmarks"))
        import listing

        print(f"(c) listing {args.listing_keys:,} local keys and {args.listing_keys // 10:,} on a moto S3 server")
        listing.bench_local(args.listing_keys, False, None)
        listing.bench_s3(args.listing_keys // 10, [16], 0.0)


if __name__ == "__main__":
    main()

"""Listing rate and peak memory: the old listing (fs.find(detail=True), sorted) against the new
streaming one (sources.iter_listing), over the same trees in the same run. Prints figures;
asserts nothing.

    python benchmarks/listing.py [--local-keys 1000000] [--s3-keys 100000] [--s3-concurrency 1 16]
                                 [--s3-latency-ms 50] [--repeat 2] [--keep] [--pipeline]

- local: a tree of empty files, 1000 per folder (KEYS/4 under each of part0..part3), listed
  whole and part0 alone (a quarter of the keys), so memory can be compared across sizes.
  Files are made once and deleted at the end (--keep keeps them); the page cache is warm.
- S3: a moto S3 server in a process of its own, its bucket filled through moto's backend (an
  HTTP PUT per key would take far longer than the listing), then listed over HTTP like S3.
  Note moto answers each ListObjectsV2 by scanning and sorting the whole matching prefix,
  so its figures compare the two listings with each other, not with S3.

Each listing runs in a fresh process; memory is its VmHWM (peak resident set) less the
resident set it had before listing (interpreter and imports), so both count only the listing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PER_FOLDER = 1000
REPEAT = 1  # --repeat
PIPELINE = False  # --pipeline


# ---------------------------------------------------------------------------------------------
# the two listings, measured in a child process


def old_listing(root: str, storage_options: dict):
    """Today's listing before this change: one fs.find that returns after the last page, then
    sorted; kept here verbatim so the benchmark outlives it."""
    from fsspec.core import url_to_fs

    from batchseg.inputs.names import is_image_name, is_shard_name
    from batchseg.inputs.sources import _version

    fs, path = url_to_fs(root, **storage_options)
    entries = fs.find(path, detail=True, withdirs=False)
    for name in sorted(entries):
        info = entries[name]
        shard = is_shard_name(name)
        if info.get("type", "file") == "file" and (shard or is_image_name(name)):
            yield {"uri": fs.unstrip_protocol(name), "size": int(info.get("size") or 0), "version": _version(info),
                   "is_shard": shard}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def child(impl: str, root: str, options: str, concurrency: int | None) -> None:
    from fsspec.core import url_to_fs

    from batchseg.inputs import sources

    storage_options = json.loads(options)
    fs, path = url_to_fs(root, **storage_options)
    fs.exists(path)  # imports, client, connection: the same for both, so out of the figures
    requests = [0]
    if hasattr(fs, "s3"):  # count list requests: a figure the machine's load does not blur
        fs.s3.meta.events.register("before-send.s3.ListObjectsV2", lambda **_: requests.__setitem__(0, requests[0] + 1))
    base = _rss_kib("VmRSS:")
    start = time.perf_counter()
    first = None
    count = 0
    if impl == "old":
        for _row in old_listing(root, storage_options):
            first = first or time.perf_counter()
            count += 1
    else:
        for page in sources.iter_listing(root, storage_options, concurrency=concurrency):
            first = first or time.perf_counter()
            count += len(page)
    seconds = time.perf_counter() - start
    print(json.dumps({"keys": count, "seconds": seconds, "first_row_s": (first or start) - start,
                      "listing_mib": (_rss_kib("VmHWM:") - base) / 1024, "base_mib": base / 1024,
                      "requests": requests[0]}))


def measure(impl: str, root: str, storage_options: dict, concurrency: int | None = None) -> dict:
    """The fastest of REPEAT runs: other work on a shared machine only ever slows one down."""
    cmd = [sys.executable, __file__, "--child", impl, root, json.dumps(storage_options)]
    if concurrency:
        cmd += ["--concurrency", str(concurrency)]
    runs = []
    for _ in range(REPEAT):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda r: r["seconds"])


def report(where: str, impl: str, result: dict) -> None:
    rate = result["keys"] / result["seconds"]
    print(f"{where:<22} {impl:<16} {result['keys']:>9,d} keys  {result['seconds']:7.1f} s  {rate:>9,.0f} keys/s  "
          f"first row {result['first_row_s']:6.2f} s  listing memory {result['listing_mib']:7.1f} MiB"
          + (f"  {result['requests']} LIST requests" if result["requests"] else ""), flush=True)


def pipeline_child(root: str, options: str, split: str) -> None:
    """The pipeline's listing stage (pipeline.listing) over `root` on a fresh local Ray: when
    rows reach the stage after it, with the folder as one listing unit or as split_folder's."""
    import numpy as np
    import ray

    from batchseg.run import pipeline
    from batchseg.inputs import sources
    from batchseg.config import StorageConfig
    from batchseg.store.ledger import DoneSet

    storage_options = json.loads(options)
    endpoint = storage_options.get("client_kwargs", {}).get("endpoint_url")
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    start = time.perf_counter()
    folder = sources.classify(root, storage_options)
    units = sources.split_folder(folder, storage_options) if split == "split" else [folder]
    planned = time.perf_counter() - start
    arrivals = []
    cpus, retries = int(ray.cluster_resources()["CPU"]), 3
    ds = pipeline.listing(units, StorageConfig(endpoint_url=endpoint), DoneSet(None), 1000, cpus, retries)  # few blocks: the driver keeps up
    for batch in ds.iter_batches(batch_size=None, prefetch_batches=0):
        arrivals.append((time.perf_counter() - start, len(batch["uri"])))
    at, counts = np.array(arrivals).T
    half = at[np.searchsorted(np.cumsum(counts), counts.sum() / 2)]
    print(json.dumps({"units": len(units), "plan_s": planned, "first_s": at[0], "half_s": half, "all_s": at[-1],
                      "keys": int(counts.sum())}))


def bench_pipeline(root: str, storage_options: dict, where: str) -> None:
    """First rows out of the listing stage: the folder as one unit against split_folder's units."""
    for split in ("whole", "split"):
        out = subprocess.run([sys.executable, __file__, "--pipeline-child", root, json.dumps(storage_options), split],
                             capture_output=True, text=True, check=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{where:<22} pipeline, {split:<5} {r['units']:>3} unit(s) {r['keys']:>9,d} keys  planned in "
              f"{r['plan_s']:5.2f} s; rows out: first {r['first_s']:6.2f} s  half {r['half_s']:6.2f} s  "
              f"all {r['all_s']:6.2f} s", flush=True)


# ---------------------------------------------------------------------------------------------
# local tree


def make_tree(root: Path, keys: int) -> None:
    folders = keys // PER_FOLDER
    for f in range(folders):
        folder = os.path.join(root, f"part{f * 4 // folders}", f"d{f:05d}")
        os.makedirs(folder)
        for i in range(PER_FOLDER):
            os.close(os.open(os.path.join(folder, f"{i:04d}.jpg"), os.O_CREAT | os.O_WRONLY, 0o644))


def bench_local(keys: int, keep: bool, where: str | None) -> None:
    work = Path(tempfile.mkdtemp(prefix="batchseg-listing-", dir=where))
    try:
        start = time.perf_counter()
        make_tree(work, keys)
        print(f"local tree: {keys:,d} empty files in {keys // PER_FOLDER} folders made in "
              f"{time.perf_counter() - start:.0f} s ({work})", flush=True)
        for root, name in ((work / "part0", "local part0/"), (work, "local (all)")):
            for impl in ("old", "new"):
                report(name, impl, measure(impl, str(root), {}))
        if PIPELINE:
            bench_pipeline(str(work), {}, "local (all)")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# S3 API server


def serve_moto(port: int, keys: int) -> None:
    """Run moto's S3 server here, fill bucket `bench` (KEYS/4 keys under each of p0..p3,
    1000 a prefix) through its backend, say "ready", and serve until killed."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.s3.models import s3_backends

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket("bench", "us-east-1")
    folders = keys // PER_FOLDER
    for f in range(folders):
        for i in range(PER_FOLDER):
            backend.put_object("bench", f"p{f * 4 // folders}/d{f:04d}/{i:04d}.jpg", b"")
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def bench_s3(keys: int, concurrency: list[int], latency_ms: float) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(creds)
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, __file__, "--serve-moto", str(port), "--s3-keys", str(keys)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        print(f"S3 server: {keys:,d} keys in bucket bench, filled in {time.perf_counter() - start:.0f} s", flush=True)
        endpoint = f"http://127.0.0.1:{port}"
        runs = [("", endpoint)]
        if latency_ms:
            proxy = DelayProxy(endpoint, latency_ms / 1000)
            runs.append((f" +{latency_ms:g}ms", proxy.url))
        for suffix, url in runs:
            options = {"client_kwargs": {"endpoint_url": url}}
            for root in ("s3://bench/p0/", "s3://bench/")[1 if suffix else 0:]:
                name = "s3 " + root.split("://", 1)[1] + suffix
                report(name, "old", measure("old", root, options))
                for c in concurrency:
                    report(name, f"new c={c}", measure("new", root, options, c))
                if PIPELINE and root == "s3://bench/":
                    bench_pipeline(root, options, name)
    finally:
        server.terminate()
        server.wait(timeout=30)


class DelayProxy:
    """Forwards each request to `upstream` after `delay` seconds, many at once."""

    def __init__(self, upstream: str, delay: float):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        target = urlsplit(upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                time.sleep(delay)
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                head = self.command == "HEAD"  # no body, but the object's length
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if head else str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                conn.close()

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-keys", type=int, default=1_000_000)
    parser.add_argument("--s3-keys", type=int, default=100_000)
    parser.add_argument("--s3-concurrency", type=int, nargs="+", default=[16])
    parser.add_argument("--repeat", type=int, default=1, help="run each listing N times, report the fastest")
    parser.add_argument("--keep", action="store_true", help="keep the local tree")
    parser.add_argument("--dir", default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
                        help="where the local tree goes (default /dev/shm: a tmpfs makes a million files in "
                             "seconds where a busy disk takes an hour; listing costs the same CPU as a warm disk)")
    parser.add_argument("--s3-latency-ms", type=float, default=0,
                        help="also list through a proxy that delays each request, as S3's own latency would")
    parser.add_argument("--pipeline", action="store_true",
                        help="also time the pipeline's listing stage over the whole tree / bucket: the folder as "
                             "one listing task against split_folder's units (rows out: first, half, all)")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "ROOT", "OPTIONS"), help=argparse.SUPPRESS)
    parser.add_argument("--pipeline-child", nargs=3, metavar=("ROOT", "OPTIONS", "SPLIT"), help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-moto", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global REPEAT, PIPELINE
    REPEAT, PIPELINE = max(1, args.repeat), args.pipeline
    if args.child:
        child(*args.child, args.concurrency)
    elif args.pipeline_child:
        pipeline_child(*args.pipeline_child)
    elif args.serve_moto:
        serve_moto(args.serve_moto, args.s3_keys)
    else:
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; python {sys.version.split()[0]}; "
              f"fastest of {REPEAT}", flush=True)
        if args.local_keys:
            bench_local(args.local_keys, args.keep, args.dir)
        if args.s3_keys:
            bench_s3(args.s3_keys, args.s3_concurrency, args.s3_latency_ms)


if __name__ == "__main__":
    main()

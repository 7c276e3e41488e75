"""The output lease and atomic writes, on real parts: local files, the moto S3 server on
127.0.0.1, separate processes released by a barrier, a proxy that answers 503.

moto 5.2.5's conditional PUT is check-then-write (moto/s3/responses.py put_object: get_object,
then put_object, no lock, and the server is threaded): measured here, 4 racers on one key gave
two "created" answers in 1 of 200 rounds. Real S3 makes the check atomic. So on the moto server
the race tests check what the lease guarantees on such a store: exactly one run holds the lease
once acquire() returns (each winner reads the lease back after settle_s), and they report how
many rounds the store itself granted both creates.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.core import url_to_fs

from batchseg.config import ConfigError
from batchseg.store.lease import (
    LEASE,
    Lease,
    LeaseLost,
    OutputLocked,
    interrupt_main,
    open_store,
)
from batchseg.store.storage import atomic_open, atomic_write
from tests.faulty_proxy import FaultyProxy

MiB = 2**20
ROUNDS = 20


# ---- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3(s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="lease")
    return client


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(base URI, storage options, raw client or None) of a fresh place to write."""
    if request.param == "local":
        return str(tmp_path), {}, None
    client = request.getfixturevalue("s3")
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://lease/{uuid.uuid4().hex[:8]}", {"client_kwargs": {"endpoint_url": endpoint}}, client


class SwitchProxy(FaultyProxy):
    """503 SlowDown for every request while `failing` is set, and for requests number
    `fail_from` .. `fail_from + fail_count - 1`."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, self._fault)
        self.failing, self.fail_from, self.fail_count = False, 0, 0

    def _fault(self, method: str, path: str, n: int) -> str | None:
        return "before" if self.failing or self.fail_from <= n < self.fail_from + self.fail_count else None


def through(proxy: SwitchProxy, retries: int = 2) -> dict:
    """Storage options reaching S3 through `proxy`: botocore does not retry, and the s3fs
    instance they name (fsspec caches it) makes `retries` attempts (5 by default)."""
    opts = {"client_kwargs": {"endpoint_url": proxy.url},
            "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}
    url_to_fs("s3://lease", **opts)[0].retries = retries
    return opts


def objects(client, prefix: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket="lease", Prefix=prefix).get("Contents", [])]


def uploads(client, prefix: str) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket="lease", Prefix=prefix).get("Uploads", [])]


def leftovers(where, base: str) -> list[str]:
    """Everything under `base` (local files, S3 objects, unfinished S3 uploads)."""
    _, _, client = where
    if client is None:
        return sorted(str(p.relative_to(base)) for p in Path(base).rglob("*") if p.is_file())
    key = base.split("/", 3)[3]
    return objects(client, key) + [f"upload:{k}" for k in uploads(client, key)]


# ---- atomic writes ------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [7, 6 * MiB], ids=["one-put", "multipart"])
def test_fsspec_open_commits_a_truncated_object_when_the_block_raises(s3, s3_endpoint, size):
    """Why atomic_open exists: fsspec's AbstractBufferedFile.__exit__ calls close(), which
    flushes and completes the upload whatever the exception."""
    fs, path = url_to_fs(f"s3://lease/torn/{size}.bin", client_kwargs={"endpoint_url": s3_endpoint})
    with pytest.raises(RuntimeError):
        with fs.open(path, "wb", block_size=5 * MiB) as f:
            f.write(b"x" * size)
            raise RuntimeError("the task failed half way")
    assert s3.head_object(Bucket="lease", Key=f"torn/{size}.bin")["ContentLength"] == size


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("size", [1000, 12 * MiB], ids=["one-put", "multipart"])
def test_atomic_open_leaves_nothing_when_the_block_raises(where, size, error):
    base, opts, _ = where
    fs, path = url_to_fs(f"{base}/out/part-0.parquet", **opts)
    with pytest.raises(error):
        with atomic_open(fs, path, part_size=5 * MiB) as f:
            for _ in range(size // 1000):
                f.write(b"y" * 1000)  # a 12 MiB body has uploaded two parts by now
            raise error()
    assert leftovers(where, base) == []


@pytest.mark.parametrize("size", [1000, 12 * MiB + 5], ids=["one-put", "multipart"])
def test_atomic_open_writes_everything_on_a_clean_exit(where, size):
    base, opts, _ = where
    fs, path = url_to_fs(f"{base}/out/blob.bin", **opts)
    data = os.urandom(size)
    with atomic_open(fs, path, part_size=5 * MiB) as f:
        for i in range(0, size, 3 * MiB):
            f.write(data[i:i + 3 * MiB])
    assert fs.cat_file(path) == data
    assert leftovers(where, base) == (["out/blob.bin"] if where[2] is None else [path.split("/", 1)[1]])


def test_pyarrow_can_write_parquet_through_atomic_open(where):
    base, opts, _ = where
    fs, path = url_to_fs(f"{base}/t.parquet", **opts)
    table = pa.table({"a": list(range(1000))})
    with atomic_open(fs, path) as f:
        pq.write_table(table, f)  # closes f; the commit still happens on exit
    with fs.open(path, "rb") as f:
        assert pq.read_table(f).equals(table)


@pytest.mark.parametrize("size", [10, 6 * MiB], ids=["one-put", "multipart"])
def test_exclusive_write_never_replaces(where, size):
    base, opts, _ = where
    fs, path = url_to_fs(f"{base}/once.bin", **opts)
    atomic_write(fs, path, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        with atomic_open(fs, path, exclusive=True, part_size=5 * MiB) as f:
            f.write(b"z" * size)
    assert fs.cat_file(path) == b"first"
    assert len(leftovers(where, base)) == 1  # no temporary, no unfinished upload


@pytest.mark.parametrize("outage_ends", [True, False])
def test_a_failed_part_upload_leaves_nothing_visible(s3, s3_endpoint, caplog, outage_ends):
    """A network outage mid-upload (503 SlowDown on every attempt at the second part, past
    s3fs's retries): no object. If the store is back for the abort, no parts are left either;
    if not, the unfinished upload stays (invisible; a bucket lifecycle rule removes it)."""
    prefix = f"outage-{outage_ends}/"
    with SwitchProxy(s3_endpoint) as proxy:
        fs, path = url_to_fs(f"s3://lease/{prefix}part-0.parquet", **through(proxy))
        with pytest.raises(OSError):
            with atomic_open(fs, path, part_size=5 * MiB) as f:
                f.write(b"w" * 5 * MiB)  # part 1 goes up
                proxy.failing = True
                try:
                    f.write(b"w" * 5 * MiB)  # part 2 does not
                finally:
                    proxy.failing = not outage_ends
        assert proxy.injected >= 2
    assert objects(s3, prefix) == []
    assert len(uploads(s3, prefix)) == (0 if outage_ends else 1)
    assert outage_ends or "could not abort the multipart upload" in caplog.text


# ---- the lease: one holder -----------------------------------------------------------------------

def test_a_missing_bucket_is_an_error_not_a_free_lease(s3_endpoint):
    with pytest.raises(FileNotFoundError, match="bucket"):
        Lease("s3://no-such-bucket/out", {"client_kwargs": {"endpoint_url": s3_endpoint}}, "run-a").acquire()


def test_a_second_run_is_refused_with_one_line_naming_the_holder(where):
    base, opts, _ = where
    with Lease(base, opts, "run-a", heartbeat_s=5, ttl_s=60):
        with pytest.raises(OutputLocked) as e:
            Lease(base, opts, "run-b").acquire()
    text = str(e.value)
    assert isinstance(e.value, ConfigError) and "\n" not in text
    for part in ("run run-a", f"host {socket.gethostname()}", f"pid {os.getpid()}", "s ago by the store's clock",
                 f"delete {base}/{LEASE}"):
        assert part in text
    assert leftovers(where, base) == []  # released


def _racer(outputs, opts, barrier, results, lease_kwargs):
    """One run per round: wait at the barrier with the other racer, try to take the lease, report,
    hold it until the main process has looked, then release."""
    caught = []

    class Catch(logging.Handler):
        def emit(self, record):
            caught.append(record.getMessage())

    logging.getLogger("batchseg.store.lease").addHandler(Catch())
    for out in outputs:
        barrier.wait()
        try:
            lease = Lease(out, opts, f"run-{os.getpid()}", **lease_kwargs).acquire()
        except OutputLocked:
            lease = None
        results.put((out, os.getpid(), lease.token if lease else None))
        barrier.wait()  # the main process reads the lease now
        barrier.wait()
        if lease:
            lease.release()
    results.put(("logs", os.getpid(), caught))


def race(outputs, opts, lease_kwargs, check_round):
    """Two racer processes per round over `outputs`; calls check_round(out, tokens_of_winners)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3, timeout=120), ctx.Queue()
    racers = [ctx.Process(target=_racer, args=(outputs, opts, barrier, results, lease_kwargs)) for _ in range(2)]
    for p in racers:
        p.start()
    logs = []
    try:
        for out in outputs:
            barrier.wait()
            barrier.wait()
            got = [results.get(timeout=120) for _ in range(2)]
            assert {g[0] for g in got} == {out}
            check_round(out, [g[2] for g in got if g[2]])
            barrier.wait()
        logs = [results.get(timeout=120)[2] for _ in range(2)]
    finally:
        for p in racers:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in racers)
    return [line for lines in logs for line in lines]


def held_token(out, opts):
    snap = open_store(out, opts).read()
    return json.loads(snap.data)["token"] if snap else None


def test_two_runs_released_at_the_same_instant_exactly_one_holds(where):
    base, opts, _ = where
    outputs = [f"{base}/r{i}" for i in range(ROUNDS)]
    started = time.time()

    def check(out, winners):
        assert len(winners) == 1, f"{out}: {len(winners)} runs hold the lease"
        assert held_token(out, opts) == winners[0]

    logs = race(outputs, opts, {"heartbeat_s": 10, "ttl_s": 60}, check)
    doubles = sum("not atomic" in line for line in logs)
    print(f"\n{ROUNDS} rounds in {time.time() - started:.1f} s: exactly one holder each round; "
          f"the store accepted both creates in {doubles} round(s)")
    assert all(held_token(out, opts) is None for out in outputs)  # each winner released


def _stale(out, opts, client, run_id="gone", host="elsewhere", pid=1, age_s=None, ttl_s=1) -> None:
    """A lease written by another run (left by one that is gone, unless renewed since)."""
    body = json.dumps({"run_id": run_id, "host": host, "pid": pid, "token": uuid.uuid4().hex,
                       "ttl_s": ttl_s}).encode()
    _, root = url_to_fs(out, **opts)
    if client is None:
        os.makedirs(root, exist_ok=True)
        with open(f"{root}/{LEASE}", "wb") as f:
            f.write(body)
        if age_s:
            then = time.time() - age_s
            os.utime(f"{root}/{LEASE}", (then, then))
    else:
        bucket, key = root.split("/", 1)
        client.put_object(Bucket=bucket, Key=f"{key}/{LEASE}", Body=body)


def test_an_expired_lease_is_taken_over_by_exactly_one_of_two_racers(where):
    base, opts, client = where
    outputs = [f"{base}/t{i}" for i in range(10)]
    for out in outputs:
        _stale(out, opts, client, age_s=5)
    if client is not None:
        time.sleep(2.5)  # S3's LastModified has whole seconds: be over ttl_s=1 by its clock

    def check(out, winners):
        assert len(winners) == 1, f"{out}: {len(winners)} runs took over the lease"
        assert held_token(out, opts) == winners[0]

    logs = race(outputs, opts, {"heartbeat_s": 10, "ttl_s": 60}, check)
    doubles = sum("not atomic" in line for line in logs)
    assert sum("took over from run gone" in line for line in logs) == len(outputs) + doubles
    print(f"\n{len(outputs)} takeovers: exactly one winner each; the store accepted both in {doubles} round(s)")


def test_a_live_lease_is_not_taken_over(where):
    base, opts, client = where
    _stale(base, opts, client, ttl_s=30)  # written just now: alive by the store's clock
    with pytest.raises(OutputLocked, match="run gone"):
        Lease(base, opts, "run-b").acquire()


def test_a_lease_whose_process_is_gone_on_this_host_is_taken_over_at_once(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    _stale(str(tmp_path), {}, None, host=socket.gethostname(), pid=dead)
    with Lease(str(tmp_path), {}, "run-b", heartbeat_s=5, ttl_s=60) as lease:
        assert held_token(str(tmp_path), {}) == lease.token


def test_a_create_granted_twice_by_the_store_leaves_one_holder(where, caplog):
    """What moto's check-then-write allows, made certain: the store says "created" to this run,
    then the other racer's PUT lands. The read-back after settle_s sees it; this run backs off."""
    base, opts, client = where
    lease = Lease(base, opts, "run-a", heartbeat_s=5, ttl_s=60)
    create = lease.store.create

    def racing_create(data):
        version = create(data)
        _stale(base, opts, client, run_id="run-b", ttl_s=60)
        return version

    lease.store.create = racing_create
    with pytest.raises(OutputLocked, match="run run-b"):
        lease.acquire()
    assert "not atomic" in caplog.text
    assert json.loads(open_store(base, opts).read().data)["run_id"] == "run-b"


def test_other_filesystems_get_an_advisory_lease(caplog):
    """memory://, gs://, az://...: batchseg knows no atomic conditional write there; says so."""
    with Lease("memory://leased", {}, "run-a", heartbeat_s=5, ttl_s=60):
        with pytest.raises(OutputLocked, match="run run-a"):
            Lease("memory://leased", {}, "run-b", settle_s=0).acquire()
    assert "advisory" in caplog.text
    assert open_store("memory://leased", {}).read() is None


# ---- the lease: losing it --------------------------------------------------------------------------

def _remove(where, out) -> None:
    _, opts, client = where
    _, root = url_to_fs(out, **opts)
    if client is None:
        os.unlink(f"{root}/{LEASE}")
    else:
        bucket, key = root.split("/", 1)
        client.delete_object(Bucket=bucket, Key=f"{key}/{LEASE}")


def test_a_holder_whose_lease_is_deleted_notices_at_its_next_heartbeat(where):
    base, opts, _ = where
    called = []
    with pytest.raises(LeaseLost, match="lost the lease.*it was deleted"):
        with Lease(base, opts, "run-a", heartbeat_s=0.3, ttl_s=30, on_lost=called.append) as lease:
            lease.check()
            _remove(where, base)
            assert lease.lost.wait(timeout=5)
            with pytest.raises(LeaseLost):
                lease.check()
    assert len(called) == 1 and isinstance(called[0], LeaseLost)


def test_a_holder_taken_over_stops_and_never_deletes_the_new_lease(where):
    base, opts, client = where
    with pytest.raises(LeaseLost, match="taken by run intruder"):
        with Lease(base, opts, "run-a", heartbeat_s=0.3, ttl_s=30) as lease:
            fence = pickle.loads(pickle.dumps(lease.fence()))  # travels to Ray write tasks
            assert fence() is None
            _stale(base, opts, client, run_id="intruder")  # as if it had won a takeover
            assert lease.lost.wait(timeout=5)
            with pytest.raises(LeaseLost):
                fence()
    assert json.loads(open_store(base, opts).read().data)["run_id"] == "intruder"


def test_release_never_deletes_another_runs_lease(where):
    """Even when the heartbeat has not yet noticed the takeover."""
    base, opts, client = where
    lease = Lease(base, opts, "run-a", heartbeat_s=10, ttl_s=60).acquire()
    _stale(base, opts, client, run_id="intruder")
    lease.release()
    assert json.loads(open_store(base, opts).read().data)["run_id"] == "intruder"


def test_interrupt_main_ends_the_block_with_lease_lost(tmp_path):
    with pytest.raises(LeaseLost) as e:
        with Lease(str(tmp_path), {}, "run-a", heartbeat_s=0.2, ttl_s=30, on_lost=interrupt_main):
            os.unlink(tmp_path / LEASE)
            deadline = time.time() + 10
            while time.time() < deadline:  # stands for a driver blocked in Ray Data
                time.sleep(0.01)
    assert isinstance(e.value.__cause__, KeyboardInterrupt)


def logged(caplog, text: str, timeout: float) -> int:
    """How many log records contain `text`, waiting up to `timeout` s for the first."""
    deadline = time.monotonic() + timeout
    while not (n := sum(text in r.getMessage() for r in caplog.records)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def test_heartbeat_errors_do_not_kill_the_heartbeat(s3_endpoint, s3, caplog):
    caplog.set_level(logging.INFO, logger="batchseg.store.lease")
    with SwitchProxy(s3_endpoint) as proxy:
        with Lease("s3://lease/flaky", through(proxy), "run-a", heartbeat_s=0.3, retry_s=0.3, ttl_s=30) as lease:
            proxy.failing = True  # every request answers 503 SlowDown
            assert logged(caplog, "renewal failed (OSError: [Errno 16] Please reduce your request rate.)", 30)
            deadline = time.monotonic() + 30
            while logged(caplog, "renewal failed", 0) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            proxy.failing = False
            assert logged(caplog, "renewed again after", 30)
            beats = lease.beats
            time.sleep(1)
            assert lease.beats > beats and not lease.lost.is_set() and lease._thread.is_alive()
        assert logged(caplog, "renewal failed", 0) >= 3
    assert objects(s3, "flaky/") == []  # released


def test_a_store_unreachable_until_the_lease_would_expire_loses_it(s3_endpoint, s3):
    with SwitchProxy(s3_endpoint) as proxy:
        lease = Lease("s3://lease/down", through(proxy, retries=5), "run-a", heartbeat_s=0.6, ttl_s=3).acquire()
        proxy.failing = True  # and each renewal now takes seconds of s3fs retries
        assert lease.lost.wait(timeout=10)
        # it gives up before anyone may take over (ttl_s after its last renewal, by the store's clock),
        # while a renewal is still retrying
        assert 3 - 0.6 < lease.silent_s < 3
        assert "could not be renewed" in str(lease.lost_error)
        lease.release()  # deletes nothing: it is no longer ours to delete


def test_an_unexpected_renewal_error_is_logged_retried_then_loses(tmp_path, caplog):
    lease = Lease(str(tmp_path), {}, "run-a", heartbeat_s=0.2, retry_s=0.2, ttl_s=3).acquire()
    boom = threading.Event()

    def renew(data, version):
        boom.set()
        raise ValueError("a bug in a store")

    lease.store.renew = renew
    assert boom.wait(timeout=5) and lease._thread.is_alive()
    assert lease.lost.wait(timeout=10)  # past ttl - heartbeat without a renewal
    assert any("renewal failed (ValueError: a bug in a store)" in r.getMessage() for r in caplog.records)
    lease.release()

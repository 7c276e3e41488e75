"""OUTPUT/_lease.json: at most one run writes an output at a time.

A run takes the lease with an atomic create (a hard link locally, a conditional PUT
`If-None-Match: *` on S3), renews it every `heartbeat_s` only while it is still its own
(local: same inode and mtime, then touch; S3: PUT `If-Match: <its ETag>`), and at the end
deletes it only if it is still its own (a rename to a tombstone locally; DELETE `If-Match`
on S3). A lease not renewed for `ttl_s` by the *store's* clock (its mtime / LastModified
against a probe object written just now) is abandoned, and so is one whose holder runs on
this host under a pid that no longer exists. Taking over an abandoned lease is itself
atomic: a conditional PUT `If-Match: <the old ETag>` on S3, an exclusive claim file locally.

A holder that cannot renew (the lease was deleted or taken over, or the store was
unreachable until the lease would expire) marks the lease lost: `lost` is set, `check()`
raises LeaseLost, `on_lost` is called once, and the `with` block ends with LeaseLost. The
holder gives up `heartbeat_s` before anyone may take over, judged by its own monotonic
clock against the time it sent its last successful renewal.

A store whose conditional create is not atomic (moto's S3 server checks and then writes)
can answer "created" to two racers; each therefore reads the lease back after `settle_s`
and keeps it only if it is still its own, and the one overwritten later loses at its next
heartbeat at the latest.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fsspec.asyn import sync
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from batchseg.config import ConfigError
from batchseg.store.storage import is_s3, s3_error

log = logging.getLogger(__name__)

LEASE = "_lease.json"
TTL_S = 300.0  # a lease not renewed for this long (by the store's clock) is abandoned
HEARTBEAT_S = 30.0
RETRY_S = 5.0  # a failed renewal is retried this often
S3_SETTLE_S = 1.0  # wait before reading back a fresh S3 lease (see the module docstring)


class OutputLocked(ConfigError):
    """Another run holds the output's lease (the CLI exits 4)."""


class LeaseLost(OutputLocked):
    """This run no longer holds the output's lease; it must stop writing."""


@dataclass(frozen=True)
class Snapshot:
    """The lease object as read: its bytes, a version for conditional requests, and when it
    was last written by the store's clock (seconds since the epoch)."""

    data: bytes
    version: str
    modified: float


class Lease:
    """`with Lease(output, storage_options, run_id) as lease:` holds OUTPUT/_lease.json.

    Entering raises OutputLocked (one line: who holds it, since when, what to do) if another
    live run holds it. While held, a daemon thread renews it; see the module docstring for
    what happens when it is lost. Leaving stops the thread and deletes the lease if it is
    still this run's; if it was lost meanwhile, leaving raises LeaseLost.
    """

    def __init__(self, output: str, storage_options: dict[str, Any], run_id: str, *,
                 ttl_s: float = TTL_S, heartbeat_s: float = HEARTBEAT_S, retry_s: float = RETRY_S,
                 settle_s: float | None = None, on_lost: Callable[[LeaseLost], None] | None = None) -> None:
        if not 0 < heartbeat_s <= ttl_s / 3:
            raise ValueError("heartbeat_s must be at most a third of ttl_s")
        self.output, self.storage_options = output.rstrip("/"), storage_options
        self.store = open_store(self.output, storage_options)
        self.uri = f"{self.output}/{LEASE}"
        self.ttl_s, self.heartbeat_s, self.retry_s = ttl_s, heartbeat_s, min(retry_s, heartbeat_s)
        self.settle_s = self.store.settle_s if settle_s is None else settle_s
        if isinstance(self.store, FsspecStore):
            log.warning("the lease on %s is advisory: batchseg knows no atomic conditional write there", self.output)
        self.on_lost = on_lost
        self.token = uuid.uuid4().hex
        self.me = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                   "ttl_s": ttl_s, "acquired_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.lost = threading.Event()
        self.lost_error: LeaseLost | None = None
        self.beats = 0
        self._version: str | None = None
        self._last_ok = 0.0  # monotonic time at which the last successful write was sent
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._lock = threading.Lock()
        self._last_error = ""
        self.silent_s = 0.0  # at loss: seconds since the last successful renewal was sent

    @property
    def run_id(self) -> str:
        return self.me["run_id"]

    # ---- taking and giving back

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()
        if self.lost_error is not None:
            raise self.lost_error from exc

    def acquire(self) -> Lease:
        for _ in range(5):
            sent = time.monotonic()
            data = self._body()
            version = self.store.create(data)
            if version is None:
                snap = self.store.read()
                if snap is None:
                    continue  # released meanwhile: create again
                if snap.data == data:
                    version = snap.version  # our own create, retried after a lost answer
                else:
                    held, age = _parse(snap.data), self.store.now() - snap.modified
                    reason = self._abandoned(held, age)
                    if reason is None:
                        raise OutputLocked(self._held_message(held, age))
                    version = self.store.take(data, snap.version)
                    if version is None:
                        continue  # another run changed it first: judge again
                    log.warning("lease %s: took over from run %s (%s)", self.uri, held.get("run_id", "?"), reason)
            if self.settle_s:
                time.sleep(self.settle_s)
            snap = self.store.read()
            if snap is None:
                continue
            if snap.version != version:
                if snap.data == data:
                    version = snap.version
                else:
                    held = _parse(snap.data)
                    log.warning("lease %s: the store accepted this run's write, then showed run %s's lease "
                                "(its conditional writes are not atomic); run %s keeps it",
                                self.uri, held.get("run_id", "?"), held.get("run_id", "?"))
                    raise OutputLocked(self._held_message(held, self.store.now() - snap.modified))
            self._version, self._last_ok = version, sent
            name = f"lease-{self.me['run_id']}"
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True)
            self._thread.start()
            self._watchdog.start()
            return self
        raise OutputLocked(f"the lease {self.uri} keeps changing under this run; another run is starting on "
                           "the same output: try again in a minute")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this run's (never another's)."""
        self._stop.set()
        for thread in (self._thread, self._watchdog):
            if thread is not None:  # a renewal stuck on the network is left behind; the lease then expires
                thread.join(timeout=10)
        if self.lost.is_set() or self._version is None:
            return
        try:
            if not self.store.delete(self._version):
                log.warning("lease %s was no longer this run's; left it in place", self.uri)
        except Exception as e:  # it expires after ttl_s anyway
            log.warning("could not delete the lease %s (%s); it expires in %.0f s", self.uri, _one_line(e), self.ttl_s)
        self._version = None

    # ---- while held

    def check(self) -> None:
        """Raise LeaseLost if this run no longer holds the lease."""
        if self.lost_error is not None:
            raise self.lost_error

    def fence(self) -> Fence:
        """A picklable callable for write tasks: raises LeaseLost unless the lease is still this
        run's (one read of the lease object per call)."""
        return Fence(self.output, self.storage_options, self.token)

    def _run(self) -> None:
        try:
            self._heartbeat()
        except BaseException as e:  # never die silently: a dead heartbeat is a lost lease
            log.exception("lease %s: heartbeat thread failed", self.uri)
            self._lose(f"its heartbeat thread failed ({_one_line(e)})")

    def _heartbeat(self) -> None:
        wait, failures = self.heartbeat_s, 0
        while not self._stop.wait(wait) and not self.lost.is_set():
            sent = time.monotonic()
            data = self._body(beat=self.beats + 1)
            try:
                version = self.store.renew(data, self._version)
                if version is None:
                    snap = self.store.read()
                    if snap is not None and snap.data == data:
                        version = snap.version  # our renewal, retried after a lost answer
                    else:
                        held = _parse(snap.data) if snap else None
                        by = f"taken by run {held.get('run_id', '?')}" if held else "deleted"
                        self._lose(f"it was {by}")
                        return
            except Exception as e:  # the watchdog decides when it is too late
                failures += 1
                self._last_error = f" ({_one_line(e)})"
                log.warning("lease %s: renewal failed (%s); retrying in %g s", self.uri, _one_line(e), self.retry_s)
                wait = self.retry_s
                continue
            if failures:
                log.info("lease %s: renewed again after %d failed attempt(s)", self.uri, failures)
            self._version, self._last_ok, self.beats = version, sent, self.beats + 1
            wait, failures = self.heartbeat_s, 0

    def _watch(self) -> None:
        """Lose the lease heartbeat_s before anyone may take it over, even while a renewal
        is still waiting for the store (a hung connection can take minutes to time out)."""
        while not self._stop.wait(self.heartbeat_s / 2) and not self.lost.is_set():
            silent = time.monotonic() - self._last_ok
            if silent > self.ttl_s - self.heartbeat_s:
                self.silent_s = silent
                self._lose(f"it could not be renewed for {silent:.0f} s{self._last_error or ' (no answer)'}")

    def _lose(self, why: str) -> None:
        with self._lock:
            if self.lost_error is not None:
                return
            self.lost_error = LeaseLost(f"run {self.me['run_id']} lost the lease on {self.output}: {why}; it "
                                        "stopped writing; check which run writes this output now, then run again")
            # decided before `lost` is seen: not once the block has ended, but always if it had not
            tell = self.on_lost is not None and not self._stop.is_set()
            self.lost.set()
        log.error("%s", self.lost_error)
        if tell:
            try:
                self.on_lost(self.lost_error)
            except Exception:
                log.exception("lease %s: on_lost callback failed", self.uri)

    # ---- helpers

    def _body(self, beat: int = 0) -> bytes:
        return json.dumps({**self.me, "beat": beat}, sort_keys=True).encode()

    def _abandoned(self, held: dict[str, Any], age: float) -> str | None:
        ttl = float(held.get("ttl_s") or TTL_S)
        if age > ttl:
            return f"not renewed for {age:.0f} s by the store's clock, over its {ttl:.0f} s"
        if held.get("host") == socket.gethostname() and not _pid_alive(held.get("pid")):
            return f"its process {held.get('pid')} on this host is gone"
        return None

    def _held_message(self, held: dict[str, Any], age: float) -> str:
        who = (f"run {held.get('run_id', '?')} (host {held.get('host', '?')}, pid {held.get('pid', '?')})"
               if held else "an unknown run")
        ttl = float(held.get("ttl_s") or TTL_S)
        return (f"{self.output} is being written by {who}, lease renewed {max(age, 0):.0f} s ago by the store's "
                f"clock; wait for that run to end, or if it is gone, run again once the lease expires "
                f"(in {max(ttl - age, 0):.0f} s) or delete {self.uri}")


@dataclass(frozen=True)
class Fence:
    """Raises LeaseLost when called unless `token` still holds the lease of `output`."""

    output: str
    storage_options: dict[str, Any]
    token: str

    def __call__(self) -> None:
        snap = open_store(self.output, self.storage_options).read()
        if snap is None or _parse(snap.data).get("token") != self.token:
            raise LeaseLost(f"this run no longer holds the lease on {self.output}; not writing")


def interrupt_main(error: LeaseLost) -> None:
    """An `on_lost` callback: raise KeyboardInterrupt in the main thread (as Ctrl-C would), so a
    driver blocked in Ray Data stops; the Lease's `with` block then ends with LeaseLost.

    Raised as an asynchronous exception, not a simulated SIGINT: a process started in the
    background (cron, `cmd &`, nohup) ignores SIGINT, and _thread.interrupt_main would do nothing.
    """
    main = threading.main_thread().ident
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(main), ctypes.py_object(KeyboardInterrupt))


def _parse(data: bytes) -> dict[str, Any]:
    try:
        held = json.loads(data)
    except ValueError:
        return {}
    return held if isinstance(held, dict) else {}


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # exists under another user, or unknown: assume alive
    return True


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ---- stores: the five operations a lease needs, atomic where the filesystem allows


def open_store(output: str, storage_options: dict[str, Any]):
    fs, root = url_to_fs(output.rstrip("/"), **storage_options)
    root = root.rstrip("/")
    if isinstance(fs, LocalFileSystem):
        return LocalStore(f"{root}/{LEASE}")
    if is_s3(fs):
        return S3Store(fs, f"{root}/{LEASE}")
    return FsspecStore(fs, f"{root}/{LEASE}")


class LocalStore:
    """A lease file on a local (or POSIX network) filesystem. Version: "inode:mtime_ns"."""

    settle_s = 0.0

    def __init__(self, path: str) -> None:
        self.path = path
        self.folder, self.name = os.path.split(path)
        os.makedirs(self.folder, exist_ok=True)

    def create(self, data: bytes) -> str | None:
        tmp = self._temp(data)
        try:
            os.link(tmp, self.path)  # atomic, fails if the lease exists, and never shows a half-written file
            return _version(os.stat(tmp))
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)

    def read(self) -> Snapshot | None:
        try:
            with open(self.path, "rb") as f:
                st, data = os.fstat(f.fileno()), f.read()
        except FileNotFoundError:
            return None
        return Snapshot(data, _version(st), st.st_mtime_ns / 1e9)

    def renew(self, data: bytes, version: str) -> str | None:
        # The content does not change: the mtime is the heartbeat. Touching the inode that was
        # checked through its fd never touches another run's lease, even if it replaced ours.
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            if _version(os.fstat(fd)) != version:
                return None
            os.utime(fd)
            return _version(os.fstat(fd))
        finally:
            os.close(fd)

    def take(self, data: bytes, version: str) -> str | None:
        tmp = self._temp(data)
        try:
            claim = self._claim(version)
            if claim is None:
                return None
            try:
                try:
                    st = os.stat(self.path)
                except FileNotFoundError:
                    return self.create(data)
                if _version(st) != version:
                    return None
                new = _version(os.stat(tmp))
                os.replace(tmp, self.path)
                return new
            finally:
                os.unlink(claim)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _claim(self, version: str) -> str | None:
        """Only one taker of a given lease version gets its claim file (O_EXCL). A claim left
        by a taker that died is skipped once older than a minute, by the same rule for all."""
        for attempt in range(100):
            claim = os.path.join(self.folder, f".{self.name}.takeover-{version.replace(':', '-')}-{attempt}")
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return claim
            except FileExistsError:
                try:
                    if self.now() - os.stat(claim).st_mtime_ns / 1e9 < 60:
                        return None  # another run is taking over right now
                except FileNotFoundError:
                    return None  # its taker just finished
        return None

    def delete(self, version: str) -> bool:
        # Grab whatever is there under a private name, then look: a lease taken over in the
        # meantime is put back instead of deleted.
        tomb = os.path.join(self.folder, f".{self.name}.released-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(self.path, tomb)
        except FileNotFoundError:
            return False
        if _version(os.stat(tomb)) == version:
            os.unlink(tomb)
            return True
        try:
            os.link(tomb, self.path)
        except FileExistsError:
            log.error("lease %s: could not put back another run's lease (a third run created one)", self.path)
        os.unlink(tomb)
        return False

    def now(self) -> float:
        probe = os.path.join(self.folder, f".{self.name}.probe-{uuid.uuid4().hex[:12]}")
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b".")
            return os.fstat(fd).st_mtime_ns / 1e9
        finally:
            os.close(fd)
            os.unlink(probe)

    def _temp(self, data: bytes) -> str:
        tmp = os.path.join(self.folder, f".{self.name}.{uuid.uuid4().hex[:12]}.inprogress")
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp


def _version(st: os.stat_result) -> str:
    return f"{st.st_ino}:{st.st_mtime_ns}"


class S3Store:
    """A lease object on S3 (or an S3 API server). Version: its ETag."""

    settle_s = S3_SETTLE_S

    def __init__(self, fs, path: str) -> None:
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def read(self) -> Snapshot | None:
        return sync(self.fs.loop, self._get, self.key)

    def renew(self, data: bytes, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    take = renew  # replacing an abandoned lease is the same conditional write

    def delete(self, version: str) -> bool:
        try:
            self._call("delete_object", Key=self.key, IfMatch=version)
            return True
        except OSError as e:
            if s3_error(e)[0] == 412 or _no_such_key(e):
                return False
            raise

    def now(self) -> float:
        probe = f"{self.key}.probe-{uuid.uuid4().hex[:12]}"
        self._call("put_object", Key=probe, Body=b"")
        try:
            return self._call("head_object", Key=probe)["LastModified"].timestamp()
        finally:
            try:
                self._call("delete_object", Key=probe)
            except Exception as e:
                log.warning("could not delete the probe s3://%s/%s: %s", self.bucket, probe, _one_line(e))

    def _put(self, data: bytes, **condition: str) -> str | None:
        """The new ETag, or None when the condition did not hold (412, or 404 for If-Match on a
        missing key). 409 (a concurrent conditional write on S3) is retried."""
        for attempt in range(5):
            try:
                return self._call("put_object", Key=self.key, Body=data, **condition)["ETag"]
            except OSError as e:
                status = s3_error(e)[0]
                if isinstance(e, FileExistsError) or status == 412 or _no_such_key(e):
                    return None
                if status != 409 or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _get(self, key: str) -> Snapshot | None:
        try:
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=key)
        except FileNotFoundError as e:
            if _no_such_key(e):
                return None
            raise
        body = response["Body"]
        try:
            data = await body.read()
        finally:
            body.close()
        return Snapshot(data, response["ETag"], response["LastModified"].timestamp())

    def _call(self, method: str, **kwargs) -> dict[str, Any]:
        return self.fs.call_s3(method, Bucket=self.bucket, **kwargs)


def _no_such_key(e: BaseException) -> bool:
    """The key is missing (not the bucket: NoSuchBucket is an error, not a free lease)."""
    return s3_error(e)[1] == "NoSuchKey"


class FsspecStore:
    """Any other fsspec filesystem: create uses pipe_file(mode="create"), atomic only where the
    filesystem implements it; renew and delete check the content, then act (not atomic).
    Version: the content itself."""

    settle_s = S3_SETTLE_S

    def __init__(self, fs, path: str) -> None:
        self.fs, self.path = fs, path

    def create(self, data: bytes) -> str | None:
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return None
        return data.hex()

    def read(self) -> Snapshot | None:
        try:
            data = self.fs.cat_file(self.path)
            modified = self.fs.modified(self.path).timestamp()
        except FileNotFoundError:
            return None
        return Snapshot(data, data.hex(), modified)

    def renew(self, data: bytes, version: str) -> str | None:
        snap = self.read()
        if snap is None or snap.version != version:
            return None
        self.fs.pipe_file(self.path, data)
        return data.hex()

    take = renew

    def delete(self, version: str) -> bool:
        snap = self.read()
        if snap is None or snap.version != version:
            return False
        self.fs.rm_file(self.path)
        return True

    def now(self) -> float:
        probe = f"{self.path}.probe-{uuid.uuid4().hex[:12]}"
        self.fs.pipe_file(probe, b"")
        try:
            return self.fs.modified(probe).timestamp()
        finally:
            self.fs.rm_file(probe)

"""Runs over one output: sortable run ids, and the lease a run holds while it writes."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from batchseg.config import ConfigError

LEASE = "_lease.json"
LEASE_TTL_S = 300  # a lease whose heartbeat is older than this is abandoned
HEARTBEAT_S = 30


class OutputLocked(ConfigError):
    """Another run holds the output's lease."""


def new_run_id() -> str:
    """Sortable: UTC time, then a random suffix so two runs in one second differ."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


class Lease:
    """OUTPUT/_lease.json while a run writes; a second run on the same output is refused.

    A lease is abandoned when its holder is gone: same host and the pid is dead, or the
    heartbeat (renewed every 30 s) is older than 5 minutes.
    """

    def __init__(self, output: str, storage_options: dict[str, Any], run_id: str) -> None:
        self.fs, root = url_to_fs(output.rstrip("/"), **storage_options)
        if isinstance(self.fs, LocalFileSystem):  # object stores need no folders
            self.fs.makedirs(root, exist_ok=True)
        self.path = f"{root}/{LEASE}"
        self.me = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()

    def __enter__(self) -> "Lease":
        if self.fs.exists(self.path):
            held = json.loads(self.fs.cat(self.path))
            if not _abandoned(held):
                raise OutputLocked(
                    f"output is being written by run {held['run_id']} (host {held['host']}, pid {held['pid']}, "
                    f"heartbeat {held['heartbeat']}); wait for it, or delete {LEASE} if that run is gone"
                )
        self._write()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.fs.rm(self.path)

    def _write(self) -> None:
        stamp = datetime.now(timezone.utc).isoformat()
        self.fs.pipe(self.path, json.dumps({**self.me, "heartbeat": stamp}).encode())

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._write()


def _abandoned(held: dict[str, Any]) -> bool:
    if held.get("host") == socket.gethostname():
        try:
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    age = time.time() - datetime.fromisoformat(held["heartbeat"]).timestamp()
    return age > LEASE_TTL_S

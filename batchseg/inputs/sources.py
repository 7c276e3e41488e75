"""Find images, tar shards and videos on any fsspec URI, and read their bytes.

An input is classified once on the driver (`classify`): a folder / prefix, one image file, one
tar shard, a manifest file of URIs or an S3 Inventory `manifest.json` (batchseg.inputs.manifests).
A folder is listed by `iter_listing`, which streams pages of rows while a bounded pool of
threads fans out over sub-folders, so memory stays flat however many objects lie below it;
`split_folder` first cuts a folder input into listing units, one Ray task each.

A listed row is one image file, one tar shard (WebDataset style) or one video file
(batchseg.inputs.video reads its frames):
`{"uri": canonical URI, "size": bytes (-1 if unknown), "version": S3 ETag or mtime as text
("" if unknown), "is_shard": bool}`. A shard expands into one row per image member when read;
members are named with fsspec's chained URL `tar://MEMBER::SHARD_URI`, so every `image_uri` in
the output can be opened with fsspec.open.
"""

from __future__ import annotations

import os
import queue
import re
import stat
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.core import split_protocol, url_to_fs

from batchseg.inputs import manifests
from batchseg.inputs.names import (
    IMAGE_EXTENSIONS,
    INVENTORY_NAME,
    MANIFEST_EXTENSIONS,
    VIDEO_EXTENSIONS,
    PAGE_ROWS,
    InputError,
    is_image_name,
    is_listed_name,
    is_manifest_name,
    is_shard_name,
    is_video_name,
)


# ---------------------------------------------------------------------------------------------
# Inputs: what each URI given to a job is


@dataclass(frozen=True)
class Input:
    """One job input, or one listing unit of a folder input (split_folder).

    kind: "prefix" (a folder, listed recursively), "image", "shard", "video", "manifest" (a file of
      URIs) or "inventory" (an S3 Inventory manifest.json).
    uri: canonical; for every unit of a split folder, the folder's own URI.
    rows: listing rows known already: an image or shard input's own row, or the files a split
      found directly in the folders it opened.
    start: for a split folder's unit, the sub-folders (lister units) it lists recursively;
      None for a folder listed whole.
    """

    kind: str
    uri: str
    rows: tuple[dict[str, Any], ...] = field(default=(), compare=False)
    start: tuple[Any, ...] | None = field(default=None, compare=False)


def classify(uri: str, storage_options: dict[str, Any]) -> Input:
    """What `uri` is, from one metadata request (a stat, or a HEAD plus at most one LIST on S3).

    Raises InputError (one line) for an input that does not exist, cannot be read, or is a file
    of another kind; other storage errors (no credentials, no such endpoint) pass through.
    """
    fs, path = url_to_fs(uri, **storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise InputError(f"input not found: {uri}") from None
    except PermissionError:
        raise InputError(f"input not readable (access denied): {uri}") from None
    canonical = fs.unstrip_protocol(path)
    if info.get("type") == "directory":
        return Input("prefix", canonical)
    name = path.rsplit("/", 1)[-1]
    if is_listed_name(name):
        row = {"uri": canonical, "size": _size(info), "version": _version(info), "is_shard": is_shard_name(name)}
        kind = "shard" if row["is_shard"] else "video" if is_video_name(name) else "image"
        return Input(kind, canonical, (row,))
    if name == INVENTORY_NAME:
        return Input("inventory", canonical)
    if is_manifest_name(name):
        return Input("manifest", canonical)
    raise InputError(
        f"input is neither a folder, an image ({' '.join(e[1:] for e in IMAGE_EXTENSIONS)}), a .tar shard, "
        f"a video ({' '.join(e[1:] for e in VIDEO_EXTENSIONS)}), "
        f"a manifest ({', '.join(MANIFEST_EXTENSIONS)}) nor an S3 Inventory {INVENTORY_NAME}: {uri}"
    )


def canonical_uri(uri: str) -> str:
    """`uri` as fsspec names it (protocol added, local paths absolute), without I/O."""
    protocol, _ = split_protocol(uri)
    try:
        cls = fsspec.get_filesystem_class(protocol or "file")
    except (ImportError, ValueError):  # a protocol whose package is absent: leave it be
        return uri.rstrip("/")
    name = cls._strip_protocol(uri).rstrip("/") or "/"
    first = cls.protocol if isinstance(cls.protocol, str) else cls.protocol[0]
    return f"{first}://{name}"


def distinct_roots(roots: Iterable[str]) -> list[str]:
    """Canonical roots, in the given order, less those equal to or inside another root
    (`s3://lake/` and `s3://lake/2024/` -> `s3://lake`), so that overlapping inputs list each
    object once. For folders, images and shards; a manifest is not a root (it is not listed)."""
    canonical = list(dict.fromkeys(canonical_uri(r) for r in roots))

    def inside(root: str, other: str) -> bool:
        return root != other and root.startswith(other if other.endswith("/") else other + "/")

    return [r for r in canonical if not any(inside(r, other) for other in canonical)]


class ListedBy:
    """Does one of these inputs list `uri` (a canonical URI)? The folders below it and the
    file itself are looked up: O(depth of the path) per URI, whatever the number of inputs."""

    def __init__(self, inputs: Iterable[Input]) -> None:
        self.folders = {self._split(i.uri) for i in inputs if i.kind == "prefix"}
        self.files = {i.uri for i in inputs if i.kind in ("image", "shard", "video")}

    def __call__(self, uri: str) -> bool:
        if uri in self.files:
            return True
        scheme, path = self._split(uri)
        return any((scheme, path[:at]) in self.folders for at, c in enumerate(path) if c == "/")

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        scheme, _, path = uri.partition("://")
        return scheme, path.rstrip("/")


def iter_input(inp: Input, storage_options: dict[str, Any], page_rows: int = PAGE_ROWS) -> Iterator[list[dict[str, Any]]]:
    """Every row of one input, in pages, in this process (manifest parts one after another).

    The simple path; a pipeline runs `iter_listing` and `manifests.read_manifest_part` as
    separate distributed tasks instead."""
    for at in range(0, len(inp.rows), page_rows):
        yield [dict(row) for row in inp.rows[at:at + page_rows]]
    if inp.kind == "prefix":
        if inp.start is None or inp.start:
            yield from iter_listing(inp.uri, storage_options, start=inp.start, page_rows=page_rows)
    elif inp.kind in ("manifest", "inventory"):
        for part in manifests.manifest_parts(inp.uri, storage_options):
            yield from manifests.read_manifest_part(part, storage_options, page_rows=page_rows)


# ---------------------------------------------------------------------------------------------
# Listing a folder: streaming, fanned out over sub-folders


def iter_listing(
    root: str,
    storage_options: dict[str, Any],
    *,
    start: tuple[Any, ...] | None = None,
    concurrency: int | None = None,
    page_rows: int = PAGE_ROWS,
    queue_pages: int = 8,
) -> Iterator[list[dict[str, Any]]]:
    """Yield pages (lists of at most `page_rows` rows) of every image and tar shard under the
    folder `root`, recursively, as the listing goes; no order. With `start` (a split_folder
    unit's sub-folders), only what lies under those.

    `concurrency` folders are listed at once (threads; default 16 on S3, 8 on other remote
    stores, 4 locally, where threads help on network file systems). At most `queue_pages` pages
    wait for the consumer: a slow consumer pauses the listing. Memory is bounded by those pages
    plus a bounded stack of folders to visit, whatever the number of objects. Unlike the old
    listing, rows are not sorted (that needed the whole listing in memory).

    - local: os.scandir per folder, stat only for image / shard names; symlinked files are
      listed (size and mtime of their target), symlinked folders are not entered.
    - s3://: ListObjectsV2 pages through s3fs (its credentials, endpoint and retries). While
      workers would idle, a prefix is listed with delimiter "/" and its sub-prefixes become work
      for other threads; otherwise it is listed flat (1000 keys a request). Once listed prefixes
      turn out small, consecutive sub-prefixes are listed together by one ranged flat listing,
      so a layout of one object per folder does not cost one request per folder.
    - anything else: `fs.ls` per folder (fsspec's listings cache is dropped after each). Such a
      folder's listing is held whole while it is processed, and it is not paged.

    Raises what the store raises (FileNotFoundError for a missing local folder or bucket...);
    pages already yielded stay valid.
    """
    lister, first, workers = _lister(root, storage_options)
    walk = _Walk(lister, concurrency or workers, page_rows, queue_pages)
    yield from walk.run([first] if start is None else list(start))


def _lister(root: str, storage_options: dict[str, Any]) -> tuple[Callable[[Any, Any], None], Any, int]:
    """(lister for `root`'s store, the lister unit of `root` itself, threads to list with)."""
    fs, path = url_to_fs(root, **storage_options)
    if "s3" in _protocols(fs):
        return _S3Lister(fs, path), _S3Lister.root_prefix(fs, path), 16
    if "file" in _protocols(fs):
        return _local_folder, os.path.abspath(path), 4
    return _GenericLister(fs), path, 8


SPLIT_UNITS = 32  # listing units (Ray tasks) a folder input becomes at most
SPLIT_REQUESTS = 16  # folder listings the driver spends on splitting one folder input, at most
SPLIT_ENTRIES = 1000  # a folder with more direct entries (one S3 page) is not opened on the driver


def split_folder(inp: Input, storage_options: dict[str, Any]) -> list[Input]:
    """A folder input as up to SPLIT_UNITS listing units that together list it exactly once.

    Ray Data hands a listing task's rows on only when its output block fills (128 MiB, about a
    million keys) or the task ends, so one task per folder would hold back the first images
    of a large folder until its listing ended. Opening the folder here level by level (one
    delimited listing per folder, a whole level at a time, at most SPLIT_REQUESTS in all)
    gives many shorter tasks of similar size, which also list in parallel on every node.
    Files found directly in an opened folder travel as rows of the first unit; a folder with
    more than SPLIT_ENTRIES direct entries is left closed, for a task's own fanned-out listing.
    S3 and local folders only: other stores' `ls` cannot stop after SPLIT_ENTRIES entries.
    """
    lister, first, _ = _lister(inp.uri, storage_options)
    if isinstance(lister, _GenericLister):  # its `ls` reads a whole folder: a flat one would be listed here
        return [inp]
    rows: list[dict[str, Any]] = []
    closed: list[Any] = []  # too big to open here: each listed whole by a task
    level, requests = [first], 0
    while level and len(closed) + len(level) < SPLIT_UNITS and requests + len(level) <= SPLIT_REQUESTS:
        below: list[Any] = []
        for unit in level:
            found = _Opened()
            requests += 1
            try:
                lister(unit, found)
            except _Opened.TooBig:
                closed.append(unit)
                continue
            rows += found.rows
            below += found.units
        level = below
    units = level + closed  # the closed (large) last: the first tasks end soon
    if units == [first]:
        return [inp]
    k = max(1, min(SPLIT_UNITS, len(units)))  # dealt round, so groups are of similar size
    groups = [tuple(units[i::k]) for i in range(k)]
    return [Input("prefix", inp.uri, tuple(rows) if i == 0 else (), group) for i, group in enumerate(groups)]


class _Opened:
    """Stands in for _Walk while split_folder opens one folder: keeps its rows and sub-folder
    units instead of listing them, and gives up past SPLIT_ENTRIES entries."""

    class TooBig(Exception):
        pass

    page_rows = PAGE_ROWS

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.units: list[Any] = []

    def emit(self, rows: list[dict[str, Any]]) -> None:
        self.rows += rows
        self._check()

    def offer(self, units: list[Any]) -> int:
        self.units += units
        self._check()
        return len(units)

    def wants_fan_out(self) -> bool:
        return True

    def _check(self) -> None:
        if len(self.rows) + len(self.units) > SPLIT_ENTRIES:
            raise self.TooBig


class _Stopped(Exception):
    """The consumer went away: a worker unwinds."""


_DONE = object()


class _Walk:
    """A bounded pool of threads that lists units of work (folders, prefixes) given by
    `list_unit(unit, walk)`; rows leave through a bounded queue, in pages.

    The listers call back: `emit(rows)` (blocks while the queue is full), `offer(units)`
    (pushes as many units as the bounded stack takes; the caller lists the rest itself) and
    `wants_fan_out()` (True while queued work would not keep every worker busy).
    """

    def __init__(self, list_unit: Callable[[Any, _Walk], None], workers: int, page_rows: int, queue_pages: int):
        self.list_unit, self.workers, self.page_rows = list_unit, max(1, workers), max(1, page_rows)
        self.max_pending = 4 * self.workers  # enough to keep every worker fed, and no more
        self._out: queue.Queue = queue.Queue(max(1, queue_pages))
        self._pending: list[Any] = []  # a stack: depth first keeps the frontier small
        self._busy = self._alive = 0
        self._cond = threading.Condition()
        self._closed = threading.Event()  # the consumer went away
        self._error: BaseException | None = None

    # -- called by listers, in worker threads

    def emit(self, rows: list[dict[str, Any]]) -> None:
        for start in range(0, len(rows), self.page_rows):
            self._put(rows[start:start + self.page_rows])

    def offer(self, units: list[Any]) -> int:
        """Push the first units the stack has room for; returns how many it took."""
        with self._cond:
            n = max(0, min(len(units), self.max_pending - len(self._pending)))
            if n:
                self._pending.extend(reversed(units[:n]))  # popped in the order given
                self._cond.notify(n)
            return n

    def wants_fan_out(self) -> bool:
        with self._cond:
            return len(self._pending) < self.workers

    # -- the consumer side

    def run(self, units: list[Any]) -> Iterator[list[dict[str, Any]]]:
        self._pending.extend(reversed(units))
        self._alive = self.workers
        threads = [threading.Thread(target=self._work, name=f"listing-{i}", daemon=True) for i in range(self.workers)]
        for t in threads:
            t.start()
        try:
            yield from self._pages()
        finally:
            self._closed.set()
            with self._cond:
                self._cond.notify_all()
            for t in threads:
                t.join()

    def _pages(self) -> Iterator[list[dict[str, Any]]]:
        """Merge small pages (a folder with three images) up to page_rows, without waiting for
        more while a page is ready."""
        rows: list[dict[str, Any]] = []
        while True:
            try:
                item = self._out.get(block=not rows)
            except queue.Empty:
                yield rows
                rows = []
                continue
            if item is _DONE:
                break
            if rows and len(rows) + len(item) > self.page_rows:
                yield rows
                rows = []
            rows = item if not rows else rows + item
        if rows:
            yield rows
        if self._error is not None:
            raise self._error

    # -- workers

    def _work(self) -> None:
        try:
            while (unit := self._next()) is not None:
                try:
                    self.list_unit(unit, self)
                finally:
                    with self._cond:
                        self._busy -= 1
                        self._cond.notify_all()
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            with self._cond:
                self._error = self._error or e
                self._pending.clear()
                self._cond.notify_all()
        finally:
            with self._cond:
                self._alive -= 1
                last = self._alive == 0
            if last:
                self._put(_DONE, stopping=True)

    def _next(self) -> Any | None:
        """The next unit, or None once nothing is pending and no worker can add more."""
        with self._cond:
            while not self._pending and self._busy and not self._closed.is_set() and self._error is None:
                self._cond.wait()
            if not self._pending or self._closed.is_set() or self._error is not None:
                self._cond.notify_all()
                return None
            self._busy += 1
            return self._pending.pop()

    def _put(self, item: Any, stopping: bool = False) -> None:
        while not self._closed.is_set():
            if self._error is not None and not stopping:
                raise _Stopped
            try:
                self._out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        if not stopping:
            raise _Stopped


def _local_folder(path: str, walk: _Walk) -> None:
    """List one local folder: its images and shards as rows, its sub-folders as units."""
    rows, folders = [], []
    with os.scandir(path) as entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                    continue
                shard = is_shard_name(entry.name)
                if not is_listed_name(entry.name):
                    continue
                st = entry.stat()  # follows a symlink: a linked image is listed as its target
            except FileNotFoundError:  # gone since the folder was read, or a dangling link
                continue
            if stat.S_ISREG(st.st_mode):
                rows.append({"uri": "file://" + entry.path, "size": st.st_size, "version": str(st.st_mtime),
                             "is_shard": shard})
                if len(rows) == walk.page_rows:  # a folder of millions streams too
                    walk.emit(rows)
                    rows = []
    walk.emit(rows)
    for folder in folders:
        if not walk.offer([folder]):
            _local_folder(folder, walk)


class _GenericLister:
    """Any other fsspec filesystem: one `ls` per folder."""

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self.fs = fs

    def __call__(self, path: str, walk: _Walk) -> None:
        entries = self.fs.ls(path, detail=True)
        self.fs.invalidate_cache(path)  # else fsspec keeps every listing of the lake
        rows, folders = [], []
        for info in entries:
            name = info["name"].rstrip("/")
            if info.get("type") == "directory":
                if name != path.rstrip("/"):
                    folders.append(name)
                continue
            base = name.rsplit("/", 1)[-1]
            shard = is_shard_name(base)
            if info.get("type", "file") == "file" and is_listed_name(base):
                rows.append({"uri": self.fs.unstrip_protocol(name), "size": _size(info), "version": _version(info),
                             "is_shard": shard})
        walk.emit(rows)
        for folder in folders:
            if not walk.offer([folder]):
                self(folder, walk)


class _S3Lister:
    """S3 prefixes through ListObjectsV2 with s3fs's client (credentials, endpoint, retries).

    Below s3fs's own listings (`_lsdir`, `find`) because those return only after the last page,
    cache every listing in `dircache`, and cannot start a flat listing mid-prefix (StartAfter).
    """

    def __init__(self, fs: Any, path: str):
        self.fs = fs
        self.bucket = fs.split_path(path)[0]
        self.base = fs.unstrip_protocol(self.bucket) + "/"
        self._lock = threading.Lock()
        self._prefixes = self._keys = 0  # how big listed prefixes turned out: sizes the runs

    @staticmethod
    def root_prefix(fs: Any, path: str) -> str:
        key = fs.split_path(path)[1].strip("/")
        return key + "/" if key else ""

    def __call__(self, unit: str | tuple[str, str, str, int], walk: _Walk) -> None:
        """A unit is a prefix, or a run of consecutive sub-prefixes (parent, first, last, count)."""
        if isinstance(unit, tuple):
            self._list_range(*unit, walk)
        elif walk.wants_fan_out():
            for page in self._pages(Prefix=unit, Delimiter="/"):
                walk.emit(self._rows(page.get("Contents", ())))
                self._descend(unit, [p["Prefix"] for p in page.get("CommonPrefixes", ())], walk)
        else:
            self._list_flat(unit, walk)

    def _list_flat(self, prefix: str, walk: _Walk) -> None:
        found = 0
        for page in self._pages(Prefix=prefix):
            contents = page.get("Contents", ())
            found += len(contents)
            walk.emit(self._rows(contents))
        self._learn(1, found)

    def _descend(self, parent: str, prefixes: list[str], walk: _Walk) -> None:
        """Hand sub-prefixes to other workers while there is room, else list them here; in runs
        sized so that a run of small prefixes fills about one list page."""
        i = 0
        while i < len(prefixes):
            group = prefixes[i:i + self._run()]
            unit = group[0] if len(group) == 1 else (parent, group[0], group[-1], len(group))
            if not walk.offer([unit]):
                if len(group) == 1:  # a prefix's own listing ends at its last key; a range's only past it
                    self._list_flat(group[0], walk)
                else:
                    self._list_range(parent, group[0], group[-1], len(group), walk)
            i += len(group)

    def _learn(self, prefixes: int, keys: int) -> None:
        with self._lock:
            self._prefixes += prefixes
            self._keys += keys

    def _run(self) -> int:
        """Sub-prefixes per unit: 1 until prefixes listed so far turn out to hold under a page."""
        with self._lock:
            if not self._prefixes:
                return 1
            per_prefix = self._keys / self._prefixes
        return max(1, min(PAGE_ROWS, int(PAGE_ROWS / max(per_prefix, 1.0))))

    def _list_range(self, parent: str, first: str, last: str, count: int, walk: _Walk) -> None:
        """Emit every object under the `count` consecutive sub-prefixes `first`..`last` of
        `parent` (each ends with "/") with one flat listing."""
        # Just below `first` in S3's (UTF-8 byte) order: "." sorts right before "/".
        start = first[:-1] + ".\U0010ffff"
        found = 0
        for page in self._pages(Prefix=parent, StartAfter=start):
            contents, done = [], False
            for c in page.get("Contents", ()):
                key = c["Key"]
                if key < first or "/" not in key[len(parent):]:
                    continue  # a sibling's key, or a direct child (the delimited listing has it)
                if key > last and not key.startswith(last):
                    done = True
                    break
                contents.append(c)
            found += len(contents)
            walk.emit(self._rows(contents))
            if done:
                break
        self._learn(count, found)

    def _pages(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        while True:
            page = self.fs.call_s3("list_objects_v2", Bucket=self.bucket, **kwargs)
            yield page
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def _rows(self, contents: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = []
        for c in contents:
            key = c["Key"]
            shard = is_shard_name(key)
            if is_listed_name(key):
                rows.append({"uri": self.base + key, "size": int(c.get("Size") or 0),
                             "version": str(c.get("ETag", "")).strip('"'), "is_shard": shard})
        return rows


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _size(info: dict[str, Any]) -> int:
    size = info.get("size")
    return -1 if size is None else int(size)


def _version(info: dict[str, Any]) -> str:
    """What changes when the object changes: S3 ETag, else modification time."""
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""


def read_bytes(uri: str, storage_options: dict[str, Any]) -> bytes:
    with open_object(uri, storage_options) as f:
        return f.read()


def open_object(uri: str, storage_options: dict[str, Any]):
    """One listed object, opened for reading. Not fsspec.open: it reads `::` in a name
    (`a::b.jpg`, which folders and buckets allow) as a chain of filesystems."""
    protocol, _ = split_protocol(uri)
    return fsspec.filesystem(protocol or "file", **storage_options).open(uri, "rb")


def iter_shard(uri: str, storage_options: dict[str, Any]) -> Iterator[tuple[str, int, bytes]]:
    """Yield (member URI, member size, member bytes) for each image in a tar shard, in tar order.

    Streams the tar (mode "r|*"), so a shard is read once front to back with no seeks.
    Raises tarfile.TarError / OSError if the shard itself is unreadable.
    """
    with open_object(uri, storage_options) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile() or not is_image_name(member.name):
                continue
            data = tar.extractfile(member)
            payload = data.read() if data is not None else b""
            yield member_uri(uri, member.name), member.size, payload


def member_uri(shard: str, member: str) -> str:
    """fsspec's chained URL of a tar member: `tar://MEMBER::SHARD_URI`."""
    return f"tar://{member}::{shard}"


_SHARD_START = re.compile(r"::(?=[A-Za-z][A-Za-z0-9+.-]*://|/)")


def split_member(uri: str) -> tuple[str, str] | None:
    """`tar://MEMBER::SHARD_URI` -> (SHARD_URI, MEMBER); None for any other URI."""
    if not uri.startswith("tar://"):
        return None
    rest = uri[len("tar://"):]
    # the first `::` that a URI or an absolute path follows; else (a relative shard) the first `::`
    at = _SHARD_START.search(rest) or re.search("::", rest)
    return rest[at.end():], rest[:at.start()]


def image_path(uri: str) -> str:
    """The path an image is known by: SHARD_URI/MEMBER for a tar member, else the URI itself."""
    parts = split_member(uri)
    return f"{parts[0]}/{parts[1]}" if parts else uri

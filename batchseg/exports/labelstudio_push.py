"""Push results into a live Label Studio: `batchseg push labelstudio RESULTS --url URL --project NAME|ID`.

- Project: an int is a project id (it must exist); a name is a title, created with
  `labeling_config(...)` when no project has it.
- Worst first: tasks are imported in descending `review_priority` (rows without one last, in
  dataset order). `WorstFirst` reads every row once into a local spool file and keeps 16 bytes
  per row in memory (priority and file offset), then reads the rows back in order: memory is
  flat in the row count apart from those 16 bytes, and the dataset is read once
  (benchmarks/labelstudio_order.py measures it).
- Idempotent: a task is found by `data.image_id`. A task that already holds this run's
  predictions is skipped; one holding an older run's gets its predictions replaced (Data
  Manager action `delete_tasks_predictions`, then a bulk prediction import) and its data
  updated (`batchseg_run` last: it marks the replacement done). Annotations made by people are
  never touched, and a task with a submitted annotation keeps its predictions: the annotator
  worked from them (counted as `annotated` in the receipt; cancelled annotations do not count). How tasks are found (`lookup`):
    "query": per chunk, Label Studio's Data Manager `in_list` filter on data.image_id (exact
             64-bit match), LOOKUP_BATCH ids per request. Each query scans the project's
             tasks in Label Studio's database (~0.7 s for 50k tasks on SQLite here).
    "index": the project's (task id, image_id, run) listed once, 20 bytes a task in memory
             (~1 ms a task to list). Cheaper than queries once a push needs more than
             INDEX_AFTER_QUERIES of them.
    "auto":  no lookups while the project is empty (every task is new), else "index" for a
             push of more than LOOKUP_BATCH * INDEX_AFTER_QUERIES rows, else "query".
  A retried import always asks the server (a query), whatever the mode.
- Video frames (rows named `VIDEO#t=SECONDS`, which Label Studio cannot open): image tasks
  whose `image` is the frame as a JPEG, written by exports.video.FrameImages to `frames`
  (default RESULTS/labelstudio_push/frames/VIDEO/NNNNNN.jpg, local or s3://) and mapped by
  `url_map` like any image URI; `video`, `frame_uri`, `frame_index` and `pts_s` in the data
  group them by video (Label Studio's video tasks have no brush masks). A frame is written
  only for a task being created or updated, so pushing again decodes nothing. A frame its
  video no longer gives (moved, changed, corrupt) makes no task; the receipt counts it
  (`frames.unreadable`, the first one named) and a later push retries it.
- Chunks: at most `chunk_size` tasks and `max_chunk_bytes` of JSON per import request.
- Retries: timeouts, dropped connections and HTTP 408/429/5xx are retried `retries` times with
  exponential backoff; a task import is retried only for the images a lookup does not find,
  so a response lost after the server committed adds nothing twice.
- Receipt: JSON at `receipt` (default RESULTS/labelstudio_push/RECEIPT-<UTC time>.json), also
  written when the push fails part-way.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

import httpx
import numpy as np
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from batchseg.config import ConfigError, StorageConfig
from batchseg.errors import one_line
from batchseg.exports.labelstudio import COLUMNS, TaskMaker, labeling_config
from batchseg.exports.video import FrameImages, FrameUnreadable, frame_task
from batchseg.store.results import Results
from batchseg.store.storage import write_json

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
LOOKUP_BATCH = 200  # image ids per lookup query (they travel in the URL: ~5 kB)
INDEX_AFTER_QUERIES = 50  # measured: one query scans all tasks, ~1/60 of what listing them costs
RECEIPTS = "labelstudio_push"
FRAMES = f"{RECEIPTS}/frames"  # under RESULTS: where video frames' images go by default
VIDEO_COLUMNS = ["video_uri", "frame_index", "pts_s"]  # read where a file has them
TASK_FIELDS = "id,data,total_annotations"  # total_annotations: submitted ones (cancelled ones are counted apart)


class PushFailed(RuntimeError):
    """The push stopped part-way (retries exhausted, or the server refused a request)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class PushSettings:
    chunk_size: int = 100
    max_chunk_bytes: int = 32 * 2**20
    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 120.0
    model_version: str | None = None  # overrides each run's provenance label
    url_map: list[tuple[str, str]] = field(default_factory=list)
    spool_dir: str | None = None  # where the ordering spool goes (default: the system temp folder)
    lookup: str = "auto"  # how existing tasks are found: auto | query | index (module docstring)
    frames: str | None = None  # where video frames' images go (default RESULTS/labelstudio_push/frames)


def push_labelstudio(results: Results, url: str, project: str, api_key: str | None,
                     settings: PushSettings | None = None, receipt: str | None = None,
                     storage_options: dict[str, Any] | None = None,
                     storage: StorageConfig | None = None) -> dict[str, Any]:
    """Push every image's newest row as a task with predictions; returns the receipt (also
    written to `receipt`). `storage_options` reach the receipt, `storage` the videos and the
    frame images. Raises ConfigError (bad key, URL or project) or PushFailed."""
    settings = settings or PushSettings()
    if not api_key:
        raise ConfigError("no Label Studio API key: set LABEL_STUDIO_API_KEY (Label Studio: Account & Settings -> "
                          "Access Token)")
    client = LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=settings.timeout_s, max_retries=0)
    server = Server(client, url, settings)
    started = _now()
    local = "file" in results.fs.protocol
    root = results.root if local else results.fs.unstrip_protocol(results.root)
    receipt_uri = receipt or f"{root}/{RECEIPTS}/RECEIPT-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    make = TaskMaker(results, settings.model_version, settings.url_map)
    storage = storage or StorageConfig()
    frames_uri = settings.frames or f"{root}/{FRAMES}"
    try:
        frames = FrameImages(results, frames_uri, storage.options(frames_uri), storage.options("s3://"))
    except (ValueError, ImportError) as e:  # fsspec: an unknown protocol, or one whose package is missing
        raise ConfigError(f"--frames {frames_uri}: {one_line(e)}; give a local folder or s3://BUCKET/PREFIX") from None
    record: dict[str, Any] = {"results": results.uri, "url": url, "started": started.isoformat(),
                              "status": "running", "order": "review_priority descending, rows without one last"}
    try:
        project_id, created = server.project(project, labeling_config(results.categories))
        record["project"] = {"id": project_id, "title": server.title, "created": created}
        existing = server.task_count(project_id)
        with WorstFirst(results.rows(COLUMNS, optional=VIDEO_COLUMNS), settings.spool_dir) as ordered:
            record["rows"] = ordered.count
            lookup = _lookup_mode(settings.lookup, existing, ordered.count)
            sync = Sync(server, project_id, lookup, frames)
            record.update(lookup=lookup, chunks=sync.chunks, runs=sync.runs)
            for chunk in _chunks(ordered, make, frames, settings):
                sync.push(chunk)
        server.set_model_version(project_id, sync.newest_version())
        record["status"] = "done"
    except BaseException as e:
        record.update(status="failed", error=str(e) if isinstance(e, (PushFailed, ConfigError)) else one_line(e))
        raise
    finally:
        chunks = record.get("chunks", [])
        record.update(finished=_now().isoformat(), stats=make.stats.as_dict())
        if frames.named:
            record["frames"] = {"folder": frames.fs.unstrip_protocol(frames.folder), "tasks": frames.named,
                                "written": frames.written, "unreadable": sum(c["unreadable"] for c in chunks),
                                "first_unreadable": next((c["first_unreadable"] for c in chunks
                                                          if c.get("first_unreadable")), None)}
        record["tasks"] = {k: sum(c[k] for c in chunks) for k in ("created", "updated", "skipped", "annotated")}
        record["retries"] = server.retried
        record["receipt"] = receipt_uri
        write_json(receipt_uri, record, storage_options or {})
    return record


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _lookup_mode(asked: str, existing_tasks: int, rows: int) -> str:
    if asked not in ("auto", "query", "index"):
        raise ConfigError(f"lookup must be auto, query or index (got {asked!r})")
    if asked != "auto":
        return asked
    if not existing_tasks:
        return "none"
    return "index" if rows > LOOKUP_BATCH * INDEX_AFTER_QUERIES else "query"


# ---- worst first ------------------------------------------------------------------------------

class WorstFirst:
    """Rows in descending `review_priority` (None last, then in input order), without holding
    them: one pass spools each row (pickled) to a local file and keeps its priority and offset
    (16 bytes a row); iteration reads them back in order. Error rows are spooled too (the
    task maker counts them)."""

    def __init__(self, rows: Iterator[dict[str, Any]], spool_dir: str | None = None) -> None:
        self._file = tempfile.TemporaryFile(prefix="batchseg-ls-", dir=spool_dir)
        priority, offsets = array("d"), array("q")
        for row in rows:
            value = row.get("review_priority")
            priority.append(np.nan if value is None else float(value))
            offsets.append(self._file.tell())
            pickle.dump(row, self._file, protocol=pickle.HIGHEST_PROTOCOL)
        offsets.append(self._file.tell())
        self._file.flush()
        p = np.frombuffer(priority, np.float64)
        # stable sort on -priority; NaN sorts after every number
        self._order = np.argsort(-p, kind="stable")
        self._offsets = np.frombuffer(offsets, np.int64)
        self.count = len(p)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        fd = self._file.fileno()
        for i in self._order:
            start, end = self._offsets[i], self._offsets[i + 1]
            yield pickle.loads(os.pread(fd, int(end - start), int(start)))

    def __enter__(self) -> "WorstFirst":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


@dataclass
class Chunk:
    tasks: list[dict[str, Any]]
    nbytes: int
    frames: dict[int, dict[str, Any]] = field(default_factory=dict)  # image id -> video frame row


def _chunks(rows: WorstFirst, make: TaskMaker, frames: FrameImages, settings: PushSettings) -> Iterator[Chunk]:
    """Tasks in row order, cut at `chunk_size` tasks or `max_chunk_bytes` of JSON."""
    chunk = Chunk([], 0)
    for row in rows:
        video = bool(row.get("video_uri"))
        task = frame_task(make, row, frames) if video else make(row)
        if task is None:
            continue
        size = len(json.dumps(task))
        if chunk.tasks and (len(chunk.tasks) >= settings.chunk_size or chunk.nbytes + size > settings.max_chunk_bytes):
            yield chunk
            chunk = Chunk([], 0)
        chunk.tasks.append(task)
        chunk.nbytes += size
        if video:
            chunk.frames[row["image_id"]] = row
    if chunk.tasks:
        yield chunk


# ---- the server -------------------------------------------------------------------------------

class Server:
    """label-studio-sdk calls with bounded retries and one-line errors naming the fix."""

    def __init__(self, client: LabelStudio, url: str, settings: PushSettings,
                 again: str = "the receipt lists what was pushed, push again to finish") -> None:
        self.client, self.url, self.settings = client, url, settings
        self.again = again  # what to do when retries run out
        self.title: str | None = None
        self.retried = 0

    def call(self, what: str, fn: Callable[[], T], on_retry: Callable[[], None] | None = None) -> T:
        """fn() retried on transient failures with exponential backoff (`on_retry` runs first)."""
        for attempt in range(self.settings.retries + 1):
            try:
                if attempt and on_retry:
                    on_retry()
                return fn()
            except (httpx.TransportError, ApiError) as e:
                status = getattr(e, "status_code", None)
                if isinstance(e, httpx.ConnectError) and what == "connect":
                    raise ConfigError(f"cannot reach Label Studio at {self.url} ({type(e).__name__}): "
                                      "check --url and that the server is running") from None
                if status in (401, 403):
                    raise ConfigError(f"Label Studio at {self.url} refused the API key (HTTP {status}): set "
                                      "LABEL_STUDIO_API_KEY to a valid access token") from None
                transient = isinstance(e, httpx.TransportError) or status in TRANSIENT_STATUS
                if not transient:
                    raise PushFailed(f"Label Studio refused {what}: HTTP {status}: {_body(e)}", status) from None
                if attempt == self.settings.retries:
                    raise PushFailed(f"{what} failed after {attempt + 1} tries: {_describe(e)}; {self.again}") from None
                self.retried += 1
                delay = self.settings.backoff_s * 2 ** attempt
                log.warning("%s: %s; retry %d/%d in %.1f s", what, _describe(e), attempt + 1,
                            self.settings.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def project(self, project: str, label_config: str | None) -> tuple[int, bool]:
        """(project id, created): an int names an existing project, a name is a title (a
        project made with `label_config` when none has it; with None, a ConfigError)."""
        projects = self.client.projects
        if project.isdigit():
            try:
                found = self.call("connect", lambda: projects.get(id=int(project)))
            except PushFailed as e:
                if e.status == 404:
                    raise ConfigError(f"no Label Studio project with id {project} at {self.url}: check --project "
                                      "(a name creates a project)") from None
                raise
            self.title = found.title
            return int(project), False
        try:
            listed = self.call("connect", lambda: list(projects.list(title=project, page_size=100)))
        except PushFailed as e:
            if e.status in (404, 405):  # every Label Studio answers /api/projects/
                raise ConfigError(f"{self.url} does not answer as Label Studio's API (HTTP {e.status} on "
                                  "/api/projects/): check --url") from None
            raise
        matches = [p for p in listed if p.title == project]
        if len(matches) > 1:
            raise ConfigError(f"{len(matches)} Label Studio projects are titled {project!r}: pass --project ID "
                              f"(one of {', '.join(str(p.id) for p in matches)})")
        self.title = project
        if matches:
            return matches[0].id, False
        if label_config is None:
            raise ConfigError(f"no Label Studio project titled {project!r} at {self.url}: check --project (a title or an id)")
        made = self.call("create project", lambda: projects.create(
            title=project, label_config=label_config, description="pre-labels from batchseg"))
        return made.id, True

    def task_count(self, project_id: int) -> int:
        info = self.call("read project", lambda: self.client.projects.get(id=project_id))
        return int(info.task_number or 0)

    def find(self, project_id: int, image_ids: list[int]) -> dict[int, list[tuple[int, str, bool]]]:
        """image id -> [(task id, batchseg_run, has a submitted annotation)] for the tasks that
        have it (normally one)."""
        found: dict[int, list[tuple[int, str]]] = {}
        for start in range(0, len(image_ids), LOOKUP_BATCH):
            batch = image_ids[start:start + LOOKUP_BATCH]
            query = json.dumps({"filters": {"conjunction": "and", "items": [{
                "filter": "filter:tasks:data.image_id", "operator": "in_list", "type": "String", "value": batch}]}})
            size = len(batch) + 50
            tasks = self.call("find tasks", lambda: self._first_pages(self.client.tasks.list(
                project=project_id, query=query, include=TASK_FIELDS, resolve_uri=False, page_size=size), size))
            for task in tasks:
                data = task.data or {}
                found.setdefault(data.get("image_id"), []).append(
                    (task.id, data.get("batchseg_run") or "", bool(task.total_annotations)))
        return found

    @staticmethod
    def _first_pages(pager, size: int) -> list:
        """The first page; the rest only when it is full (the SDK's pager otherwise asks for
        one more page, which Label Studio answers with a 404 after running the query again)."""
        items = list(pager.items or [])
        return list(pager) if len(items) >= size else items

    def index(self, project_id: int) -> "ProjectIndex":
        """The project's tasks listed once into a ProjectIndex."""
        def entries() -> Iterator[tuple[int, int, str, bool]]:
            for task in self.client.tasks.list(project=project_id, include=TASK_FIELDS, resolve_uri=False, page_size=1000):
                data = task.data or {}
                if isinstance(data.get("image_id"), int):  # else not a batchseg task
                    yield data["image_id"], task.id, data.get("batchseg_run") or "", bool(task.total_annotations)

        return self.call("list tasks", lambda: ProjectIndex(entries()))

    def set_model_version(self, project_id: int, version: str | None) -> None:
        """Show the newest pushed label's predictions as pre-annotations, unless the project
        is set to a version that batchseg did not write."""
        if not version:
            return
        current = self.call("read project", lambda: self.client.projects.get(id=project_id)).model_version or ""
        if current != version and (not current or current.startswith("batchseg-")):
            self.call("update project", lambda: self.client.projects.update(id=project_id, model_version=version))


class ProjectIndex:
    """image_id -> [(task id, batchseg_run, annotated)] of a listed project, as arrays sorted by
    image_id (21 bytes a task; the distinct run ids are few)."""

    def __init__(self, entries: Iterable[tuple[int, int, str, bool]]) -> None:
        ids, tasks, runs, annotated = array("q"), array("q"), array("i"), array("b")
        names: dict[str, int] = {}
        for image_id, task_id, run, has_annotation in entries:
            ids.append(image_id)
            tasks.append(task_id)
            runs.append(names.setdefault(run, len(names)))
            annotated.append(has_annotation)
        order = np.argsort(np.frombuffer(ids, np.int64), kind="stable")
        self.ids = np.frombuffer(ids, np.int64)[order]
        self.tasks = np.frombuffer(tasks, np.int64)[order]
        self.runs = np.frombuffer(runs, np.int32)[order]
        self.annotated = np.frombuffer(annotated, np.int8)[order].astype(bool)
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.ids)

    def find(self, image_ids: list[int]) -> dict[int, list[tuple[int, str, bool]]]:
        query = np.asarray(image_ids, np.int64)
        lo, hi = np.searchsorted(self.ids, query, "left"), np.searchsorted(self.ids, query, "right")
        return {int(i): [(int(self.tasks[k]), self.names[self.runs[k]], bool(self.annotated[k])) for k in range(a, b)]
                for i, a, b in zip(query, lo, hi) if b > a}


def _body(e: Exception) -> str:
    return " ".join(str(getattr(e, "body", e)).split())[:300]


def _describe(e: Exception) -> str:
    status = getattr(e, "status_code", None)
    return f"HTTP {status}" if status else type(e).__name__


# ---- one chunk ----------------------------------------------------------------------------------

class Sync:
    """Creates, updates or skips each chunk's tasks; counts into `chunks` and `runs`.
    `lookup`: "none", "query" or "index" (module docstring); video frames' images go to `frames`
    for the tasks created or updated."""

    def __init__(self, server: Server, project_id: int, lookup: str, frames: FrameImages) -> None:
        self.server, self.project_id, self.lookup, self.frames = server, project_id, lookup, frames
        self.index = server.index(project_id) if lookup == "index" else None
        self.chunks: list[dict[str, Any]] = []
        self.runs: dict[str, dict[str, Any]] = {}

    def newest_version(self) -> str | None:
        return self.runs[max(self.runs)]["model_version"] if self.runs else None

    def push(self, chunk: Chunk) -> None:
        began, retried = time.monotonic(), self.server.retried
        tasks = chunk.tasks
        ids = [t["data"]["image_id"] for t in tasks]
        if self.index is not None:
            existing = self.index.find(ids)
        else:
            existing = self.server.find(self.project_id, ids) if self.lookup == "query" else {}
        new = [t for t in tasks if t["data"]["image_id"] not in existing]
        older = [(task_id, t, annotated) for t in tasks for task_id, run, annotated in existing.get(t["data"]["image_id"], [])
                 if run < t["data"]["batchseg_run"]]
        stale = [(task_id, t) for task_id, t, annotated in older if not annotated]
        kept = len({id(t) for _, t, annotated in older if annotated} - {id(t) for _, t in stale})
        unreadable = self._write_frames([*new, *(t for _, t in stale)], chunk.frames)
        new = [t for t in new if t["data"]["image_id"] not in unreadable]
        stale = [(task_id, t) for task_id, t in stale if t["data"]["image_id"] not in unreadable]
        created = self._create(new)
        self._replace(stale)
        updated = len({id(t) for _, t in stale})
        for t in (t for t in tasks if t["data"]["image_id"] not in unreadable):  # tasks the project holds
            run = self.runs.setdefault(t["data"]["batchseg_run"], {
                "model_version": t["predictions"][0]["model_version"], "tasks": 0})
            run["tasks"] += 1
        self.chunks.append({"chunk": len(self.chunks), "tasks": len(tasks), "bytes": chunk.nbytes,
                            "created": created, "updated": updated, "annotated": kept,
                            "skipped": len(tasks) - created - updated - kept - len(unreadable),
                            "unreadable": len(unreadable), "first_unreadable": next(iter(unreadable.values()), None),
                            "retries": self.server.retried - retried,
                            "seconds": round(time.monotonic() - began, 3)})

    def _write_frames(self, tasks: list[dict[str, Any]], rows: dict[int, dict[str, Any]]) -> dict[int, str]:
        """Write the images of the video frames among `tasks` (before the tasks that show
        them); returns image id -> why, for the frames their video did not give."""
        unreadable = {}
        for image in sorted({t["data"]["image_id"] for t in tasks} & rows.keys()):
            try:
                self.frames.write(rows[image])
            except FrameUnreadable as e:
                log.warning("frame left out of the push: %s", e)
                unreadable[image] = str(e)
        return unreadable

    def _create(self, tasks: list[dict[str, Any]]) -> int:
        """Import `tasks`; a retry first looks up which of them a failed try already made."""
        pending = list(tasks)

        def drop_made() -> None:
            made = self.server.find(self.project_id, [t["data"]["image_id"] for t in pending])
            pending[:] = [t for t in pending if t["data"]["image_id"] not in made]

        def send() -> None:
            if pending:
                self.server.client.projects.import_tasks(id=self.project_id, request=pending)

        self.server.call("import tasks", send, on_retry=drop_made)
        return len(tasks)

    def _replace(self, stale: list[tuple[int, dict[str, Any]]]) -> None:
        """Newer predictions for existing tasks: delete theirs, import ours (retried as one
        step, so a retry leaves exactly one set), then update the task data."""
        if not stale:
            return
        client = self.server.client
        ids = [task_id for task_id, _ in stale]

        def replace() -> None:
            client.actions.create(id="delete_tasks_predictions", project=self.project_id,
                                  selected_items={"all": False, "included": ids})
            client.projects.import_predictions(id=self.project_id, request=[
                {"task": task_id, **t["predictions"][0]} for task_id, t in stale])

        self.server.call("replace predictions", replace)
        for task_id, t in stale:
            self.server.call("update task", lambda: client.tasks.update(id=str(task_id), data=t["data"]))

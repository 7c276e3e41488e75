"""What a person sees while a run goes: one progress line, and no false alarms from Ray.

Left alone, Ray 2.60 prints on every healthy local run:
  - a WARNING that token authentication is on (Ray >= 2.59 turns it on for new local clusters);
  - an error-level line from Ray core, `core_worker.cc ... has constructor arguments in the
    object store and max_restarts > 0`, caused by Ray Data's own actor pool, which passes its
    context and transform as ObjectRefs to actors it creates with max_restarts=-1
    (ray-project/ray#57733). Ray Data keeps those refs alive for the whole run, so restarts work;
  - a block of per-operator progress every 10 s (when stdout is not a terminal), or one bar
    per operator (when it is).
`before_ray_init()` and `after_ray_init()` replace them with one line on stderr: images done,
images/s and, once listing has finished, the total and an ETA. Ray Data's full log stays in the
Ray session's logs/ray-data/ folder.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, TextIO

_TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"
TTY_REFRESH_S = 0.5
LOG_REFRESH_S = 30.0  # when stderr is a log file (ray job submit, CI): one line this often


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def before_ray_init() -> None:
    """Drop Ray's notice that a new local cluster uses token authentication (the README says
    so); every other authentication message stays."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_DropMessage(_TOKEN_NOTICE))


def after_ray_init() -> None:
    """Once connected: spend Ray core's once-per-process actor-restart warning on a throwaway
    actor, keep Ray Data's INFO lines in its log file, and show one progress line."""
    _spend_actor_restart_warning()
    _quiet_ray_data_console()
    install_progress()


def _spend_actor_restart_warning() -> None:
    """Ray core logs the warning with RAY_LOG_ONCE_PER_PROCESS(ERROR) when an actor with
    max_restarts != 0 gets an ObjectRef argument. Creating such an actor once, with stderr
    pointed at a file in the Ray session's log folder, uses up that once. The actor asks for a
    resource no node has, so it is never scheduled, and is killed at once (a schedulable one
    can be caught mid-lease, and the GCS then logs its own error); the request lives for
    milliseconds, far shorter than an autoscaler's polling interval."""
    import ray

    @ray.remote
    class _Throwaway:
        def __init__(self, arg: Any) -> None:
            pass

    node = ray._private.worker._global_node  # None under Ray Client: no local session folder
    log_dir = node.get_logs_dir_path() if node is not None else tempfile.gettempdir()
    saved = os.dup(2)
    try:
        with open(os.path.join(log_dir, "batchseg-ray-notices.err"), "ab") as sink:
            sys.stderr.flush()
            os.dup2(sink.fileno(), 2)
            actor = _Throwaway.options(max_restarts=1, num_cpus=0, resources={"batchseg_never": 1}).remote(ray.put(0))
            ray.kill(actor)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _quiet_ray_data_console() -> None:
    """Ray Data's console handler shows its INFO lines (execution plan, progress notices);
    keep warnings and errors there, less its issue detector's advice (a predictor actor holding
    a model "uses 1.2GiB of memory per worker", in 15 lines every 30 s), which is meant for
    hand-written pipelines. Its file handler still gets everything."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger)

    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)
            handler.addFilter(lambda record: not record.name.startswith("ray.data._internal.issue_detection"))


_image_counter: Callable[[], dict[str, Any]] | None = None
READ_STAGE = "MapBatches(read_batch)"


def count_images_with(counter: Callable[[], dict[str, Any]] | None) -> None:
    """While a run goes, the progress line counts images with `counter()` (the run's meter:
    batchseg.run.meter.Meter.counts) rather than rows, which count each tar shard's marker row
    (and, while listing, a shard as one item). None: back to Ray Data's row counts."""
    global _image_counter
    _image_counter = counter


def install_progress(stream: TextIO | None = None) -> None:
    """Make Ray Data report progress with `ProgressLine` instead of its own bars and blocks.

    Ray Data picks its progress display in one internal function with no public hook; Ray is
    pinned (pyproject.toml), and tests/cli/test_cli_console.py fails if the hook moves.
    """
    from ray.data._internal.execution import streaming_executor

    def progress_manager(ctx, dataset_id, topology, verbose_progress):
        return ProgressLine(dataset_id, topology, False, verbose_progress, stream=stream)

    streaming_executor.get_progress_manager = progress_manager


def _noop_manager_class():
    from ray.data._internal.progress.base_progress import NoopExecutionProgressManager

    return NoopExecutionProgressManager


class ProgressLine(_noop_manager_class()):
    """One line: `batchseg: 1,200/5,000 images (24%), 3.1 images/s (2 actors, 1.6 each), ETA 20m25s`.

    With the run's image counter (count_images_with): images done are the image rows the
    predictor actors handled; the total is the rows out of the furthest operator that has
    finished, less the marker rows: the lister's count where it listed no tar shard or video,
    else the reader's once it has finished (it expands shards and videos into images and
    frames).
    Without one: rows handed to the writer, and rows out. Unknown while listing goes on. The
    rate counts from the first image done, so model loading does not drag it down.
    """

    def __init__(self, dataset_id, topology, show_op_progress, verbose_progress, stream: TextIO | None = None,
                 clock=time.monotonic):
        super().__init__(dataset_id, topology, show_op_progress, verbose_progress)
        from ray.data._internal.execution.operators.input_data_buffer import InputDataBuffer

        self._ops = [state.op for state in topology.values() if not isinstance(state.op, InputDataBuffer)]
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._clock = clock
        self._shown_at = -1e9 if self._tty else clock()  # a log gets its first line after LOG_REFRESH_S
        self._first_done: tuple[float, int] | None = None
        self._counted: dict[str, Any] = {}
        self._width = 0

    def counts(self) -> tuple[int, int | None]:
        """(images done, total or None while listing goes on)."""
        if not self._ops:
            return 0, None
        finished = [op for op in self._ops[:-1] if op.has_execution_finished()]
        rows = finished[-1].metrics.rows_task_outputs_generated if finished else None
        if _image_counter is None:
            return self._ops[-1].metrics.num_row_inputs_received, rows
        self._counted = _image_counter()
        names = [op.name for op in self._ops]
        read_done = READ_STAGE in names and any(op.name == READ_STAGE for op in finished)
        if read_done:
            return self._counted["images"], rows - self._counted["markers"]
        return self._counted["images"], rows if rows is not None and not self._counted["containers_listed"] else None

    def line(self) -> str:
        self._counted: dict[str, Any] = {}
        done, total = self.counts()
        now = self._clock()
        if done and self._first_done is None:
            self._first_done = (now, done)
        text = f"batchseg: {done:,}/{total:,} images" if total is not None else f"batchseg: {done:,} images"
        if total:
            text += f" ({done / total:.0%})"
        rate = self._rate(now, done)
        if rate:
            text += f", {rate:.3g} images/s"
            if self._counted.get("images_per_s_per_actor"):
                text += f" ({self._counted['actors']} actors, {self._counted['images_per_s_per_actor']:.3g} each)"
            if total is not None and total > done:
                text += f", ETA {duration((total - done) / rate)}"
        elif total is None:
            text += ", listing..."
        return text

    def _rate(self, now: float, done: int) -> float | None:
        if self._first_done is None:
            return None
        start, first = self._first_done
        return (done - first) / (now - start) if now - start >= 1.0 and done > first else None

    def refresh(self) -> None:
        now = self._clock()
        if now - self._shown_at < (TTY_REFRESH_S if self._tty else LOG_REFRESH_S):
            return
        self._shown_at = now
        self._show(self.line())

    def close_with_finishing_description(self, desc: str, success: bool) -> None:
        if self._tty and self._width:
            self._show(self.line())
            self._stream.write("\n")
            self._stream.flush()

    def _show(self, text: str) -> None:
        if self._tty:  # rewrite the same line; pad over a longer previous one
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"

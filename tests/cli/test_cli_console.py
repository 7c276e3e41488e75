"""The run's console: one progress line, and the hook into Ray Data it relies on."""

from __future__ import annotations

import inspect
import io
from types import SimpleNamespace

from batchseg.console import ProgressLine, duration


class FakeOp:
    def __init__(self, name: str) -> None:
        self.name = name
        self.finished = False
        self.metrics = SimpleNamespace(num_row_inputs_received=0, rows_task_outputs_generated=0)

    def has_execution_finished(self) -> bool:
        return self.finished


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def pipeline():
    ops = [FakeOp("list"), FakeOp("read"), FakeOp("predict"), FakeOp("write")]
    return ops, {op: SimpleNamespace(op=op) for op in ops}


def test_progress_line_counts_rate_and_eta():
    ops, topology = pipeline()
    clock = Clock()
    progress = ProgressLine("ds", topology, False, False, stream=io.StringIO(), clock=clock)
    assert progress.line() == "batchseg: 0 images, listing..."
    ops[0].finished, ops[0].metrics.rows_task_outputs_generated = True, 1000
    assert progress.line() == "batchseg: 0/1,000 images (0%)"
    ops[-1].metrics.num_row_inputs_received = 100  # the first images reach the writer
    progress.line()
    clock.now += 50
    ops[-1].metrics.num_row_inputs_received = 300  # 200 more in 50 s: 4 images/s, 700 to go
    assert progress.line() == "batchseg: 300/1,000 images (30%), 4 images/s, ETA 2m55s"
    ops[1].finished, ops[1].metrics.rows_task_outputs_generated = True, 1002  # tar members counted
    assert progress.line().startswith("batchseg: 300/1,002 images")


def test_a_terminal_gets_one_rewritten_line_a_log_one_line_per_interval():
    ops, topology = pipeline()
    clock, tty = Clock(), Terminal()
    progress = ProgressLine("ds", topology, False, False, stream=tty, clock=clock)
    for _ in range(3):
        progress.refresh()
        clock.now += 1
    progress.close_with_finishing_description("done", True)
    assert tty.getvalue().count("\r") == 4 and tty.getvalue().endswith("\n")

    log, clock = io.StringIO(), Clock()
    progress = ProgressLine("ds", topology, False, False, stream=log, clock=clock)
    for _ in range(90):  # 90 s of refreshes: a line at 30 s and 60 s, none at the start
        progress.refresh()
        clock.now += 1
    progress.close_with_finishing_description("done", True)
    assert log.getvalue().count("\n") == 2 and "\r" not in log.getvalue()


def testdurations():
    assert [duration(s) for s in (5, 75, 3600 * 2 + 61)] == ["5s", "1m15s", "2h01m"]


def test_ray_data_still_has_the_hook_the_console_replaces():
    """Ray Data picks its progress display through this module-level name (Ray is pinned);
    if an upgrade moves it, this fails instead of Ray's bars silently coming back."""
    from ray.data._internal.execution import streaming_executor
    from ray.data._internal.progress.base_progress import BaseExecutionProgressManager

    hook = streaming_executor.get_progress_manager
    assert list(inspect.signature(hook).parameters) == ["ctx", "dataset_id", "topology", "verbose_progress"]
    assert issubclass(ProgressLine, BaseExecutionProgressManager)
    assert "get_progress_manager(" in inspect.getsource(streaming_executor.StreamingExecutor)


def test_ray_datas_console_keeps_warnings_but_not_its_issue_detectors_advice():
    """The detector's "uses 1.2GiB of memory per worker" block comes every 30 s of a run whose
    actors hold a model; it stays in the session's ray-data log, out of the run's console."""
    import logging

    from batchseg.console import _quiet_ray_data_console

    _quiet_ray_data_console()
    (console,) = [h for h in logging.getLogger("ray.data").handlers if h.name == "console"]

    def shown(name: str) -> bool:
        return bool(console.filter(logging.LogRecord(name, logging.WARNING, __file__, 1, "text", None, None)))

    assert not shown("ray.data._internal.issue_detection.issue_detector_manager")
    assert shown("ray.data._internal.execution.streaming_executor")

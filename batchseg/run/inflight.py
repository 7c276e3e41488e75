"""Poison images end as error rows, never as an endless retry loop.

An image that kills its worker process (a segfault in a decoder, host OOM, a CUDA fault that
poisons the context) makes Ray restart the worker and retry the same batch, forever by
default. A small journal actor per run remembers which images were in flight in an attempt
that never finished. A batch that comes back after such a death is processed one image at a
time; an image that was in flight alone when its worker died (DEATHS_ALLOWED deaths in all)
is not tried again: it becomes an error row of kind "model". Progress is guaranteed: every
retry either finishes or isolates the image that killed it.

Keys are the images' done keys (batchseg.store.ledger.done_key), unique within a run, per stage
(decode and predict can be fused into one process; each counts its own deaths).

The journal also counts what the run report shows and the stall watcher reads: images finished
per stage (progress), batches retried after their worker died, task retries and actor restarts.

Where it lives: on the driver's node, pinned there (`ray job submit` runs the driver on the
head). A worker node's death cannot take it; the driver's node's death ends the run anyway.
Should it die all the same, Ray restarts it (max_restarts=-1) empty: the run goes on, images in
flight then are retried as new, and the counters restart from zero.
"""

from __future__ import annotations

import logging
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

log = logging.getLogger(__name__)
DEATHS_ALLOWED = 2  # a batch death, then a death alone: the image is given up
T = TypeVar("T")


class Journal:
    """(stage, key) -> the attempt it is in flight in, and -> deaths counted so far."""

    def __init__(self) -> None:
        self.in_flight: dict[tuple[str, int], str] = {}
        self.deaths: dict[tuple[str, int], int] = {}
        self.finished: dict[str, int] = {}  # stage -> images that left it
        self.retries: dict[str, int] = {}  # "STAGE batches" | "STAGE tasks" | "actor restarts" -> count
        self.actors: dict[str, str] = {}  # predictor actor id -> the node it (last) started on

    def start(self, keys: Sequence[tuple[str, int]], attempt: str) -> list[int]:
        """Deaths of each key (a key still in flight under another attempt died with it); when
        none died, the keys are now in flight under `attempt` (one round trip for the common case)."""
        deaths = []
        for key in keys:
            held = self.in_flight.pop(key, None)
            if held is not None and held != attempt:
                self.deaths[key] = self.deaths.get(key, 0) + 1
            deaths.append(self.deaths.get(key, 0))
        if any(deaths) and keys:
            self.note(f"{keys[0][0]} batches")
        if not any(deaths):
            self.begin(keys, attempt)
        return deaths

    def begin(self, keys: Sequence[tuple[str, int]], attempt: str) -> None:
        for key in keys:
            self.in_flight[key] = attempt

    def end(self, keys: Sequence[tuple[str, int]]) -> None:
        for key in keys:
            self.in_flight.pop(key, None)
            self.finished[key[0]] = self.finished.get(key[0], 0) + 1

    def note(self, what: str) -> None:
        self.retries[what] = self.retries.get(what, 0) + 1

    def actor_up(self, actor_id: str, node_id: str, restarted: bool) -> None:
        self.actors[actor_id] = node_id
        if restarted:
            self.note("actor restarts")

    def figures(self) -> dict[str, dict[str, Any]]:
        """{"finished": {stage: images}, "retries": {what: count}, "actors": {actor id: node id}}."""
        return {"finished": dict(self.finished), "retries": dict(self.retries), "actors": dict(self.actors)}


def start_journal() -> Any:
    """The run's journal (driver side), pinned to the driver's node; pass its handle to the
    stages. It lives as long as the driver holds the handle. Ray is imported here and in the
    functions below, not by the module: the stages that call `guarded` run without Ray where
    there is no journal (benchmarks/gpu.py on a bare GPU box)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_restarts=-1)(Journal).options(scheduling_strategy=here).remote()


def note_retry(journal: Any, stage: str) -> None:
    """Call first thing in a task: tell the journal when this is a retry (the task's attempt
    number, which Ray shows only on its core worker). No round trip on a first attempt."""
    if journal is None:
        return
    import ray

    if ray._private.worker.global_worker.core_worker.get_current_task_attempt_number() > 0:
        journal.note.remote(f"{stage} tasks")


def note_actor(journal: Any) -> None:
    """Call in a predictor actor's constructor: tell the journal where it runs, and whether Ray
    restarted it (a restart is counted as a retry)."""
    if journal is not None:
        import ray

        context = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray 2.60's own property reads its deprecated actor_id
            warnings.simplefilter("ignore")
            restarted = context.was_current_actor_reconstructed
        journal.actor_up.remote(context.get_actor_id(), context.get_node_id(), restarted)


def guarded(journal: Any, stage: str, keys: Sequence[int], process: Callable[[list[int]], list[T]],
            given_up: Callable[[int], T]) -> list[T]:
    """process(indices) for all items at once; after a death, item by item; an item that
    used up DEATHS_ALLOWED gets given_up(index) instead. Returns one result per key, in order.

    journal None (unit tests, no journal): process everything at once, unguarded.
    """
    if journal is None or not keys:
        return process(list(range(len(keys))))
    import ray

    attempt, staged = uuid.uuid4().hex, [(stage, int(k)) for k in keys]
    deaths = ray.get(journal.start.remote(staged, attempt))
    if not any(deaths):
        out = process(list(range(len(keys))))
        journal.end.remote(staged)
        return out
    log.warning("a worker died in %s on this batch of %d before; going one image at a time", stage, len(keys))
    out = []
    for i, key in enumerate(staged):
        if deaths[i] >= DEATHS_ALLOWED:
            log.error("%s gave up image key %d: its worker died %d times", stage, key[1], deaths[i])
            out.append(given_up(i))
            continue
        ray.get(journal.begin.remote([key], attempt))
        out.extend(process([i]))
        journal.end.remote([key])
    return out

"""Poison images end as error rows, never as an endless retry loop.

An image that kills its worker process (a segfault in a decoder, host OOM, a CUDA fault that
poisons the context) makes Ray restart the worker and retry the same batch, forever by
default. A small journal actor per run remembers which images were in flight in an attempt
that never finished. A batch that comes back after such a death is processed one image at a
time; an image that was in flight alone when its worker died (DEATHS_ALLOWED deaths in all)
is not tried again: it becomes an error row of kind "model". Progress is guaranteed: every
retry either finishes or isolates the image that killed it.

Keys are the images' done keys (batchseg.ledger.done_key), unique within a run.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray

log = logging.getLogger(__name__)
DEATHS_ALLOWED = 2  # a batch death, then a death alone: the image is given up
T = TypeVar("T")


@ray.remote(num_cpus=0, max_restarts=-1)
class Journal:
    """key -> the attempt it is in flight in, and key -> deaths counted so far."""

    def __init__(self) -> None:
        self.in_flight: dict[int, str] = {}
        self.deaths: dict[int, int] = {}

    def check(self, keys: Sequence[int], attempt: str) -> list[int]:
        """Deaths of each key; a key still in flight under another attempt died with it."""
        out = []
        for key in keys:
            held = self.in_flight.pop(key, None)
            if held is not None and held != attempt:
                self.deaths[key] = self.deaths.get(key, 0) + 1
            out.append(self.deaths.get(key, 0))
        return out

    def begin(self, keys: Sequence[int], attempt: str) -> None:
        for key in keys:
            self.in_flight[key] = attempt

    def end(self, keys: Sequence[int]) -> None:
        for key in keys:
            self.in_flight.pop(key, None)


def start_journal() -> Any:
    """The run's journal (driver side); pass its handle to the stages. It lives as long as the
    driver holds the handle."""
    return Journal.remote()


def guarded(journal: Any, keys: Sequence[int], process: Callable[[list[int]], list[T]],
            given_up: Callable[[int], T]) -> list[T]:
    """process(indices) for all items at once; after a death, item by item; an item that
    used up DEATHS_ALLOWED gets given_up(index) instead. Returns one result per key, in order.

    journal None (unit tests, no journal): process everything at once, unguarded.
    """
    if journal is None or not keys:
        return process(list(range(len(keys))))
    attempt = uuid.uuid4().hex
    deaths = ray.get(journal.check.remote(list(keys), attempt))
    if not any(deaths):
        ray.get(journal.begin.remote(list(keys), attempt))
        out = process(list(range(len(keys))))
        journal.end.remote(list(keys))
        return out
    log.warning("a worker died on this batch of %d before; processing it one image at a time", len(keys))
    out = []
    for i, key in enumerate(keys):
        if deaths[i] >= DEATHS_ALLOWED:
            out.append(given_up(i))
            continue
        ray.get(journal.begin.remote([key], attempt))
        out.extend(process([i]))
        journal.end.remote([key])
    return out

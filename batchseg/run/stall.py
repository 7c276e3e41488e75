"""A run that cannot progress says so, in one line, and stops when nothing can change that.

A driver thread reads, every few seconds, how many images have finished (the in-flight
journal's counts). When none has for `stall_timeout_s` and Ray holds resource demands that no
node can meet now (the GCS's pending task and actor demands, as `ray status` shows them), it
prints one line naming the demand, the cluster's shape and the fix, e.g.

    batchseg: waiting 3m00s for {CPU: 1}: every CPU of 3 nodes: 1+2+2 CPUs is held (5 by this
    run's predictor actors); set num_actors <= 4, or add a node; stopping at 15m00s (stall_deadline_s)

and repeats it every `stall_timeout_s` while the stall lasts. Where an autoscaler can add a
node, it says so and keeps waiting. Where none can, once the stall has lasted
`stall_deadline_s` it interrupts the driver (as Ctrl-C would): the run ends "stalled", with
exit code 5; what was written so far stays committed (the sink commits per write task) and the
next run resumes from the ledger.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import ray

from batchseg.run.placement import Node, Placement, amount, describe, head_first
from batchseg.store.lease import interrupt_main

log = logging.getLogger(__name__)


class RunStalled(RuntimeError):
    """The run stopped at stall_deadline_s; the message is the stall line."""


@dataclass(frozen=True)
class ClusterNow:
    """What Ray reports now: the alive nodes (with their total resources), what each has
    free (node id -> {resource: amount}), the pending demands (bundles, each {resource:
    amount}), and whether an autoscaler can add nodes."""

    nodes: tuple[Node, ...]
    available: dict[str, dict[str, float]]
    demands: list[dict[str, float]]
    can_add_nodes: bool

    def unmet(self) -> list[dict[str, float]]:
        """Demands no node can meet now, each shape once, in the order Ray lists them."""
        out: list[dict[str, float]] = []
        for bundle in self.demands:
            if bundle not in out and not any(_covers(free, bundle) for free in self.available.values()):
                out.append(bundle)
        return out


def observe() -> ClusterNow:
    """The cluster as the GCS sees it now (ray.autoscaler.v2.sdk.get_cluster_status)."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    up = [n for n in status.active_nodes + status.idle_nodes if n.node_id]
    nodes = tuple(sorted((Node(n.node_id, n.ip_address, n.total_resources()) for n in up), key=head_first))
    demands = [dict(b.bundle) for d in status.resource_demands.ray_task_actor_demand for b in d.bundles_by_count]
    demands += [dict(b.bundle) for d in status.resource_demands.placement_group_demand for b in d.bundles_by_count]
    return ClusterNow(nodes, {n.node_id: n.available_resources() for n in up}, demands,
                      autoscaler_can_add(status.stats.autoscaler_version, _legacy_report(),
                                         bool(status.pending_launches or status.pending_nodes)))


def autoscaler_can_add(v2_version: str | None, legacy_report: dict[str, Any] | None, pending: bool) -> bool:
    """Can an autoscaler add a node? Yes when nodes are being launched now; when the v2
    autoscaler (KubeRay) has reported its state (a version above 0); or when the v1 monitor
    maps nodes to node types of a cluster config. Every head runs the v1 monitor, but without
    a config it maps each node to "node_<id>" and can launch nothing."""
    if pending or (v2_version not in (None, "", "0")):
        return True
    mapping = ((legacy_report or {}).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(kind != f"node_{node_id}" for node_id, kind in mapping.items())


def _legacy_report() -> dict[str, Any] | None:
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        raw = _internal_kv_get("__autoscaling_status")
        return json.loads(raw) if raw else None
    except Exception:  # no monitor, or a status it wrote in another shape: not an autoscaler we know
        return None


def stall_line(waited_s: float, now: ClusterNow, where: Placement, actors_up: int, deadline_s: float | None) -> str:
    """One line: how long, for what, why (the shape, who holds what) and the fix.
    `actors_up`: this run's predictor actors running now, on nodes still alive."""
    demand = now.unmet()[0]
    shape = describe(now.nodes, {k: v for k, v in demand.items() if k != "CPU"})
    never = [k for k, v in demand.items() if not any(n.resources.get(k, 0) + 1e-9 >= v for n in now.nodes)]
    if never:
        why = f"no node has {', '.join(never)} ({shape})"
        fix = f"add a node with {', '.join(never)}" + (", or run with --device cpu" if "GPU" in never else "")
    else:
        short = [k for k, v in demand.items() if not any(f.get(k, 0) + 1e-9 >= v for f in now.available.values())]
        held = sum(n.resources.get("CPU", 0) - now.available.get(n.node_id, {}).get("CPU", 0) for n in now.nodes)
        ours = actors_up * where.cpus_per_actor
        holders = [f"{amount(ours)} by this run's {actors_up} predictor actor{'s' if actors_up != 1 else ''}"] if ours else []
        if held - ours > 0.5:
            holders.append(f"{amount(held - ours)} by other work")
        why = f"every node's {'/'.join(short or demand)} is held ({shape}" + (f"; {', '.join(holders)}" if holders else "") + ")"
        fix = (f"set num_actors <= {max(1, min(where.fits, actors_up - 1))}, or add a node" if actors_up > 1 and "CPU" in short
               else "free what other work holds, or add a node")
    then = ("; an autoscaler can add a node: waiting for it" if now.can_add_nodes else
            f"; stopping at {_duration(deadline_s)} (stall_deadline_s)" if deadline_s is not None else
            "; waiting (stall_deadline_s is unset)")
    return f"batchseg: waiting {_duration(waited_s)} for {_bundle(demand)}: {why}; {fix}{then}"


class Watcher:
    """`with Watcher(journal, where, job.stall_timeout_s, job.stall_deadline_s) as watcher:`
    around the pipeline; after an interruption, `watcher.stalled` is the line that stopped it."""

    def __init__(self, journal: Any, where: Placement, timeout_s: float, deadline_s: float | None,
                 stream: TextIO | None = None, look: Callable[[], ClusterNow] = observe,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.journal, self.where, self.timeout_s, self.deadline_s = journal, where, timeout_s, deadline_s
        self.stream, self.look, self.clock = stream or sys.stderr, look, clock
        self.poll_s = min(10.0, timeout_s / 4)
        self.stalled: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="batchseg-stall", daemon=True)

    def __enter__(self) -> "Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)  # a daemon: one stuck in a Ray call must not hold the run up

    def _progress(self) -> tuple[int, dict[str, str]]:
        """(images finished by every stage together, predictor actor id -> its node id)."""
        figures = ray.get(self.journal.figures.remote(), timeout=60)
        return sum(figures["finished"].values()), figures["actors"]

    def _watch(self) -> None:
        done, since, said_at = -1, self.clock(), None
        while not self._stop.wait(self.poll_s):
            try:
                now_done, actors = self._progress()
                if now_done != done:
                    done, since, said_at = now_done, self.clock(), None
                    continue
                waited = self.clock() - since
                if waited < self.timeout_s:
                    continue
                cluster = self.look()
                if not cluster.unmet():
                    continue
                alive = {n.node_id for n in cluster.nodes}
                actors_up = sum(node in alive for node in actors.values())
                line = stall_line(waited, cluster, self.where, actors_up, self.deadline_s)
                if said_at is None or self.clock() - said_at >= self.timeout_s:
                    print(line, file=self.stream, flush=True)
                    said_at = self.clock()
                if not cluster.can_add_nodes and self.deadline_s is not None and waited >= self.deadline_s:
                    self.stalled = line.removeprefix("batchseg: ")
                    interrupt_main(None)
                    return
            except Exception as e:  # a watcher that cannot see must not end the run it watches
                log.debug("stall watcher: %s", e)


def _covers(free: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(free.get(k, 0) + 1e-9 >= v for k, v in bundle.items())


def _bundle(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {amount(v)}" for k, v in sorted(bundle.items())) + "}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds}s" if seconds < 60 else f"{seconds // 60}m{seconds % 60:02d}s"

"""Where the predictors run: a pool sized from the nodes Ray reports, one node at a time.

Why per node. A pool sized from the cluster's sum (`cluster_resources()`), each actor asking
for a fraction of a CPU, lets Ray pack actors until no node has a whole CPU left, and every
task that asks for one (decode beside GPU actors) waits forever, although the cluster's sum
shows CPU to spare.

The rule. Every predictor actor asks for whole units: 1 CPU (and, on GPU, `gpus_per_actor`
GPUs; or one unit of `actor_resource`). Ray never splits a whole unit, so each node's free
CPU is a whole number, and the pool is capped at

    sum over nodes of min(floor(CPU_n), floor(accelerator_n / per_actor))   (actor slots)

On device cpu that is the pool: the actors decode what they predict, and nothing else in a
run asks for a CPU (listing, planning, reading and writing wait on I/O and ask for none), so
every whole CPU gets an actor. Beside GPU actors the decode tasks ask for 1 CPU each, so the
pool is also capped at

    sum over nodes of floor(CPU_n) - 1                                      (one CPU spare)

so that, wherever Ray puts the actors, some node keeps at least one whole CPU free for them.
The 0-CPU stages fit on any node, the head with `num-cpus: 0` included. A GPU cluster with a
single whole CPU has no CPU to spare: there, one actor asks for no CPU and shares the core
with the decode tasks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import ray

from batchseg.config import JobConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Node:
    """One alive Ray node: its id, IP address, and total resources (units: CPUs, GPUs, ...)."""

    node_id: str
    address: str
    resources: dict[str, float]

    @property
    def cpus(self) -> int:
        return math.floor(self.resources.get("CPU", 0) + 1e-9)

    def units(self, name: str, per_actor: float) -> int:
        """How many actors asking `per_actor` of `name` fit on this node, by that resource."""
        return math.floor(self.resources.get(name, 0) / per_actor + 1e-9)


@dataclass(frozen=True)
class Placement:
    """The predictor pool: `actors` to start with (up to `max_actors`), on `device`, each actor
    asking for `cpus_per_actor` CPUs (whole) and `resources` (e.g. {"GPU": 1}); `fits` actors
    fit the cluster as it was planned (`nodes`), with one CPU spare beside GPU actors."""

    device: str
    actors: int
    max_actors: int
    cpus_per_actor: float
    resources: dict[str, float] = field(default_factory=dict)
    fits: int = 0
    nodes: tuple[Node, ...] = ()

    @property
    def gpus_per_actor(self) -> float:
        return self.resources.get("GPU", 0.0)

    @property
    def cpus(self) -> int:
        """Whole CPUs over all nodes (at least 1): the concurrency caps of the I/O stages."""
        return max(1, sum(n.cpus for n in self.nodes))

    @property
    def threads_per_actor(self) -> int:
        """The cluster's whole CPUs per predictor actor, rounded up: what a CPU actor decodes with
        by default (1 for the default pool, one actor per CPU; 2 for one actor on 2 CPUs)."""
        return max(1, math.ceil(self.cpus / max(1, self.actors)))

    def shape(self) -> str:
        """The cluster as a user reads it: "3 nodes: 0+2+1 CPUs, 0+1+1 GPU"."""
        return describe(self.nodes, self.resources)


def alive_nodes() -> tuple[Node, ...]:
    """The nodes Ray reports alive now (ray.nodes()), head_first."""
    found = [Node(n["NodeID"], n.get("NodeManagerAddress", "?"), dict(n.get("Resources") or {}))
             for n in ray.nodes() if n.get("Alive")]
    return tuple(sorted(found, key=head_first))


def head_first(node: Node) -> tuple[bool, int, str]:
    """Sort key: the head first, then the most CPUs first."""
    return "node:__internal_head__" not in node.resources, -node.cpus, node.node_id


def describe(nodes: tuple[Node, ...] | list[Node], resources: dict[str, float] | None = None) -> str:
    words = [f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: " + "+".join(str(n.cpus) for n in nodes) + " CPUs"]
    for name in resources or {}:
        words.append("+".join(amount(n.resources.get(name, 0)) for n in nodes) + f" {name}")
    return ", ".join(words)


def fits(nodes: tuple[Node, ...] | list[Node], resources: dict[str, float], spare: int) -> int:
    """How many whole-CPU actors asking `resources` besides 1 CPU fit with `spare` whole CPUs left."""
    slots = sum(min([n.cpus] + [n.units(name, per) for name, per in resources.items()]) for n in nodes)
    return max(0, min(slots, sum(n.cpus for n in nodes) - spare))


def place(job: JobConfig, nodes: tuple[Node, ...] | None = None) -> Placement:
    """Resolve device "auto" and size the pool against `nodes` (default: the connected cluster's).

    `cuda` never needs GPUs to be there already: on an autoscaling cluster whose GPU workers
    start at zero, the pool's GPU requests are what makes the autoscaler add GPU nodes (and the
    stall watcher says so while it waits). A `num_actors` above what fits is honoured with a
    warning: the extra actors wait for nodes (and beside GPUs may hold the CPU decoding needs).
    """
    nodes = alive_nodes() if nodes is None else nodes
    gpus = sum(n.resources.get("GPU", 0) for n in nodes)
    device = job.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
        log.info("device auto -> %s: the cluster has %g GPU(s) now%s", device, gpus,
                 "" if gpus else "; on a cluster whose GPU workers scale from zero set device: cuda")
        if job.decode_on_device and device == "cpu":
            log.info("decode_on_device is off: device auto resolved to cpu, and JPEGs are decoded on the GPU only")
    elif device == "cuda" and gpus == 0:
        log.warning("device cuda: no GPU in the cluster yet; the predictor pool waits for the autoscaler to add one")
    resources = {"GPU": job.gpus_per_actor} if device == "cuda" else {}
    if job.actor_resource:
        resources[job.actor_resource] = 1.0
    spare = 0 if device == "cpu" else 1  # decode tasks beside GPU actors ask for a CPU (module docstring)
    fit, cpus_per_actor = fits(nodes, resources, spare), 1.0
    if fit == 0 and sum(n.cpus for n in nodes) == 1:
        fit, cpus_per_actor = 1, 0.0
    actors = job.num_actors or max(1, fit)
    if actors > fit:
        log.warning("%d predictor actor(s) asked for, but %d fit on %s%s; the rest wait for nodes "
                    "(set num_actors <= %d, or add a node)", actors, fit, describe(nodes, resources),
                    " with one CPU spare for decoding" if spare else "", max(fit, 1))
    max_actors = max(job.max_actors or actors, actors)
    return Placement(device, actors, max_actors, cpus_per_actor, resources, fit, nodes)


def amount(x: float) -> str:
    """2.0 -> "2", 0.5 -> "0.5"."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def remote_args(where: Placement) -> dict[str, Any]:
    """The predictor actors' resource request, as Ray Data's map_batches takes it."""
    gpus = where.resources.get("GPU", 0.0)
    custom = {k: v for k, v in where.resources.items() if k != "GPU"}
    return {"num_cpus": where.cpus_per_actor, "num_gpus": gpus, **({"resources": custom} if custom else {})}

"""The Ray Data graph, and nothing else. Reads top to bottom like the data flow:

  list (fsspec pages, less what is done) -> read bytes (tar shards streamed) -> decode +
  orient + resize -> predict + encode (actor pool) -> write (the run's partition + ledger)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray.data import ActorPoolStrategy, Dataset

from batchseg import stages
from batchseg.config import JobConfig
from batchseg.ledger import DoneSet
from batchseg.sink import RunSink
from batchseg.weights import WeightsRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where the predictors run: `actors` pool size (up to `max_actors`), on `device`."""

    device: str
    actors: int
    max_actors: int
    gpus_per_actor: float


def place(job: JobConfig) -> Placement:
    """Resolve device "auto" and the pool size against the connected Ray cluster.

    `cuda` never needs GPUs to be there already: on an autoscaling cluster whose GPU workers
    start at zero, the pool's GPU requests are what makes the autoscaler add GPU nodes.
    """
    gpus = ray.cluster_resources().get("GPU", 0)
    if job.device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
        log.info("device auto -> %s: the cluster has %g GPU(s) now%s", device, gpus,
                 "" if gpus else "; on a cluster whose GPU workers scale from zero set device: cuda")
    else:
        device = job.device
        if device == "cuda" and gpus == 0:
            log.warning("device cuda: no GPU in the cluster yet; the predictor pool waits for the autoscaler to add one")
    per_gpu = max(1, int(gpus // job.gpus_per_actor)) if device == "cuda" else 1
    actors = job.num_actors or per_gpu
    return Placement(device, actors, max(job.max_actors or actors, actors), job.gpus_per_actor if device == "cuda" else 0)


def build(job: JobConfig, where: Placement, done: DoneSet, weights: dict[str, WeightsRef | None],
          journal: Any, units: list[Any]) -> Dataset:
    """The run's dataset, not yet executed. `done`: what earlier runs finished (ledger.plan);
    `journal`: the run's in-flight journal (batchseg.inflight); `units`: job.plan_inputs."""
    models = {task: job.models[task] for task in job.tasks}
    ds = ray.data.from_items([{"unit": i} for i in range(len(units))], override_num_blocks=len(units))
    ds = ds.map_batches(  # one folder or manifest part per task; pages stream out as they arrive
        stages.list_inputs, fn_kwargs={"units": units, "storage": job.s3, "done": done}, batch_size=1,
        num_cpus=0.25,
    )
    ds = ds.repartition(target_num_rows_per_block=job.read_rows_per_block)
    ds = ds.map_batches(  # I/O bound: a quarter CPU each keeps many reads in flight
        stages.read_batch, fn_kwargs={"storage": job.s3, "done": done, "rows_per_batch": job.read_rows_per_block},
        batch_size=None, num_cpus=0.25,
    )
    ds = ds.map_batches(  # CPU bound; fused into the actor only when it asks for no GPU
        stages.decode_batch, fn_kwargs={"models": models, "max_pixels": job.max_image_pixels, "journal": journal},
        batch_size=None, num_cpus=1,
    )
    ds = ds.map_batches(
        stages.Annotate,
        fn_constructor_kwargs={"job": job, "device": where.device, "weights": weights, "journal": journal},
        compute=ActorPoolStrategy(min_size=where.actors, max_size=where.max_actors),
        batch_size=max([job.batch_size] + [m.batch_size or 0 for m in models.values()]),
        num_gpus=where.gpus_per_actor,
        num_cpus=1,
    )
    return ds


def write(ds: Dataset, sink: RunSink) -> None:
    """Execute: stream every row into the run's partition (sink.counts adds up what landed)."""
    ds.write_datasink(sink)

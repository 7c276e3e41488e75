"""The Ray Data graph, and nothing else. Reads top to bottom like the data flow:

  list (fsspec) -> read bytes -> decode + orient + resize -> predict + encode (actor pool)
  -> write Parquet (the run's partition)
Images an earlier run already wrote at the same version drop out at list / read.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
import numpy as np
from ray.data import ActorPoolStrategy, Dataset

from batchseg import stages
from batchseg.config import JobConfig
from batchseg.runs import AtomicParquetSink



@dataclass(frozen=True)
class Placement:
    """Where the predictors run: `actors` pool size (up to `max_actors`), on `device`."""

    device: str
    actors: int
    max_actors: int
    gpus_per_actor: float


def place(job: JobConfig) -> Placement:
    """Resolve device "auto" and the pool size against the connected Ray cluster."""
    gpus = ray.cluster_resources().get("GPU", 0)
    device = job.device if job.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    if device == "cuda" and gpus == 0:
        raise RuntimeError("device is cuda but the Ray cluster has no GPUs; use --device cpu or add GPU nodes")
    per_gpu = max(1, int(gpus // job.gpus_per_actor)) if device == "cuda" else 1
    actors = job.num_actors or per_gpu
    return Placement(device, actors, job.max_actors or actors, job.gpus_per_actor if device == "cuda" else 0)


def build(job: JobConfig, where: Placement, done: np.ndarray) -> Dataset:
    """`done`: sorted keys of the (URI, version) pairs earlier runs wrote (runs.done_keys)."""
    models = {task: job.models[task] for task in job.tasks}
    ds = ray.data.from_items([{"root": uri} for uri in job.inputs])
    ds = ds.flat_map(stages.list_root, fn_kwargs={"storage": job.s3, "done": done})
    ds = ds.repartition(target_num_rows_per_block=job.read_rows_per_block)
    ds = ds.map_batches(  # I/O bound: a quarter CPU each keeps many reads in flight
        stages.read_batch, fn_kwargs={"storage": job.s3, "done": done}, batch_size=None, num_cpus=0.25,
    )
    ds = ds.map_batches(  # CPU bound; fused into the actor only when it asks for no GPU
        stages.decode_batch, fn_kwargs={"models": models, "max_pixels": job.max_image_pixels}, batch_size=None,
        num_cpus=1,
    )
    ds = ds.map_batches(
        stages.Annotate,
        fn_constructor_kwargs={"job": job, "device": where.device},
        compute=ActorPoolStrategy(min_size=where.actors, max_size=where.max_actors),
        batch_size=max([job.batch_size] + [m.batch_size or 0 for m in models.values()]),
        num_gpus=where.gpus_per_actor,
        num_cpus=1,
    )
    return ds


def write(ds: Dataset, job: JobConfig, run_id: str) -> None:
    """Into OUTPUT/annotations/run=RUN_ID/, one atomically written file per write task."""
    ds.write_datasink(AtomicParquetSink(job.output, job.storage_options(job.output), run_id, job.rows_per_file))

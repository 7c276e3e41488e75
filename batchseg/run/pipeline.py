"""The Ray Data graph, and nothing else. Reads top to bottom like the data flow:

  list (fsspec pages, less what is done) -> read bytes (tar shards streamed) -> decode +
  orient + resize -> predict + encode (actor pool) -> write (the run's partition + ledger)
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import ray
from ray.data import ActorPoolStrategy, Dataset, TaskPoolStrategy

from batchseg.run import stages
from batchseg.run.placement import Placement, remote_args
from batchseg.config import JobConfig, StorageConfig, VideoConfig
from batchseg.store.ledger import DoneSet
from batchseg.store.sink import RunSink
from batchseg.predictors.weights import WeightsRef

log = logging.getLogger(__name__)


def build(job: JobConfig, where: Placement, done: DoneSet, weights: dict[str, WeightsRef | None],
          journal: Any, units: list[Any], meter: Any = None) -> Dataset:
    """The run's dataset, not yet executed. `done`: what earlier runs finished (ledger.plan);
    `journal`: the run's in-flight journal (batchseg.run.inflight); `units`: job.plan_inputs;
    `meter`: where the predictor actors send their timers (batchseg.run.meter; None: nowhere)."""
    with warnings.catch_warnings():  # retries go in **ray_remote_args: Ray 2.60 has no named parameter for them
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return _build(job, where, done, weights, journal, units, meter)


def _build(job: JobConfig, where: Placement, done: DoneSet, weights: dict[str, WeightsRef | None],
           journal: Any, units: list[Any], meter: Any) -> Dataset:
    models = {task: job.models[task] for task in job.tasks}
    ds = listing(units, job.s3, done, job.read_rows_per_block, where.cpus, job.max_retries, job.video, meter)
    ds = ds.map_batches(  # I/O bound: asks for no CPU, but at most two reads in flight per core
        stages.read_batch, fn_kwargs={"storage": job.s3, "done": done, "rows_per_batch": job.read_rows_per_block,
                                      "video": job.video, "meter": meter, "journal": journal},
        batch_size=None, num_cpus=0, compute=TaskPoolStrategy(size=2 * where.cpus), max_retries=job.max_retries,
    )
    on_cpu = where.device == "cpu"
    if not on_cpu:  # decode in CPU tasks beside the GPU actors; on CPU the actor decodes what it predicts
        ds = ds.map_batches(  # decode_on_device: JPEGs the GPU decodes as PIL does go on as bytes
            stages.decode_batch, fn_kwargs={"models": models, "max_pixels": job.max_image_pixels, "journal": journal,
                                            "jpegs_to_device": job.decode_on_device},
            batch_size=None, num_cpus=1, max_retries=job.max_retries,
        )
    ds = ds.map_batches(
        stages.Annotate,
        fn_constructor_kwargs={"job": job, "device": where.device, "weights": weights, "journal": journal,
                               "decodes": on_cpu, "meter": meter,
                               "decode_threads": job.decode_threads or where.threads_per_actor},
        compute=ActorPoolStrategy(min_size=where.actors, max_size=where.max_actors),
        # a call takes a read block (or a forward, if larger) and runs forwards of each task's
        # batch size inside: fewer, larger calls amortise per-call costs and let encoding overlap
        batch_size=max([job.read_rows_per_block, job.batch_size] + [m.batch_size or 0 for m in models.values()]),
        # bounded, not Ray Data's endless default: an actor lost with its node restarts at most
        # max_retries times (counted in the report). A call it held waits for the restart (Ray
        # Data's max_task_retries=-1, which ends when the actor's restarts do): a finite number
        # would be spent in the seconds before Ray notices the node is gone.
        max_restarts=job.max_retries,
        **remote_args(where),
    )
    return ds


def listing(units: list[Any], storage: StorageConfig, done: DoneSet, rows_per_block: int, cpus: int,
            max_retries: int, video: VideoConfig = VideoConfig(), meter: Any = None) -> Dataset:
    """The rows to read (stages.list_inputs: files less what is done, a video as its segments),
    in blocks of `rows_per_block`: one task per unit (a folder's listing unit or a manifest part).

    Each task cuts its rows into blocks as it lists, so they go on as soon as a block fills.
    Units finish one after another rather than all at the end: half as many at once as the
    cluster has whole CPUs, `cpus` (each lists with its own threads, and asks for no CPU)."""
    ds = ray.data.from_items([{"unit": i} for i in range(len(units))], override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(
        stages.list_inputs, fn_kwargs={"units": units, "storage": storage, "done": done, "video": video,
                                       "meter": meter},
        batch_size=1, num_cpus=0, compute=TaskPoolStrategy(size=max(2, cpus // 2)), max_retries=max_retries,
    )
    return _in_blocks_of(ds, rows_per_block)


def _in_blocks_of(ds: Dataset, rows: int) -> Dataset:
    """`ds` (a map's output, asking for no CPU) in blocks of at most `rows` rows, cut by the
    map's own tasks: what `ds.repartition(target_num_rows_per_block=rows)` adds (Ray Data's
    StreamingRepartition), with the remote args and compute it does not expose.

    repartition() runs its own tasks, each asking for Ray's default of 1 CPU: while a pool of
    CPU actors held every CPU they never started, and the run waited for ever. Asking for no
    CPU, with the map's remote args and task pool, Ray Data fuses it into the map (a
    non-strict StreamingRepartition after a MapBatches whose remote args and pool size match). Built
    as repartition() builds it; Ray is pinned (pyproject.toml) and a test checks the fusion.
    """
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators import StreamingRepartition

    the_map = ds._logical_plan.dag
    op = StreamingRepartition(target_num_rows_per_block=rows, input_dependencies=[the_map],
                              ray_remote_args=dict(the_map.ray_remote_args), compute=the_map.compute)
    return Dataset._from_parent(ds, LogicalPlan(op, ds.context))


def write(ds: Dataset, sink: RunSink, max_retries: int) -> None:
    """Execute: stream every row into the run's partition (sink.counts adds up what landed).
    A write task is retried at most `max_retries` times (a retried write writes the same names)."""
    with warnings.catch_warnings():  # a small input uses fewer reads and actors than their caps: nothing to fix
        warnings.filterwarnings("ignore", message="The (maximum|minimum) number of concurrent")
        # Parquet encoding is small next to its upload
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0, "max_retries": max_retries})

"""The Ray Data graph, and nothing else. Reads top to bottom like the data flow:

  list (fsspec pages, less what is done) -> read bytes (tar shards streamed) -> decode +
  orient + resize -> predict + encode (actor pool) -> write (the run's partition + ledger)
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import ray
from ray.data import ActorPoolStrategy, Dataset, TaskPoolStrategy

from batchseg.run import stages
from batchseg.config import JobConfig, StorageConfig, VideoConfig
from batchseg.store.ledger import DoneSet
from batchseg.store.sink import RunSink
from batchseg.predictors.weights import WeightsRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where the predictors run: `actors` pool size (up to `max_actors`), on `device`, each
    actor asking for `gpus_per_actor` GPUs and `cpus_per_actor` CPUs (what decode asks too)."""

    device: str
    actors: int
    max_actors: int
    gpus_per_actor: float
    cpus_per_actor: float


def place(job: JobConfig) -> Placement:
    """Resolve device "auto" and the pool size against the connected Ray cluster.

    GPU: one actor per GPU (or gpus_per_actor); `cuda` never needs GPUs to be there already: on
    an autoscaling cluster whose GPU workers start at zero, the pool's GPU requests are what
    makes the autoscaler add GPU nodes. Decode runs in CPU tasks beside the actors.
    CPU: one actor per core Ray has, each decoding what it predicts, together asking for all
    cores but one: the one a repartition task needs, so the pool never starves the stages that
    feed it (listing, reading and writing ask for no CPU: they wait on I/O).
    """
    gpus = ray.cluster_resources().get("GPU", 0)
    if job.device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
        log.info("device auto -> %s: the cluster has %g GPU(s) now%s", device, gpus,
                 "" if gpus else "; on a cluster whose GPU workers scale from zero set device: cuda")
        if job.decode_on_device and device == "cpu":
            log.info("decode_on_device is off: device auto resolved to cpu, and JPEGs are decoded on the GPU only")
    else:
        device = job.device
        if device == "cuda" and gpus == 0:
            log.warning("device cuda: no GPU in the cluster yet; the predictor pool waits for the autoscaler to add one")
    if device == "cuda":
        actors = job.num_actors or max(1, int(gpus // job.gpus_per_actor))
        return Placement(device, actors, max(job.max_actors or actors, actors), job.gpus_per_actor, 1.0)
    cpus = cluster_cpus()
    actors = job.num_actors or cpus
    max_actors = max(job.max_actors or actors, actors)
    return Placement(device, actors, max_actors, 0.0, round((cpus - 1) / max_actors, 4))


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def build(job: JobConfig, where: Placement, done: DoneSet, weights: dict[str, WeightsRef | None],
          journal: Any, units: list[Any], meter: Any = None) -> Dataset:
    """The run's dataset, not yet executed. `done`: what earlier runs finished (ledger.plan);
    `journal`: the run's in-flight journal (batchseg.run.inflight); `units`: job.plan_inputs;
    `meter`: where the predictor actors send their timers (batchseg.run.meter; None: nowhere)."""
    models = {task: job.models[task] for task in job.tasks}
    ds = listing(units, job.s3, done, job.read_rows_per_block, job.video, meter)
    ds = ds.map_batches(  # I/O bound: asks for no CPU, but at most two reads in flight per core
        stages.read_batch, fn_kwargs={"storage": job.s3, "done": done, "rows_per_batch": job.read_rows_per_block,
                                      "video": job.video, "meter": meter},
        batch_size=None, num_cpus=0, compute=TaskPoolStrategy(size=2 * cluster_cpus()),
    )
    on_cpu = where.device == "cpu"
    if not on_cpu:  # decode in CPU tasks beside the GPU actors; on CPU the actor decodes what it predicts
        ds = ds.map_batches(  # decode_on_device: JPEGs the GPU decodes as PIL does go on as bytes
            stages.decode_batch, fn_kwargs={"models": models, "max_pixels": job.max_image_pixels, "journal": journal,
                                            "jpegs_to_device": job.decode_on_device},
            batch_size=None, num_cpus=1,
        )
    ds = ds.map_batches(
        stages.Annotate,
        fn_constructor_kwargs={"job": job, "device": where.device, "weights": weights, "journal": journal,
                               "decodes": on_cpu, "meter": meter},
        compute=ActorPoolStrategy(min_size=where.actors, max_size=where.max_actors),
        # a call takes a read block (or a forward, if larger) and runs forwards of each task's
        # batch size inside: fewer, larger calls amortise per-call costs and let encoding overlap
        batch_size=max([job.read_rows_per_block, job.batch_size] + [m.batch_size or 0 for m in models.values()]),
        num_gpus=where.gpus_per_actor,
        num_cpus=where.cpus_per_actor,
    )
    return ds


def listing(units: list[Any], storage: StorageConfig, done: DoneSet, rows_per_block: int,
            video: VideoConfig = VideoConfig(), meter: Any = None) -> Dataset:
    """The rows to read (stages.list_inputs: files less what is done, a video as its segments),
    in blocks of `rows_per_block`: one task per unit (a folder's listing unit or a manifest part).

    A task's rows go on when its output block fills or it ends (Ray Data's buffering), so
    units finish one after another rather than all at the end: half as many at once as the
    cluster has CPUs (each lists with its own threads, and asks for no CPU)."""
    ds = ray.data.from_items([{"unit": i} for i in range(len(units))], override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(
        stages.list_inputs, fn_kwargs={"units": units, "storage": storage, "done": done, "video": video,
                                       "meter": meter},
        batch_size=1, num_cpus=0,
        compute=TaskPoolStrategy(size=max(2, cluster_cpus() // 2)),
    )
    return ds.repartition(target_num_rows_per_block=rows_per_block)


def write(ds: Dataset, sink: RunSink) -> None:
    """Execute: stream every row into the run's partition (sink.counts adds up what landed)."""
    with warnings.catch_warnings():  # a small input uses fewer reads and actors than their caps: nothing to fix
        warnings.filterwarnings("ignore", message="The (maximum|minimum) number of concurrent")
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0})  # Parquet encoding is small next to its upload

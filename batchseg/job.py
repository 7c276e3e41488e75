"""One annotation run: check everything that can be checked up front, run the graph, report."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

from fsspec.core import url_to_fs

from batchseg import pipeline, report, runs
from batchseg.config import ConfigError, JobConfig
from batchseg.errors import one_line
from batchseg.predictors.base import backend_class, weights_uri
from batchseg.schema import ANNOTATIONS
from batchseg.tasks import TASK_TABLE, allowed_ids
from batchseg.storage import join, output_fs, write_json
from batchseg.weights import WeightsError, resolve

log = logging.getLogger(__name__)
RUNS = "runs"  # OUTPUT/runs/RUN_ID.json and RUN_ID.failed.jsonl ({"image_uri", "error"} lines)

_INSTALL_HINTS = {
    "detectron2": "install detectron2 from its official source (README: detectron2 and DensePose) or use backend: torchvision",
    "densepose": "install DensePose from detectron2's projects/DensePose (README: detectron2 and DensePose)",
}


def preflight(job: JobConfig) -> None:
    """Raise ConfigError (one line, naming the fix) for anything that would fail later.

    Imports each backend, resolves its model config and category table, checks that the
    weights and inputs exist. Touches no image.
    """
    for task in job.tasks:
        model = job.models[task]
        where = f"models.{task}"
        try:
            backend = backend_class(model.backend, task)
            backend.preprocessor(model)
            allowed_ids(task, model, backend)
            weights = weights_uri(model, backend)
        except ImportError as e:
            raise ConfigError(f"{where}: backend {model.backend!r} needs the {e.name!r} package, which is not installed; "
                              + _INSTALL_HINTS.get(e.name or "", "install it")) from None
        except AttributeError as e:
            raise ConfigError(f"{where}: backend {model.backend!r} not found: {e}") from None
        except Exception as e:
            raise ConfigError(f"{where}: {one_line(e)}") from None
        if weights:
            try:
                resolve(weights, job.storage_options(weights), model.weights_sha256, job.allow_http_weights)
            except WeightsError as e:
                raise ConfigError(f"{where}.weights: {e}") from None
    for uri in job.inputs:
        try:
            fs, path = url_to_fs(uri, **job.storage_options(uri))
            found = fs.exists(path)
        except Exception as e:
            raise ConfigError(f"input {uri} is not reachable: {one_line(e)}") from None
        if not found:
            raise ConfigError(f"input not found: {uri}")


def run(job: JobConfig) -> dict[str, Any]:
    """One run on the connected Ray cluster, under the output's lease.

    Annotates the images no earlier run wrote at their current version (all of them with
    overwrite) into OUTPUT/annotations/run=RUN_ID/, then writes OUTPUT/runs/RUN_ID.json (and
    OUTPUT/run.json, the latest) and the run's failed list. Returns the run.json content.
    """
    run_id = runs.new_run_id()
    opts = job.storage_options(job.output)
    with runs.Lease(job.output, opts, run_id):
        out_fs, out_root = url_to_fs(job.output.rstrip("/"), **opts)
        if job.overwrite:
            for name in (ANNOTATIONS, RUNS, "run.json"):
                if out_fs.exists(f"{out_root}/{name}"):
                    out_fs.rm(f"{out_root}/{name}", recursive=True)
        done = runs.done_keys(out_fs, f"{out_root}/{ANNOTATIONS}", job.retry_failed)
        started = time.time()
        where = pipeline.place(job)
        log.info("run %s: predictors %d..%d actor(s) on %s; %d images done earlier",
                 run_id, where.actors, where.max_actors, where.device, len(done))
        dataset = pipeline.build(job, where, done)
        pipeline.write(dataset, job, run_id)
        wall = time.time() - started
        summary = _report(job, run_id, len(done), started, wall, where, dataset.stats())
    return summary


def _report(job: JobConfig, run_id: str, done_before: int, started: float, wall: float, where,
            stats_text: str) -> dict[str, Any]:
    fs, root = output_fs(job)
    partition = f"{root}/{ANNOTATIONS}/run={run_id}"
    counts = report.count_rows(fs, partition, [TASK_TABLE[t].column for t in job.tasks])
    images = counts["images"]
    fs.create_dir(f"{root}/{RUNS}", recursive=True)
    with fs.open_output_stream(f"{root}/{RUNS}/{run_id}.failed.jsonl") as out:
        report.write_failed(fs, partition, out)
    with fs.open_output_stream(f"{root}/{RUNS}/{run_id}.stats.txt") as out:
        out.write(stats_text.encode())
    failed_fraction = images["failed"] / images["in"] if images["in"] else 0.0
    over_budget = job.max_failed_fraction is not None and failed_fraction > job.max_failed_fraction
    summary = {
        "run_id": run_id,
        "status": "failure_budget_exceeded" if over_budget else "ok",
        **counts,
        "done_before": done_before,
        "failed_fraction": round(failed_fraction, 6),
        "failed_list": join(job.output, RUNS, f"{run_id}.failed.jsonl"),
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "wall_time_s": round(wall, 3),
        "stages": report.stages(stats_text),  # Ray Data's per-operator figures; full text in RUN_ID.stats.txt
        "images_per_s": round(images["in"] / wall, 3) if wall > 0 else None,
        "device": where.device,
        "actors": {"min": where.actors, "max": where.max_actors, "gpus_each": where.gpus_per_actor},
        "categories": {
            task: backend_class(job.models[task].backend, task).categories(job.models[task]).table()
            for task in job.tasks
        },
        "annotations": join(job.output, ANNOTATIONS, f"run={run_id}"),
        "versions": report.versions(),
        "config": job.model_dump(mode="json"),
    }
    for name in (f"{RUNS}/{run_id}.json", "run.json"):
        write_json(join(job.output, name), summary, job.storage_options(job.output))
    return summary

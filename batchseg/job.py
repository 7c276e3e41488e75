"""One annotation run: check everything that can be checked up front, run the graph, report."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

from fsspec.core import url_to_fs

from batchseg import pipeline, report
from batchseg.config import ConfigError, JobConfig
from batchseg.errors import one_line
from batchseg.predictors.base import backend_class, weights_uri
from batchseg.tasks import TASK_TABLE, allowed_ids
from batchseg.storage import join, output_fs, write_json
from batchseg.weights import check_weights

log = logging.getLogger(__name__)
FAILED_LIST = "failed.jsonl"  # one {"image_uri", "error"} line per failed image

_INSTALL_HINTS = {
    "detectron2": "install detectron2 from its official source (README: detectron2 and DensePose) or use backend: torchvision",
    "densepose": "install DensePose from detectron2's projects/DensePose (README: detectron2 and DensePose)",
}


def preflight(job: JobConfig) -> None:
    """Raise ConfigError (one line, naming the fix) for anything that would fail later.

    Imports each backend, resolves its model config and category table, checks that the
    weights and inputs exist and that the output holds no earlier annotations. Touches no image.
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
                check_weights(weights, job.storage_options(weights))
            except FileNotFoundError as e:
                raise ConfigError(f"{where}.weights: {e}; set weights to a reachable path or URL") from None
    for uri in job.inputs:
        try:
            fs, path = url_to_fs(uri, **job.storage_options(uri))
            found = fs.exists(path)
        except Exception as e:
            raise ConfigError(f"input {uri} is not reachable: {one_line(e)}") from None
        if not found:
            raise ConfigError(f"input not found: {uri}")
    if not job.overwrite and _has_annotations(job):
        raise ConfigError(
            f"{join(job.output, pipeline.ANNOTATIONS)} already holds annotations; "
            "choose a new output or pass --overwrite"
        )


def _has_annotations(job: JobConfig) -> bool:
    fs, path = url_to_fs(join(job.output, pipeline.ANNOTATIONS), **job.storage_options(job.output))
    return fs.exists(path) and bool(fs.ls(path))


def run(job: JobConfig) -> dict[str, Any]:
    """Run the job on the connected Ray cluster; write OUTPUT/annotations and OUTPUT/run.json.

    Returns the run.json content.
    """
    started = time.time()
    where = pipeline.place(job)
    log.info("predictors: %d..%d actor(s) on %s", where.actors, where.max_actors, where.device)
    pipeline.write(pipeline.build(job, where), job)
    wall = time.time() - started

    fs, root = output_fs(job)
    counts = report.count_rows(fs, f"{root}/{pipeline.ANNOTATIONS}", [TASK_TABLE[t].column for t in job.tasks])
    images = counts["images"]
    with fs.open_output_stream(f"{root}/{FAILED_LIST}") as out:
        report.write_failed(fs, f"{root}/{pipeline.ANNOTATIONS}", out)
    failed_fraction = images["failed"] / images["in"] if images["in"] else 0.0
    over_budget = job.max_failed_fraction is not None and failed_fraction > job.max_failed_fraction
    summary = {
        "status": "failure_budget_exceeded" if over_budget else "ok",
        **counts,
        "failed_fraction": round(failed_fraction, 6),
        "failed_list": join(job.output, FAILED_LIST),
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(counts["images"]["in"] / wall, 3) if wall > 0 else None,
        "device": where.device,
        "actors": {"min": where.actors, "max": where.max_actors, "gpus_each": where.gpus_per_actor},
        "categories": {
            task: backend_class(job.models[task].backend, task).categories(job.models[task]).table()
            for task in job.tasks
        },
        "annotations": join(job.output, pipeline.ANNOTATIONS),
        "versions": report.versions(),
        "config": job.model_dump(mode="json"),
    }
    write_json(join(job.output, "run.json"), summary, job.storage_options(job.output))
    return summary

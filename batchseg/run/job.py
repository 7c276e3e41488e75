"""One annotation run: check and pin everything up front, plan against the ledger, run, report."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import ray
from fsspec.core import url_to_fs

from batchseg import console
from batchseg.run import inflight, meter, pipeline, placement, provenance, report, stall
from batchseg.store import lease, ledger
from batchseg.inputs import manifests, names, sources
from batchseg.config import ConfigError, JobConfig
from batchseg.errors import one_line, redact, redact_tree, storage_error
from batchseg.predictors.base import backend_class, weights_uri
from batchseg.predictors.checkpoints import CheckpointError
from batchseg.rows.schema import ANNOTATIONS, LEDGER, RUNS
from batchseg.store.sink import RunSink
from batchseg.store.storage import is_s3, join, write_json, write_text
from batchseg.rows.tasks import TASK_TABLE, allowed_ids
from batchseg.predictors.weights import WeightsError, WeightsRef, is_remote, resolve

log = logging.getLogger(__name__)

_INSTALL_HINTS = {
    "detectron2": "install detectron2 from its official source (docs/backends.md: detectron2 and DensePose) or use backend: torchvision",
    "densepose": "install DensePose from detectron2's projects/DensePose (docs/backends.md: detectron2 and DensePose)",
}


@dataclass(frozen=True)
class Prepared:
    """What preflight pinned: per task the weights' content, category table and fingerprint."""

    weights: dict[str, WeightsRef | None]
    categories: dict[str, dict[str, Any]]
    fingerprints: dict[str, str]
    provenance: dict[str, Any]
    units: list[Any]  # what the list stage reads: see plan_inputs


def preflight(job: JobConfig) -> Prepared:
    """Raise ConfigError (one line, naming the fix) for anything that would fail later.

    Imports each backend, resolves its model config and category table, pins the weights'
    content, checks the inputs and the output. Touches no image.
    """
    weights, categories, fingerprints, records = {}, {}, {}, {}
    for task in job.tasks:
        model = job.models[task]
        where = f"models.{task}"
        try:
            backend = backend_class(model.backend, task)
            preprocessor = backend.preprocessor(model)
            allowed_ids(task, model, backend)
            categories[task] = backend.categories(model).table()
            uri = weights_uri(model, backend)
        except ImportError as e:
            raise ConfigError(f"{where}: backend {model.backend!r} needs the {e.name!r} package, which is not installed; "
                              + _INSTALL_HINTS.get(e.name or "", "install it")) from None
        except AttributeError as e:
            raise ConfigError(f"{where}: backend {model.backend!r} not found: {e}") from None
        except Exception as e:
            raise ConfigError(f"{where}: {one_line(e)}") from None
        if job.decode_on_device and not hasattr(preprocessor, "on_device"):
            raise ConfigError(f"{where}: backend {model.backend!r} cannot preprocess on the device (its preprocessor "
                              "has no on_device); set decode_on_device: false")
        try:
            weights[task] = resolve(uri, job.storage_options(uri), model.weights_sha256, job.allow_http_weights) if uri else None
            if weights[task] and not is_remote(uri) and hasattr(backend, "check_weights"):
                backend.check_weights(model, uri.removeprefix("file://"))  # local: cheap to open here
        except (WeightsError, CheckpointError) as e:
            raise ConfigError(f"{where}.weights: {e}") from None
        except ValueError as e:
            raise ConfigError(f"{where}: {one_line(e).removeprefix('ValueError: ')}") from None
        fingerprints[task] = provenance.fingerprint(task, job, weights[task].identity() if weights[task] else None,
                                                    categories[task])
        records[task] = provenance.task_record(task, job, weights[task], fingerprints[task])
    units = plan_inputs(job)
    _check_output(job)
    return Prepared(weights, categories, fingerprints,
                    {"batchseg_version": provenance.batchseg_version(), "tasks": records}, units)


def plan_inputs(job: JobConfig) -> list[Any]:
    """The list stage's units of work, from one metadata request per input (plus a manifest's
    footer or first line, a folder's first levels): folders as sources.Input units
    (sources.split_folder), single files as one sources.Input (inputs inside another input
    dropped, so overlapping inputs list each object once), manifests and S3 Inventory
    manifests as their manifests.ManifestPart (one per data file or run of row groups).

    Raises ConfigError (one line) for an input that is missing, unreadable or, unless
    allow_empty, holds no image: a typo'd path must not become a successful empty run.
    """
    units: list[Any] = []
    inputs = [uri for uri in job.inputs if not _is_manifest(uri)]
    for uri in sources.distinct_roots(inputs) + [uri for uri in job.inputs if _is_manifest(uri)]:
        opts = job.storage_options(uri)
        try:
            unit = sources.classify(uri, opts)
            if unit.kind in ("manifest", "inventory"):
                parts = manifests.manifest_parts(unit.uri, opts)
            else:
                parts = sources.split_folder(unit, opts) if unit.kind == "prefix" else [unit]
            if not job.allow_empty and not _any_image(parts, opts):
                raise ConfigError(f"no images found under {uri} ({', '.join(names.IMAGE_EXTENSIONS)}, .tar or a video "
                                  f"{', '.join(names.VIDEO_EXTENSIONS)}); "
                                  "check the path, or set allow_empty: true (--allow-empty) for scheduled runs")
        except names.InputError as e:
            raise ConfigError(str(e)) from None
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"input {redact(uri)} is not reachable: {storage_error(e) or one_line(e)}") from None
        units += parts
    return units


def _is_manifest(uri: str) -> bool:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return name == names.INVENTORY_NAME or names.is_manifest_name(name)


def _any_image(units: list[Any], storage_options: dict[str, Any]) -> bool:
    """Does the first unit with rows have one? Reads one page at most per unit (then stops)."""
    for unit in units:
        pages = (sources.iter_input(unit, storage_options, page_rows=1) if isinstance(unit, sources.Input)
                 else manifests.read_manifest_part(unit, storage_options, page_rows=1))
        try:
            if any(page for page in pages):
                return True
        finally:
            pages.close()
    return False


def _check_output(job: JobConfig) -> None:
    """The output is a folder (or nothing yet) we can reach; on an object store, its bucket exists."""
    shown = redact(job.output)
    try:
        fs, path = url_to_fs(job.output.rstrip("/"), **job.storage_options(job.output))
        if is_s3(fs):  # one small LIST: its error names the cause (a HEAD's 403 does not say why)
            fs.call_s3("list_objects_v2", Bucket=path.split("/", 1)[0], MaxKeys=1)
        try:
            is_file = fs.info(path).get("type") == "file"
        except FileNotFoundError:
            is_file = False
    except Exception as e:
        raise ConfigError(f"output {shown} is not reachable: {storage_error(e) or one_line(e)}") from None
    if is_file:
        raise ConfigError(f"output {shown} is a file; give a folder (it gets annotations/ and runs/)")
    parent, _, name = path.rpartition("/")
    if name == ANNOTATIONS or name.startswith("run=") or name in (LEDGER, RUNS):
        if fs.exists(f"{parent}/{RUNS}") or fs.exists(f"{parent}/{LEDGER}") or fs.exists(f"{parent}/run.json"):
            raise ConfigError(f"output {shown} is inside an earlier run's output; give that output folder "
                              f"({redact(job.output.rstrip('/').rsplit('/', 1)[0])}) instead")


def hold_output(job: JobConfig) -> lease.Lease:
    """The output's lease for a new run (`with hold_output(job) as held:`); entering raises
    OutputLocked, one line, while another live run holds it. Taken before Ray starts, so a
    locked output costs no cluster start."""
    return lease.Lease(job.output, job.storage_options(job.output), new_run_id(), on_lost=lease.interrupt_main)


def run(job: JobConfig, prepared: Prepared | None = None, held: lease.Lease | None = None) -> dict[str, Any]:
    """One run on the connected Ray cluster, under the output's lease (`held`, or taken here).

    Annotates what no earlier run did at its current version with the same models (all of it
    with overwrite) into OUTPUT/annotations/run=RUN_ID/, and reports in OUTPUT/runs/RUN_ID.json
    (written first with status "running", so the run's provenance exists while it writes)
    and OUTPUT/run.json (the latest). Returns the report.
    """
    prepared = prepared or preflight(job)
    if held is None:
        with hold_output(job) as held:
            return run(job, prepared, held)
    run_id = held.run_id
    opts = job.storage_options(job.output)
    if job.overwrite:
        held.check()
        _delete_earlier_runs(job)
    started = time.time()
    head = _head(job, run_id, prepared, started)
    write_json(join(job.output, RUNS, f"{run_id}.json"), head, opts)
    watcher = None
    try:
        journal, timers = inflight.start_journal(), meter.start_meter()
        # Planning runs in a Ray task while the pipeline starts: listing tasks wait for the
        # done keys, the predictor actors load their models meanwhile.
        done_ref, planned_ref = ray.remote(**ledger.PLAN_TASK)(ledger.plan).remote(
            job.output, opts, prepared.fingerprints, job.retry_failed, job.skip_reviewed)
        where = placement.place(job)
        log.info("run %s: predictors %d..%d actor(s) on %s, on %s", run_id, where.actors, where.max_actors,
                 where.device, where.shape())
        sink = RunSink(job.output, opts, run_id, job.rows_per_file, [TASK_TABLE[t].column for t in job.tasks],
                       fence=held.fence())
        dataset = pipeline.build(job, where, ledger.DoneSet(done_ref, run_id, ledger.models_digest(prepared.fingerprints)),
                                 prepared.weights, journal, prepared.units, timers)
        console.count_images_with(lambda: ray.get(timers.counts.remote()))
        _exit_on_sigterm()
        try:
            with stall.Watcher(journal, where, job.stall_timeout_s, job.stall_deadline_s) as watcher:
                pipeline.write(dataset, sink, job.max_retries)
                planned = ray.get(planned_ref)
        finally:
            console.count_images_with(None)
        tracked = None
        if job.video.track:
            from batchseg.run import tracking  # scipy: seconds of start-up that runs without video pay for nothing

            tracked = tracking.track_run(job, run_id)
    except BaseException as e:
        if watcher is not None and watcher.stalled:  # the watcher interrupted the driver
            e = stall.RunStalled(watcher.stalled)
            _record_end(join(job.output, RUNS, f"{run_id}.json"), head, e, held, opts)
            raise e from None
        _record_end(join(job.output, RUNS, f"{run_id}.json"), head, e, held, opts)
        raise
    if planned["runs"]:
        log.info("run %s: %d images and %d tar shards were done by earlier runs (ledger of %d runs); those among "
                 "the inputs were skipped", run_id, planned["done"], planned["done_shards"], planned["runs"])
    stats = dataset.stats()
    summary = report.summary(head, sink.counts, planned, time.time() - started, where, stats,
                             job.max_failed_fraction, join(job.output, RUNS, f"{run_id}.failed"),
                             ray.get(timers.figures.remote()), started, cluster_report(where, journal))
    if tracked is not None:
        summary["tracks"] = tracked
    held.check()
    write_text(join(job.output, RUNS, f"{run_id}.stats.txt"), stats, opts)
    for name in (f"{RUNS}/{run_id}.json", "run.json"):
        write_json(join(job.output, name), summary, opts)
    return summary


def cluster_report(where: placement.Placement, journal: Any) -> dict[str, Any]:
    """{"shape": at the start, "nodes_lost" / "nodes_joined": [{node_id, address, resources}] of
    the nodes the run started with that are gone now / of those alive now it did not start
    with, "predictor_actors": {node id: predictor actors that ran there}, "retries": {what:
    count} (inflight.Journal.figures)}."""
    now = placement.alive_nodes()
    alive, started = {n.node_id for n in now}, {n.node_id for n in where.nodes}
    lost = [_node(n) for n in where.nodes if n.node_id not in alive]
    for n in lost:
        log.warning("node %s (%s) was lost during the run", n["node_id"], n["address"])
    figures = ray.get(journal.figures.remote())
    return {"shape": where.shape(), "nodes_lost": lost, "nodes_joined": [_node(n) for n in now if n.node_id not in started],
            "predictor_actors": dict(Counter(figures["actors"].values())), "retries": figures["retries"]}


def _node(node: placement.Node) -> dict[str, Any]:
    return {"node_id": node.node_id, "address": node.address, "resources": node.resources}


def _exit_on_sigterm() -> None:
    """SIGTERM (`ray job stop`, a scheduler) raises SystemExit(15) in the driver, which _record_end
    marks "interrupted". ray.init sets the same handler, but by the time the pipeline runs, Ray's
    native failure handler was seen to win (the driver aborted, exit -6, its report left
    "running"), so it is set again here, after every Ray call that starts this run."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(signum))


def _record_end(path: str, head: dict[str, Any], e: BaseException, held: lease.Lease, opts: dict[str, Any]) -> None:
    """Mark the run's report "interrupted" (Ctrl-C; SIGTERM from `ray job stop` or a scheduler,
    which ray.init's handler turns into SystemExit; a lost lease), "stalled" (stall.RunStalled)
    or "failed", so that a report
    left "running" means only a run that is running or was killed outright. Skipped when the
    lease is gone: the output is another run's now."""
    try:
        held.check()
        status = ("interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else
                  "stalled" if isinstance(e, stall.RunStalled) else "failed")
        write_json(path, {**head, "status": status, "error": one_line(e) or type(e).__name__,
                          "ended_at": datetime.now(timezone.utc).isoformat()}, opts)
    except Exception as why:
        log.warning("run report %s not updated: %s", path, one_line(why))


def new_run_id() -> str:
    """Sortable: UTC time, then a random suffix so two runs in one second differ."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _head(job: JobConfig, run_id: str, prepared: Prepared, started: float) -> dict[str, Any]:
    """The part of the report known before any image: identity, provenance, config."""
    return {
        "run_id": run_id,
        "status": "running",
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "provenance": {**prepared.provenance, "run_id": run_id},
        "categories": prepared.categories,
        "annotations": join(redact(job.output), ANNOTATIONS, f"run={run_id}"),
        "versions": report.versions(),
        "config": redact_tree(job.model_dump(mode="json")),
    }


def _delete_earlier_runs(job: JobConfig) -> None:
    fs, root = url_to_fs(job.output.rstrip("/"), **job.storage_options(job.output))
    for name in (ANNOTATIONS, LEDGER, RUNS, "run.json"):
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)

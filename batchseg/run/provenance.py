"""What produced a row: a fingerprint per task, the run's provenance record, safe URIs.

"Done" means: this image, at this version, by this model, for this task. A task's
fingerprint hashes everything that changes its output: backend, model config (the file's
content when it is a file), weights *content* (sha256, else the store's ETag and size), the
category table (label map), thresholds, sizes, options, precision and the encoders' version.
Batch size, actor count and other throughput knobs are left out: they do not change rows
(detectron2 pads a batch to its largest image, which moves scores in the last digits; we
accept that, see benchmarks/README.md).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from typing import Any

from batchseg.config import JobConfig
from batchseg.errors import redact

# Bump when an encoder's output for the same model output changes, so earlier rows re-annotate.
ENCODING_VERSION = 1


def batchseg_version() -> str:
    try:
        return importlib.metadata.version("batchseg")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def fingerprint(task: str, job: JobConfig, weights: dict[str, Any] | None, categories: dict[str, Any]) -> str:
    """32 hex digits identifying what produces `task`'s cells. `weights`: WeightsRef.identity()
    (None for random init); `categories`: the task's category table as run.json records it."""
    model = job.models[task]
    payload = {
        "task": task,
        "backend": model.backend,
        "model": model.model,
        "model_file_sha256": _file_sha256(model.model),
        "weights": weights,
        "random_init": model.random_init,
        "categories": categories,
        "allowed": sorted(model.categories) if model.categories is not None else None,
        "score_threshold": model.score_threshold,
        "min_size": model.min_size,
        "max_size": model.max_size,
        "options": model.options,
        "precision": job.precision,
        "encoding": ENCODING_VERSION,
    }
    if job.decode_on_device:  # other pixels than PIL's; only when on, so existing fingerprints hold
        payload["decode_on_device"] = True
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _file_sha256(path: str | None) -> str | None:
    if not path or not os.path.isfile(path):
        return None  # a model-zoo name: versioned by the backend's own version (run.json "versions")
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def task_record(task: str, job: JobConfig, weights: Any, fp: str) -> dict[str, Any]:
    """One task's entry in run.json "provenance.tasks" (weights: a WeightsRef or None)."""
    model = job.models[task]
    return {
        "fingerprint": fp,
        "backend": model.backend,
        "model": model.model,
        "weights": redact(weights.uri) if weights else None,
        "weights_sha256": weights.sha256 if weights else None,
        "weights_etag": weights.etag if weights else None,
        "model_card": redact(model.model_card) if model.model_card else None,
        "score_threshold": model.score_threshold,
        "precision": job.precision,
    }


def model_version(run_info: dict[str, Any], task: str | None = None) -> str:
    """A short label for an annotation tool's model_version field, e.g.
    `batchseg-0.1.0 instance=mask_rcnn_R_50_FPN_3x@1a2b3c4d` (all tasks when `task` is None)."""
    prov = run_info.get("provenance") or {}
    tasks = prov.get("tasks") or {}
    names = [task] if task else sorted(tasks)
    parts = []
    for name in names:
        record = tasks.get(name)
        if record is None:
            continue
        model = os.path.basename(str(record.get("model") or record.get("backend"))).removesuffix(".yaml")
        parts.append(f"{name}={model}@{record['fingerprint'][:8]}")
    version = prov.get("batchseg_version") or (run_info.get("versions") or {}).get("batchseg") or "unknown"
    return " ".join([f"batchseg-{version}", *parts]) if parts else f"batchseg-{version} run={run_info.get('run_id', '?')}"

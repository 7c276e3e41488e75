"""run.json: what a run did. Counts come from the write tasks (batchseg.store.sink), each counting
the rows it committed, so run.json agrees with the dataset without a driver pass over it."""

from __future__ import annotations

import importlib.metadata
import re
from typing import Any


_PACKAGES = ("batchseg", "torch", "torchvision", "detectron2", "ray", "pyarrow", "pycocotools")


def summary(head: dict[str, Any], counts: dict[str, Any], planned: dict[str, Any], wall: float, where: Any,
            stats_text: str, max_failed_fraction: float | None, failed_list: str) -> dict[str, Any]:
    """The finished run's report: `head` (identity, provenance, config) plus what landed.

    counts: the sink's totals (batchseg.store.sink.count, added up over write tasks).
    planned: ledger.plan's figures. where: the pipeline's Placement.
    """
    images = counts["images"]
    failed_fraction = images["failed"] / images["in"] if images["in"] else 0.0
    over_budget = max_failed_fraction is not None and failed_fraction > max_failed_fraction
    return {
        **head,
        "status": "failure_budget_exceeded" if over_budget else "ok",
        "images": images,
        "failed_by_kind": counts["failed_by_kind"],
        "found": {
            column: {"total": sum(n.values()), "per_category": dict(sorted(n.items(), key=lambda kv: int(kv[0])))}
            for column, n in counts["found"].items()
        },
        "done_before": planned["done"],
        "ledger": planned,
        "failed_fraction": round(failed_fraction, 6),
        "failed_list": failed_list,
        "wall_time_s": round(wall, 3),
        "stages": stages(stats_text),  # Ray Data's per-operator figures; full text in RUN_ID.stats.txt
        "images_per_s": round(images["in"] / wall, 3) if wall > 0 else None,
        "device": where.device,
        "actors": {"min": where.actors, "max": where.max_actors, "gpus_each": where.gpus_per_actor,
                   "cpus_each": where.cpus_per_actor},
    }


_STAGE = re.compile(r"^Operator \d+ (?P<name>.+?): (?P<tasks>\d+) tasks executed, (?P<blocks>\d+) blocks produced in (?P<wall>[\d.]+)s", re.M)


def stages(stats_text: str) -> list[dict[str, Any]]:
    """Ray Data's per-operator summary (Dataset.stats()) as [{"stage", "tasks", "blocks", "wall_s"}]."""
    return [
        {"stage": m["name"], "tasks": int(m["tasks"]), "blocks": int(m["blocks"]), "wall_s": float(m["wall"])}
        for m in _STAGE.finditer(stats_text)
    ]


def versions() -> dict[str, str | None]:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found

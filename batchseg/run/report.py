"""run.json: what a run did. Counts come from the write tasks (batchseg.store.sink), each counting
the rows it committed, so run.json agrees with the dataset without a driver pass over it."""

from __future__ import annotations

import importlib.metadata
import re
from typing import Any


_PACKAGES = ("batchseg", "torch", "torchvision", "detectron2", "ray", "pyarrow", "pycocotools")


def summary(head: dict[str, Any], counts: dict[str, Any], planned: dict[str, Any], wall: float, where: Any,
            stats_text: str, max_failed_fraction: float | None, failed_list: str,
            actor_times: dict[str, dict[str, Any]] | None = None, started: float | None = None,
            cluster: dict[str, Any] | None = None) -> dict[str, Any]:
    """The finished run's report: `head` (identity, provenance, config) plus what landed.

    counts: the sink's totals (batchseg.store.sink.count, added up over write tasks).
    planned: ledger.plan's figures. where: the run's placement.Placement. actor_times: the run's
    meter figures (batchseg.run.meter: actor id -> ActorTimes as a dict). started: the run's
    start, Unix time. cluster: its shape, the nodes lost during the run and the retries
    counted (job.cluster_report).
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
        "stages": (ops := stages(stats_text)),  # Ray Data's per-operator figures; full text in RUN_ID.stats.txt
        "predictors": predictors(actor_times or {}, ops, started),
        "images_per_s": round(images["in"] / wall, 3) if wall > 0 else None,
        "device": where.device,
        "actors": {"min": where.actors, "max": where.max_actors, "gpus_each": where.gpus_per_actor,
                   "cpus_each": where.cpus_per_actor, "resources_each": where.resources},
        "cluster": cluster,
    }


_STAGE = re.compile(r"^Operator \d+ (?P<name>.+?): (?P<tasks>\d+) tasks executed, (?P<blocks>\d+) blocks produced in (?P<wall>[\d.]+)s", re.M)
_ROWS_OUT = re.compile(r"\* Total output num rows: (\d+)")
_THROUGHPUT = re.compile(r"\* Ray Data throughput: ([\d.eE+-]+) rows/s")


def stages(stats_text: str) -> list[dict[str, Any]]:
    """Ray Data's per-operator summary (Dataset.stats()) as [{"stage", "tasks", "blocks",
    "wall_s", "rows_out", "rows_per_s"}]; rows_per_s is Ray Data's own throughput figure (rows
    out over the operator's wall time), rows_out and rows_per_s None where the text has none."""
    found = list(_STAGE.finditer(stats_text))
    out = []
    for m, after in zip(found, found[1:] + [None]):
        section = stats_text[m.end():after.start() if after else len(stats_text)]
        rows, rate = _ROWS_OUT.search(section), _THROUGHPUT.search(section)
        out.append({"stage": m["name"], "tasks": int(m["tasks"]), "blocks": int(m["blocks"]), "wall_s": float(m["wall"]),
                    "rows_out": int(rows[1]) if rows else None,
                    "rows_per_s": round(float(rate[1]), 3) if rate else None})
    return out


WAITING_BOUND = 0.25  # predictors idle this much of their time: their input is the bottleneck


def predictors(actor_times: dict[str, dict[str, Any]], ops: list[dict[str, Any]],
               started: float | None = None) -> dict[str, Any]:
    """The predictor pool's time split and the run's bottleneck.

    actor_times: actor id -> meter.ActorTimes as a dict. ops: `stages` of Dataset.stats().
    Per actor and for the pool (times added up over actors): the fraction of wall time spent
    waiting for input, decoding (on CPU the actor decodes; with decode_on_device, the device
    decode), in the forward, and encoding (on the encoder thread, overlapping the forward, so
    the fractions can add up to more than 1); images/s per actor. read and decode: Ray Data's
    throughput of those stages (rows/s; decode is absent on CPU, where the actors decode).
    startup_s: from `started` (the run's start) to the first batch reaching a predictor: what
    a run pays before its first image, however few it has.
    """
    actors = []
    for actor_id, t in sorted(actor_times.items()):
        actors.append({"actor": actor_id, "images": t["images"], "wall_s": round(t["wall_s"], 3),
                       "images_per_s": round(t["images"] / t["wall_s"], 3) if t["wall_s"] > 0 else None,
                       **_fractions(t)})
    pool_times = {k: sum(t[k] for t in actor_times.values()) for k in ("images", "wait_s", "decode_s", "forward_s",
                                                                        "encode_s", "wall_s")}
    pool = {"actors": len(actors), **_fractions(pool_times),
            "images_per_s_per_actor": round(pool_times["images"] / pool_times["wall_s"], 3) if pool_times["wall_s"] > 0 else None}
    read, decode = _op(ops, "read_batch"), _op(ops, "decode_batch")
    firsts = [t["first_batch_at"] for t in actor_times.values() if t.get("first_batch_at")]
    startup = round(min(firsts) - started, 3) if firsts and started else None
    return {"pool": pool, "actors": actors, "startup_s": startup,
            "read_rows_per_s": read["rows_per_s"] if read else None,
            "decode_rows_per_s": decode["rows_per_s"] if decode else None,
            "bottleneck": bottleneck(pool, read, decode) if actors else None}


def _fractions(t: dict[str, Any]) -> dict[str, float | None]:
    wall = t["wall_s"]
    return {name: round(t[f"{key}_s"] / wall, 3) if wall > 0 else None
            for name, key in (("waiting", "wait"), ("decode", "decode"), ("forward", "forward"), ("encode", "encode"))}


def _op(ops: list[dict[str, Any]], function: str) -> dict[str, Any] | None:
    return next((op for op in ops if op["stage"] == f"MapBatches({function})"), None)


def bottleneck(pool: dict[str, Any], read: dict[str, Any] | None, decode: dict[str, Any] | None) -> str:
    """One line naming the stage that held the run back, from the pool's time split.

    Predictors waiting WAITING_BOUND of their time or more: their input is (decode, where it
    runs in its own stage and is slower than reading; else reading). Otherwise the largest of
    the actor's own parts: the forward, decoding in the actor, or encoding.
    """
    waiting = pool["waiting"] or 0.0
    if waiting >= WAITING_BOUND:
        if decode and (read is None or (decode["rows_per_s"] or 0) <= (read["rows_per_s"] or 0)):
            return (f"predictors waited {waiting:.0%} of the time for decoded images: decode is the bottleneck; "
                    "raise decode CPUs or enable decode_on_device")
        return (f"predictors waited {waiting:.0%} of the time for images: reading is the bottleneck; "
                "check the storage's throughput, or raise read_rows_per_block for many small files")
    part, share = max(((p, pool[p] or 0.0) for p in ("forward", "decode", "encode")), key=lambda ps: ps[1])
    if part == "forward":
        return (f"predictors spent {share:.0%} of the time in the forward: the model is the bottleneck; "
                "add GPUs (actors), raise batch_size, or use precision fp16/bf16")
    if part == "decode":
        return (f"predictors spent {share:.0%} of the time decoding images: decode is the bottleneck; "
                "give the run more CPUs, or on GPUs decode in CPU tasks beside them (and enable decode_on_device)")
    return (f"predictors spent {share:.0%} of the time encoding masks: encoding is the bottleneck; "
            "give each predictor actor more CPUs")


def versions() -> dict[str, str | None]:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found

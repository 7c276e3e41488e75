"""How good the pre-labels were: `batchseg acceptance OUTPUT` compares, for every reviewed image,
the predictions the annotator saw with what the annotator submitted.

What was seen: the row of the review's `run` (the task's batchseg_run) in
annotations/run=RUN/, or the image's newest row where the review names no run (COCO pulls) or
that run's row is gone. Images whose prediction cannot be found are counted, not scored.

Matching, per image: instances are paired one to one by scipy's linear_sum_assignment over
pycocotools' mask IoU. A pair needs IoU >= `match_iou` (0.5, COCO's usual threshold); a pair of
the same category always beats a pair across categories, so a class change is seen as an edit
only where no same-class counterpart exists. Then:
  kept     matched, same category, IoU >= `kept_iou` (0.9)
  edited   matched below that, or the category changed (`class_changed` counts the latter)
  deleted  a prediction with no reviewed counterpart
  added    a reviewed instance the model missed
Per category (the prediction's; the review's for added) and overall; the mean IoU of kept and
edited pairs; per number of edits (edited + deleted + added) the median lead time; COCO AP
(bbox, segm) of the predictions seen with the reviews as ground truth, by evaluate's COCOeval;
and whether review_priority was right: Spearman's rank correlation between an image's
priority and its edits, and the edit rate (edits per predicted or reviewed instance) of the
top and bottom priority deciles.

Streaming: one pass over the reviews collects (image id, run) keys, 12 bytes a review; one pass
over each run the reviews name spools the predictions seen to a local file (WorstFirst's
pattern: a row pickled, 16 bytes of index in memory); one more pass over the reviews scores
image by image and writes per-image rows to acceptance_tasks.parquet as it goes. What stays in
memory per image: priority, edits, lead time (24 bytes), plus what COCOeval needs (pycocotools
holds every instance at once; --no-ap skips it).
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from array import array
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr

from batchseg.config import ConfigError
from batchseg.evaluation.evaluate import _for_iou_type, coco_metrics
from batchseg.store.results import Results, run_of
from batchseg.store.reviews import Reviews

PREDICTED = ["image_id", "error", "review_priority", "instances"]
REVIEWED = ["image_id", "image_uri", "width", "height", "instances", "run", "ls_task", "lead_time_s", "annotator"]
TASK_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("image_uri", pa.string()), ("ls_task", pa.int64()), ("run", pa.string()),
    ("annotator", pa.string()), ("review_priority", pa.float64()), ("lead_time_s", pa.float64()),
    ("predicted", pa.int32()), ("reviewed", pa.int32()), ("kept", pa.int32()), ("edited", pa.int32()),
    ("class_changed", pa.int32()), ("deleted", pa.int32()), ("added", pa.int32()), ("edits", pa.int32()),
])
COUNTS = ("kept", "edited", "class_changed", "deleted", "added")


@dataclass
class Match:
    """One image's comparison: counts, and per category (category id -> counts)."""

    kept: int = 0
    edited: int = 0
    class_changed: int = 0
    deleted: int = 0
    added: int = 0
    ious: list[float] | None = None  # IoU of every matched pair
    per_category: dict[int, dict[str, int]] | None = None

    @property
    def edits(self) -> int:
        return self.edited + self.deleted + self.added


def match_instances(predicted: list[dict[str, Any]], reviewed: list[dict[str, Any]], match_iou: float = 0.5,
                    kept_iou: float = 0.9) -> Match:
    """Compare one image's predicted and reviewed instances (INSTANCE dicts, RLE masks of one size)."""
    result = Match(ious=[], per_category=defaultdict(lambda: dict.fromkeys(COUNTS, 0)))
    pairs: list[tuple[int, int, float]] = []
    if predicted and reviewed:
        iou = mask_utils.iou([_coco(p["segmentation"]) for p in predicted], [_coco(r["segmentation"]) for r in reviewed],
                             [0] * len(reviewed))
        same = np.array([[p["category_id"] == r["category_id"] for r in reviewed] for p in predicted])
        weight = np.where(iou >= match_iou, iou + same, 0.0)  # same category first, then IoU
        rows, cols = linear_sum_assignment(weight, maximize=True)
        pairs = [(i, j, float(iou[i, j])) for i, j in zip(rows, cols) if weight[i, j] > 0]
    for i, j, value in pairs:
        category = predicted[i]["category_id"]
        changed = category != reviewed[j]["category_id"]
        kind = "kept" if value >= kept_iou and not changed else "edited"
        setattr(result, kind, getattr(result, kind) + 1)
        result.per_category[category][kind] += 1
        if changed:
            result.class_changed += 1
            result.per_category[category]["class_changed"] += 1
        result.ious.append(value)
    for i in set(range(len(predicted))) - {i for i, _, _ in pairs}:
        result.deleted += 1
        result.per_category[predicted[i]["category_id"]]["deleted"] += 1
    for j in set(range(len(reviewed))) - {j for _, j, _ in pairs}:
        result.added += 1
        result.per_category[reviewed[j]["category_id"]]["added"] += 1
    return result


def _coco(segmentation: dict[str, Any]) -> dict[str, Any]:
    return {"size": list(segmentation["size"]), "counts": segmentation["counts"].encode()}


def acceptance(results: Results, reviews: Reviews, tasks_path: str | None = None, match_iou: float = 0.5,
               kept_iou: float = 0.9, with_ap: bool = True) -> dict[str, Any]:
    """The acceptance figures (module docstring); per-image rows go to `tasks_path` (a local
    Parquet file) when given."""
    if not reviews.pulls():
        raise ConfigError(f"no reviews in {results.root}: pull some first (batchseg pull labelstudio|coco OUTPUT ...)")
    names = {c["id"]: c["name"] for table in results.categories.values() for c in table.get("things", [])}
    totals = dict.fromkeys(COUNTS, 0)
    per_category: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNTS, 0))
    iou_sum, iou_n = 0.0, 0
    priority, edits, lead, instances = [], [], [], []
    gt = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in sorted(names.items())]}
    detections: list[dict[str, Any]] = []
    unscored = 0
    writer = pq.ParquetWriter(tasks_path, TASK_SCHEMA) if tasks_path else None
    page: list[dict[str, Any]] = []
    try:
        with Seen(results, reviews) as seen:
            for review in reviews.rows(REVIEWED):
                shown = seen.get(review["image_id"], review["run"])
                if shown is None or shown["error"] is not None or review["instances"] is None:
                    unscored += 1
                    continue
                # an empty mask was never shown (push leaves it out): the annotator could not keep it
                predicted = [p for p in shown["instances"] or [] if p["area"]]
                m = match_instances(predicted, review["instances"], match_iou, kept_iou)
                for k in COUNTS:
                    totals[k] += getattr(m, k)
                for category, counts in m.per_category.items():
                    for k, v in counts.items():
                        per_category[category][k] += v
                iou_sum, iou_n = iou_sum + sum(m.ious), iou_n + len(m.ious)
                p = shown.get("review_priority")
                priority.append(np.nan if p is None else p)
                edits.append(m.edits)
                lead.append(np.nan if review["lead_time_s"] is None else review["lead_time_s"])
                instances.append(max(len(predicted), len(review["instances"]), 1))
                if with_ap:
                    _add_to_coco(gt, detections, len(gt["images"]) + 1, review, predicted)
                page.append({**{k: review.get(k) for k in ("image_id", "image_uri", "ls_task", "run", "annotator")},
                             "review_priority": p, "lead_time_s": review["lead_time_s"], "predicted": len(predicted),
                             "reviewed": len(review["instances"]), **{k: getattr(m, k) for k in COUNTS}, "edits": m.edits})
                if writer and len(page) >= 10_000:
                    writer.write_table(pa.Table.from_pylist(page, TASK_SCHEMA))
                    page = []
                elif not writer:
                    page = []
            runs = seen.runs
        if writer and page:
            writer.write_table(pa.Table.from_pylist(page, TASK_SCHEMA))
    finally:
        if writer:
            writer.close()
    images = len(edits)
    report: dict[str, Any] = {
        "images": {"reviewed": images + unscored, "scored": images, "unscored": unscored},
        "thresholds": {"match_iou": match_iou, "kept_iou": kept_iou},
        "runs": runs,
        "pulls": reviews.pulls(),
        "overall": {**totals, "mean_iou": round(iou_sum / iou_n, 4) if iou_n else None},
        "per_category": {names.get(c, str(c)): v for c, v in sorted(per_category.items())},
        "lead_time_by_edits": _lead_time_by_edits(np.asarray(edits), np.asarray(lead, float)),
        "review_priority": _priority_check(np.asarray(priority, float), np.asarray(edits, float),
                                           np.asarray(instances, float)),
    }
    if with_ap and gt["annotations"]:
        image_ids = [img["id"] for img in gt["images"]]
        report["ap"] = {t: coco_metrics(gt, _for_iou_type(detections, t), t, image_ids) for t in ("bbox", "segm")}
    return report


def _add_to_coco(gt: dict[str, Any], detections: list[dict[str, Any]], image: int, review: dict[str, Any],
                 predicted: list[dict[str, Any]]) -> None:
    gt["images"].append({"id": image, "width": review["width"], "height": review["height"], "file_name": review["image_uri"]})
    for inst in review["instances"]:
        gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image, "category_id": inst["category_id"],
                                  "bbox": inst["bbox"], "area": inst["area"], "iscrowd": 0,
                                  "segmentation": inst["segmentation"]})
    detections.extend({"image_id": image, "category_id": p["category_id"], "bbox": p["bbox"], "score": p["score"],
                       "segmentation": p["segmentation"]} for p in predicted)


def _lead_time_by_edits(edits: np.ndarray, lead: np.ndarray) -> list[dict[str, Any]]:
    """Per number of edits: images, and the median lead time (s) of those that have one."""
    out = []
    for n in np.unique(edits):
        times = lead[(edits == n) & ~np.isnan(lead)]
        out.append({"edits": int(n), "images": int(np.count_nonzero(edits == n)),
                    "median_lead_time_s": round(float(np.median(times)), 3) if len(times) else None})
    return out


def _priority_check(priority: np.ndarray, edits: np.ndarray, instances: np.ndarray) -> dict[str, Any]:
    """Spearman's rho of priority against edits, and the edit rate of the top and bottom
    priority deciles (images without a priority left out)."""
    has = ~np.isnan(priority)
    p, e, n = priority[has], edits[has], instances[has]
    out: dict[str, Any] = {"images": int(has.sum()), "spearman_rho": None, "p_value": None,
                           "top_decile_edit_rate": None, "bottom_decile_edit_rate": None}
    if len(p) >= 2 and np.ptp(p) > 0 and np.ptp(e) > 0:
        rho, pvalue = spearmanr(p, e)
        out.update(spearman_rho=round(float(rho), 4), p_value=round(float(pvalue), 6))
    if len(p):
        order = np.argsort(-p, kind="stable")
        k = max(1, int(np.ceil(len(p) / 10)))
        top, bottom = order[:k], order[-k:]
        out.update(top_decile_edit_rate=round(float(e[top].sum() / n[top].sum()), 4),
                   bottom_decile_edit_rate=round(float(e[bottom].sum() / n[bottom].sum()), 4), decile_images=k,
                   edit_rate_by_decile=[round(float(e[d].sum() / n[d].sum()), 4)
                                        for d in np.array_split(order, min(10, len(p)))])
    return out


def format_table(report: dict[str, Any]) -> str:
    """The report as the lines `batchseg acceptance` prints."""
    images, overall = report["images"], report["overall"]
    lines = [f"reviewed images: {images['reviewed']} ({images['scored']} scored, {images['unscored']} without the "
             f"predictions seen); kept = same class, IoU >= {report['thresholds']['kept_iou']}",
             f"{'category':16s} {'kept':>7s} {'edited':>7s} {'(class)':>7s} {'deleted':>7s} {'added':>7s} {'kept %':>7s}"]
    for name, c in [*report["per_category"].items(), ("all", overall)]:
        shown = c["kept"] + c["edited"] + c["deleted"]
        rate = f"{100 * c['kept'] / shown:.1f}" if shown else "n/a"
        lines.append(f"{name:16s} {c['kept']:7d} {c['edited']:7d} {c['class_changed']:7d} {c['deleted']:7d} "
                     f"{c['added']:7d} {rate:>7s}")
    lines.append(f"mean IoU of kept and edited: {overall['mean_iou']}")
    lines.append("median lead time by edits: " + ", ".join(
        f"{e['edits']} edits {e['median_lead_time_s']} s ({e['images']} images)" for e in report["lead_time_by_edits"]))
    p = report["review_priority"]
    lines.append(f"review_priority: Spearman rho {p['spearman_rho']} (p {p['p_value']}) over {p['images']} images; "
                 f"edit rate top decile {p['top_decile_edit_rate']}, bottom decile {p['bottom_decile_edit_rate']}")
    for kind, values in report.get("ap", {}).items():
        lines.append(f"AP vs reviews {kind:5s}" + "".join(f"  {k} {'n/a' if v is None else f'{v:.2f}'}"
                                                          for k, v in values.items() if k in ("AP", "AP50", "AP75")))
    return "\n".join(lines)


def draw(report: dict[str, Any]) -> bytes:
    """A PNG: acceptance by category (stacked bars: kept, edited, deleted, added) beside the
    edit rate by review_priority decile (a queue that ranks well falls from left to right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    names = [*report["per_category"], "all"]
    counts = [*report["per_category"].values(), report["overall"]]
    colors = {"kept": "#4caf50", "edited": "#ffb300", "deleted": "#e53935", "added": "#1e88e5"}
    start = np.zeros(len(names))
    for kind, color in colors.items():
        values = np.array([c[kind] for c in counts], float)
        left.barh(names, values, left=start, color=color, label=kind)
        start += values
    left.invert_yaxis()
    left.set_xlabel("instances")
    left.set_title(f"What reviewers did with the pre-labels ({report['images']['scored']} images)")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, fontsize=8, frameon=False)
    p = report["review_priority"]
    rates = p.get("edit_rate_by_decile") or []
    right.bar(range(1, len(rates) + 1), rates, color="#6d4c41")
    right.set_xlabel("review_priority decile (1 = looked at first)")
    right.set_ylabel("edits per instance")
    right.set_title(f"Was the queue right? Spearman rho = {p['spearman_rho']}")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out.getvalue()


class Seen:
    """The prediction rows the annotators saw, spooled to a local file: `get(image_id, run)`.

    Built with one pass over the reviews (their image ids and runs) and one over the files of
    each run they name; reviews without a run (or whose run's row is gone) get the image's
    newest row, read in one pass of the merged newest rows."""

    def __init__(self, results: Results, reviews: Reviews) -> None:
        self._file = tempfile.TemporaryFile(prefix="batchseg-acceptance-")
        ids, run_names = [], []
        for r in reviews.rows(["run"]):
            ids.append(r["image_id"])
            run_names.append(r["run"] or "")
        names = sorted(set(run_names))
        index = {n: i for i, n in enumerate(names)}
        ids_a = np.asarray(ids, np.int64)
        runs_a = np.asarray([index[n] for n in run_names], np.int32)
        self._key_runs, self._key_ids = array("q"), array("q")
        offsets: list[int] = []
        by_run: dict[str, list[str]] = defaultdict(list)
        for path in results.files:
            by_run[run_of(path)].append(path)
        found = np.zeros(len(ids_a), bool)
        for name, i in index.items():
            wanted = np.unique(ids_a[runs_a == i])
            if name and name in by_run:
                got = self._spool(results, by_run[name], wanted, i, offsets)
                found[runs_a == i] = np.isin(ids_a[runs_a == i], got)
        newest = np.unique(ids_a[~found])
        self.runs = {n or "(newest)": int(np.count_nonzero(runs_a == i)) for n, i in index.items()}
        self._newest = len(names)
        if len(newest):
            self._spool_rows(self._newest_rows(results, newest), self._newest, offsets)
        offsets.append(self._file.tell())
        key_runs, key_ids = np.frombuffer(self._key_runs, np.int64), np.frombuffer(self._key_ids, np.int64)
        order = np.lexsort((key_ids, key_runs))
        self._run_index, self._ids = key_runs[order], key_ids[order]
        self._start = np.asarray(offsets[:-1], np.int64)[order]
        self._end = np.asarray(offsets[1:], np.int64)[order]
        self._index = index

    def get(self, image_id: int, run: str | None) -> dict[str, Any] | None:
        for r in (self._index.get(run or ""), self._newest):
            if r is None:
                continue
            hit = self._find(r, image_id)
            if hit is not None:
                return hit
        return None

    def _find(self, run: int, image_id: int) -> dict[str, Any] | None:
        lo = np.searchsorted(self._run_index, run, "left")
        hi = np.searchsorted(self._run_index, run, "right")
        at = lo + np.searchsorted(self._ids[lo:hi], image_id)
        if at < hi and self._ids[at] == image_id:
            return pickle.loads(os.pread(self._file.fileno(), int(self._end[at] - self._start[at]), int(self._start[at])))
        return None

    def _spool(self, results: Results, files: list[str], wanted: np.ndarray, run: int, offsets: list[int]) -> np.ndarray:
        got = []
        for path in files:
            for batch in results._batches(path, PREDICTED, 256):
                ids = batch.column("image_id").to_numpy()
                keep = np.isin(ids, wanted)
                if keep.any():
                    rows = batch.filter(pa.array(keep)).to_pylist()
                    self._spool_rows(iter(rows), run, offsets)
                    got.extend(r["image_id"] for r in rows)
        return np.asarray(got, np.int64)

    def _newest_rows(self, results: Results, wanted: np.ndarray) -> Iterator[dict[str, Any]]:
        for row in results.rows(PREDICTED[1:]):
            at = np.searchsorted(wanted, row["image_id"])
            if at < len(wanted) and wanted[at] == row["image_id"]:
                yield row

    def _spool_rows(self, rows: Iterator[dict[str, Any]], run: int, offsets: list[int]) -> None:
        for row in rows:
            offsets.append(self._file.tell())
            self._key_runs.append(run)
            self._key_ids.append(row["image_id"])
            pickle.dump(row, self._file, protocol=pickle.HIGHEST_PROTOCOL)
        self._file.flush()

    def __enter__(self) -> "Seen":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

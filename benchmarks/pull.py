"""`batchseg pull labelstudio` over 10^4 .. 10^5+ annotated tasks, and the acceptance report over them.

    python benchmarks/pull.py [--tasks 10000 100000] [--brush-tasks 2000] [--page-size 100]

A local fake of Label Studio's task pages (an HTTP server on 127.0.0.1 answering
/api/projects/ID/, /api/users/ and /api/tasks/ pages as Label Studio does, generated on the fly)
stands in for the server: the live one is tested in tests/exports/test_labelstudio_pull.py.
The real pull runs against it through label-studio-sdk and httpx, decodes every brush with
label-studio-sdk's converter and writes the reviews' Parquet. Each count runs in its own
process (a lake of that many 64 x 48 images with two instances and a person each, written
first), so peak RSS is the pull's own; then `acceptance` reads the pull back against the runs
(--no-ap: COCOeval holds every instance by design). Prints figures; asserts nothing. On a
shared, loaded machine compare the per-CPU-second figures (this process's CPU time; the fake
server's threads count too), not wall-clock rates.

Regions: `polygons` (the ring a polygon, the dog a rectangle, 17 keypoints: what the pull
itself costs) for --tasks, and `brushes` (both masks brushes, as push writes them) for
--brush-tasks: label-studio-sdk's brush decoder is pure Python, bit by bit, and dominates there.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUN_ID = "20261122T000000Z-0001"
SAVED = datetime(2026, 12, 1, tzinfo=timezone.utc)  # task i was last saved i seconds after this
H, W = 48, 64


def masks():
    import numpy as np

    ring = np.zeros((H, W), bool)
    ring[5:30, 5:35] = True
    ring[12:20, 15:22] = False
    dog = np.zeros((H, W), bool)
    dog[34:46, 40:60] = True
    return ring, dog


def write_lake(folder: Path, count: int) -> None:
    """`count` images, 2000 rows a file, in one run with its report."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchseg.rows.encoding import encode_mask
    from batchseg.rows.schema import ROW, image_id
    from tests.annotated_rows import KEYPOINT_NAMES, run_report

    ring, dog = masks()
    instances = [{"category_id": c, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.9, "area": int(m.sum()),
                  "segmentation": encode_mask(m)} for c, m in ((1, ring), (18, dog))]
    person = [{"category_id": 1, "bbox": [5.0, 5.0, 30.0, 25.0], "score": 0.8,
               "keypoints": [v for k in range(len(KEYPOINT_NAMES)) for v in (5.0 + k, 6.0 + k, 1.0)]}]
    part = folder / "annotations" / f"run={RUN_ID}"
    part.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for start in range(0, count, 2000):
        n = min(2000, count - start)
        rows = [{"image_id": image_id(uri(i)), "image_uri": uri(i), "width": W, "height": H, "error": None,
                 "review_priority": float(p), "instances": instances, "keypoints": person}
                for i, p in zip(range(start, start + n), rng.random(n))]
        pq.write_table(pa.Table.from_pylist(rows, schema=ROW), part / f"part-{start // 2000:05d}.parquet")
    report = json.dumps(run_report(RUN_ID, ["s3://lake"]))
    (folder / "runs").mkdir()
    (folder / "runs" / f"{RUN_ID}.json").write_text(report)
    (folder / "run.json").write_text(report)


def uri(i: int) -> str:
    return f"s3://lake/{i:08d}.jpg"


class FakeLabelStudio:
    """Label Studio's task pages for `count` annotated tasks, made on request: task i accepts
    the predictions, every 5th deletes the dog, every 7th shrinks the ring."""

    def __init__(self, count: int, regions: str) -> None:
        import numpy as np

        from batchseg.exports.labelstudio import brush_rle
        from batchseg.rows.schema import image_id
        from tests.annotated_rows import KEYPOINT_NAMES

        ring, dog = masks()
        small = ring.copy()
        small[:, 28:35] = False
        self.count, self.image_id = count, image_id

        def region(rid, kind, name, value):
            return {"id": rid, "type": kind, "from_name": name, "to_name": "image", "original_width": W,
                    "original_height": H, "image_rotation": 0, "value": value}

        def outline(mask):  # the block's corners in percent (the ring's hole is not in a polygon)
            ys, xs = np.nonzero(mask)
            x0, x1, y0, y1 = 100 * xs.min() / W, 100 * (xs.max() + 1) / W, 100 * ys.min() / H, 100 * (ys.max() + 1) / H
            return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]

        def result(ring_mask, with_dog):
            if regions == "brushes":
                out = [region("i0m", "brushlabels", "mask", {"format": "rle", "rle": brush_rle(ring_mask),
                                                             "brushlabels": ["person"]})]
                if with_dog:
                    out.append(region("i1m", "brushlabels", "mask", {"format": "rle", "rle": brush_rle(dog),
                                                                     "brushlabels": ["dog"]}))
            else:
                out = [region("p0", "polygonlabels", "polygon", {"points": outline(ring_mask), "polygonlabels": ["person"]})]
                if with_dog:
                    (x0, y0), _, (x1, y1), _ = outline(dog)
                    out.append(region("i1", "rectanglelabels", "box", {"x": x0, "y": y0, "width": x1 - x0,
                                                                        "height": y1 - y0, "rectanglelabels": ["dog"]}))
            out += [region(f"k0_{k}", "keypointlabels", "keypoints", {"x": 100 * (5.5 + k) / W, "y": 100 * (6.5 + k) / H,
                                                                       "width": 0.5, "keypointlabels": [name]})
                    for k, name in enumerate(KEYPOINT_NAMES)]
            return out

        self.results = {"accept": result(ring, True), "delete": result(ring, False), "shrink": result(small, True)}
        self.np = np

    def task(self, i: int) -> dict:
        kind = "delete" if i % 5 == 0 else "shrink" if i % 7 == 0 else "accept"
        stamp = (SAVED + timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {"id": i + 1, "data": {"image": uri(i), "image_id": self.image_id(uri(i)), "batchseg_run": RUN_ID},
                "annotations": [{"id": i + 1, "completed_by": 1, "result": self.results[kind], "was_cancelled": False,
                                 "ground_truth": False, "created_at": stamp, "updated_at": stamp, "lead_time": 5.0 + i % 13,
                                 "parent_prediction": i + 1, "task": i + 1, "project": 1}],
                "predictions": [{"id": i + 1, "model_version": "bench", "result": [], "score": 0.5, "task": i + 1}],
                "total_annotations": 1, "cancelled_annotations": 0, "total_predictions": 1,
                "created_at": stamp, "updated_at": stamp, "project": 1}

    @staticmethod
    def first_after(query: str | None) -> int:
        """The first task a Data Manager query's `updated_at > VALUE` filter lets through (task
        i was saved at SAVED + i seconds; the pull pages by that filter, always at page 1)."""
        for item in (json.loads(query)["filters"]["items"] if query else []):
            if item["filter"] == "filter:tasks:updated_at" and item["operator"] == "greater":
                after = datetime.strptime(item["value"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
                return max(0, math.floor((after - SAVED).total_seconds()) + 1)
        return 0

    def serve(self) -> ThreadingHTTPServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path.startswith("/api/projects/"):
                    body, status = {"id": 1, "title": "bench", "task_number": fake.count}, 200
                elif url.path.startswith("/api/users"):
                    body, status = [{"id": 1, "email": "annotator@example.com", "username": "a"}], 200
                elif url.path.startswith("/api/tasks"):
                    page, size = int(query.get("page", 1)), int(query.get("page_size", 100))
                    first = fake.first_after(query.get("query")) + (page - 1) * size
                    if first >= fake.count and page > 1:
                        body, status = {"detail": "Invalid page."}, 404
                    else:
                        tasks = [fake.task(i) for i in range(first, min(first + size, fake.count))]
                        body, status = {"tasks": tasks, "total": fake.count, "total_annotations": fake.count,
                                        "total_predictions": fake.count}, 200
                else:
                    body, status = {"detail": "not found"}, 404
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


def child(count: int, page_size: int, folder: Path, regions: str) -> None:
    """In its own process: write the lake, pull, then score; print one JSON line of figures."""
    from batchseg.evaluation.acceptance import acceptance
    from batchseg.exports.labelstudio_pull import PullSettings, pull_labelstudio
    from batchseg.store.results import open_results
    from batchseg.store.reviews import open_reviews

    write_lake(folder, count)
    server = FakeLabelStudio(count, regions).serve()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began, cpu = time.perf_counter(), time.process_time()
    receipt = pull_labelstudio(str(folder), f"http://127.0.0.1:{server.server_port}", "1", "token",
                               PullSettings(page_size=page_size))
    pull_s, pull_cpu = time.perf_counter() - began, time.process_time() - cpu
    pull_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began, cpu = time.perf_counter(), time.process_time()
    report = acceptance(open_results(str(folder)), open_reviews(str(folder)), str(folder / "tasks.parquet"), with_ap=False)
    accept_s, accept_cpu = time.perf_counter() - began, time.process_time() - cpu
    server.shutdown()
    parquet = sum(p.stat().st_size for p in (folder / "reviews").rglob("*.parquet"))
    print(json.dumps({"regions": regions, "tasks": count, "rows": receipt["rows"], "pull_s": round(pull_s, 2),
                      "tasks_per_s": round(count / pull_s, 1),
                      "tasks_per_cpu_s": round(count / pull_cpu, 1), "rss_before_mib": round(base / 1024, 1),
                      "pull_peak_rss_mib": round(pull_peak / 1024, 1), "reviews_mib": round(parquet / 2**20, 2),
                      "acceptance_s": round(accept_s, 2), "acceptance_rows_per_s": round(count / accept_s, 1),
                      "acceptance_rows_per_cpu_s": round(count / accept_cpu, 1),
                      "acceptance_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "kept": report["overall"]["kept"], "edited": report["overall"]["edited"],
                      "deleted": report["overall"]["deleted"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--brush-tasks", type=int, nargs="*", default=[2000])
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--regions", default="polygons", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.page_size, Path(args.folder), args.regions)
        return
    print(f"{'regions':>8s} {'tasks':>8s} {'pull s':>8s} {'tasks/s':>8s} {'peak MiB':>9s} {'(start)':>8s} {'Parquet MiB':>11s} "
          f"{'accept s':>9s} {'rows/s':>8s} {'peak MiB':>9s}")
    for regions, count in [*(("polygons", n) for n in args.tasks), *(("brushes", n) for n in args.brush_tasks)]:
        with tempfile.TemporaryDirectory(prefix="batchseg-bench-pull-") as tmp:
            out = subprocess.run([sys.executable, __file__, "--child", str(count), "--page-size", str(args.page_size),
                                  "--folder", f"{tmp}/lake", "--regions", regions],
                                 check=True, capture_output=True, text=True, cwd=REPO)
        f = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{regions:>8s} {f['tasks']:8d} {f['pull_s']:8.1f} {f['tasks_per_s']:8.1f} {f['pull_peak_rss_mib']:9.1f} "
              f"{f['rss_before_mib']:8.1f} {f['reviews_mib']:11.2f} {f['acceptance_s']:9.1f} "
              f"{f['acceptance_rows_per_s']:8.1f} {f['acceptance_peak_rss_mib']:9.1f}")
        print("  " + json.dumps(f))


if __name__ == "__main__":
    main()

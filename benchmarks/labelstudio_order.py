"""Worst-first ordering for `batchseg push labelstudio` over 10^4 .. 10^6 rows: time, peak RSS, spool size.

    python benchmarks/labelstudio_order.py [--rows 10000 100000 1000000]

Each count runs in its own process: results are written (one run, random review_priority,
one small instance mask per image, 2000 rows per file), then read the way the push reads them
(`Results.rows(COLUMNS)` into `WorstFirst`) and iterated in order, without building tasks or
touching a server. Peak RSS must grow by only the per-row index (16 bytes, ~40 at the argsort);
the rows themselves go to the spool file. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WRITE = """
import sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq
from pathlib import Path
from batchseg.rows.encoding import encode_mask
from batchseg.rows.schema import ROW, image_id
folder, count = Path(sys.argv[1]), int(sys.argv[2])
part = folder / "annotations" / "run=20261122T000000Z-0001"
part.mkdir(parents=True)
mask = np.zeros((48, 64), bool); mask[10:30, 5:40] = True
inst = [{"category_id": 1, "bbox": [5.0, 10.0, 35.0, 20.0], "score": 0.9, "area": int(mask.sum()),
         "segmentation": encode_mask(mask)}]
rng = np.random.default_rng(0)
for start in range(0, count, 2000):
    n = min(2000, count - start)
    p = rng.random(n)
    rows = [{"image_id": image_id(f"s3://lake/{i:08d}.jpg"), "image_uri": f"s3://lake/{i:08d}.jpg", "width": 64,
             "height": 48, "error": None, "review_priority": None if i % 10 == 0 else float(p[i - start]),
             "instances": inst} for i in range(start, start + n)]
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW), part / f"part-{start // 2000:05d}.parquet")
"""

ORDER = """
import resource, sys, time
from batchseg.exports.labelstudio import COLUMNS
from batchseg.exports.labelstudio_push import WorstFirst
from batchseg.store.results import open_results
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
with WorstFirst(open_results(sys.argv[1]).rows(COLUMNS), sys.argv[2]) as ordered:
    spooled = time.perf_counter() - start
    last, n = 2.0, 0
    for row in ordered:
        p = row["review_priority"]
        assert p is None or p <= last
        last = -1.0 if p is None else p
        n += 1
    size = ordered._file.tell()
total = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(n, spooled, total, size, base, peak)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="batchseg-ls-order-"))
    for count in args.rows:
        results = work / f"r{count}"
        subprocess.run([sys.executable, "-c", WRITE, str(results), str(count)], cwd=REPO, check=True)
        out = subprocess.run([sys.executable, "-c", ORDER, str(results), str(work)], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout.split()
        n, spooled, total, size, base, peak = int(out[0]), float(out[1]), float(out[2]), int(out[3]), int(out[4]), int(out[5])
        print(f"{n:9d} rows: spool pass {spooled:6.1f} s, ordered read {total - spooled:6.1f} s "
              f"({n / total:7.0f} rows/s), spool {size / 2**20:7.1f} MiB, "
              f"peak RSS {peak / 1024:6.1f} MiB (+{(peak - base) / 1024:5.1f} MiB over the imports)")


if __name__ == "__main__":
    main()

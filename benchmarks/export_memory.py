"""Peak memory of `batchseg export coco` over N and 4N result rows. Prints figures; asserts nothing.

    python benchmarks/export_memory.py [--rows 2000]

Each export runs in its own process; its peak RSS must stay flat as the row count grows,
because rows stream from Parquet in batches and the JSON is written item by item.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_results(folder: Path, count: int) -> Path:
    """In a process of its own: Linux carries a parent's peak RSS into a forked child's
    ru_maxrss, so a parent that had built the rows would inflate the export's figure."""
    code = f"from tests.synthetic_results import write_results; write_results(__import__('pathlib').Path({str(folder)!r}), {count}, 500)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    return folder


def export_peak_mib(results: Path, dest: Path) -> tuple[float, float]:
    """(peak RSS of the export process in MiB, seconds)."""
    code = (
        "import resource, sys; from batchseg.cli import main; rc = main(['export', 'coco', sys.argv[1], sys.argv[2]]); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, str(results), str(dest)], capture_output=True, text=True,
                         check=True, cwd=REPO)
    peak_kib = int(out.stdout.rsplit("PEAK", 1)[1])
    return peak_kib / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="batchseg-export-bench-"))
    for n in (args.rows, 4 * args.rows):
        results = write_results(work / f"r{n}", n)
        peak, seconds = export_peak_mib(results, work / f"coco{n}")
        size = sum(p.stat().st_size for p in (work / f"coco{n}").glob("*.json")) / 2**20
        print(f"{n:7d} rows (instances, keypoints, DensePose each): export peak RSS {peak:7.1f} MiB, "
              f"{seconds:6.1f} s, {size:7.1f} MiB of JSON written")


if __name__ == "__main__":
    main()

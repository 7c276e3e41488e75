"""A run's fixed start-up: from the command to the first row written. Prints figures; asserts nothing.

    python benchmarks/startup.py [--images 8] [--repeats 3]

`python -m batchseg run` (a fresh local Ray each time, as a nightly run over a small delta
starts) over N 1920x1080 JPEGs with the zero-cost model (benchmarks/throughput.py), timed
from outside:
- command -> run start: imports, config and input checks, `ray.init` (the report's started_at);
- run start -> the first batch in a predictor (the report's predictors.startup_s);
- run start -> the first row written (the first Parquet part's mtime; rows_per_file=1, so a part
  is written as soon as the first block's rows reach the write stage);
- command -> exit.
Then the imports alone, before and after 655cd24 in one run: `import batchseg.cli.main` as it
is, against the same plus the two modules every command imported until then (the train
recipe, which pulls in torch and torchvision, and the tracker, which pulls in scipy).
Medians of --repeats, alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from throughput import make_images  # noqa: E402

IMPORTS = {"now": "import batchseg.cli.main",
           "before 655cd24": "import batchseg.cli.main, batchseg.train.recipe, batchseg.run.tracking"}


def one_run(images: Path, out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "benchmarks")])}
    began = time.time()
    subprocess.run([sys.executable, "-m", "batchseg", "run", "--input", str(images), "--output", str(out), "--device",
                    "cpu", "--backend", "throughput:ZeroCostBackend", "--set", "rows_per_file=1"], cwd=REPO, env=env,
                   check=True, capture_output=True)
    ended = time.time()
    report = json.loads((out / "run.json").read_text())
    started = datetime.fromisoformat(report["started_at"]).timestamp()
    first_row = min(p.stat().st_mtime for p in out.glob("annotations/run=*/*.parquet"))
    return {"command to run start": started - began, "run start to first batch": report["predictors"]["startup_s"],
            "run start to first row": first_row - started, "command to first row": first_row - began,
            "command to exit": ended - began}


def import_seconds(code: str) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    make_images(work / "images", args.images, size=(1080, 1920), keep=False)
    runs = [one_run(work / "images", work / f"out-{i}") for i in range(args.repeats)]
    print(f"`batchseg run` over {args.images} 1920x1080 JPEGs, zero-cost model, fresh local Ray; "
          f"median of {args.repeats} (min..max), seconds:")
    for phase in runs[0]:
        values = [r[phase] for r in runs]
        print(f"  {phase:26s} {statistics.median(values):7.2f}  ({min(values):.2f}..{max(values):.2f})")
    imports: dict[str, list[float]] = {name: [] for name in IMPORTS}
    for _ in range(args.repeats):
        for name, code in IMPORTS.items():
            imports[name].append(import_seconds(code))
    now, before = (statistics.median(imports[name]) for name in IMPORTS)
    print(f"imports of every batchseg command: {now:.2f} s now, {before:.2f} s as before 655cd24 "
          f"(now / before = {now / before:.2f})")


if __name__ == "__main__":
    main()

"""Training throughput of `batchseg train`: images/s with 1 and with 2 Ray Train workers on CPU
(gloo), in the same run, and the ratio; where CUDA is available, images/s per GPU in fp32 and
with AMP.

    python benchmarks/train.py [--iterations 30] [--scenes 80] [--min-size 112] [--arch maskrcnn_resnet18_fpn]

Each configuration is a real `batchseg train` (a fresh local Ray, Ray Data decoding, DDP,
checkpoints) on the sample shapes; images/s is the trainer's own figure from the last
checkpoint of metrics.jsonl (images stepped through on all workers, per second of training,
from the first step: model building and the base model's held-out AP are left out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--scenes", type=int, default=80)
    parser.add_argument("--min-size", type=int, default=112)
    parser.add_argument("--arch", default="maskrcnn_resnet18_fpn")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    from batchseg.samples import write_samples

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    write_samples(work / "data", scenes=args.scenes, seed=1)
    runs = [("cpu", 1, []), ("cpu", 2, [])]
    if torch.cuda.is_available():
        runs += [("gpu fp32", 1, ["--use-gpu"]), ("gpu amp", 1, ["--use-gpu", "--amp"])]
    print(f"{args.arch}, {args.min_size} px, {args.iterations} iterations of 2 images per worker, "
          f"{args.scenes} scenes; {torch.get_num_threads()} torch threads, {torch.__version__}")
    print(f"{'device':<10} {'workers':>7} {'images/s':>9} {'per worker':>10} {'wall s':>7}")
    rates = {}
    for name, workers, flags in runs:
        out = work / f"{name.replace(' ', '-')}-{workers}"
        cmd = [sys.executable, "-m", "batchseg", "train", "--data", str(work / "data" / "ground_truth.json"),
               "--images", str(work / "data" / "images"), "--output", str(out), "--arch", args.arch,
               "--iterations", str(args.iterations), "--checkpoint-every", str(args.iterations),
               "--min-size", str(args.min_size), "--max-size", str(int(args.min_size * 1.7)),
               "--workers", str(workers), "--heldout", "0.05", *flags]
        started = time.monotonic()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.monotonic() - started
        if done.returncode != 0:
            print(f"{name:<10} {workers:>7} failed: {done.stderr.strip().splitlines()[-1]}")
            continue
        last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
        rates[(name, workers)] = rate = last["images_per_s"]
        print(f"{name:<10} {workers:>7} {rate:>9.2f} {rate / workers:>10.2f} {wall:>7.0f}")
    if ("cpu", 1) in rates and ("cpu", 2) in rates:
        print(f"scaling, 2 CPU workers / 1: {rates[('cpu', 2)] / rates[('cpu', 1)]:.2f}x")
    if ("gpu fp32", 1) in rates and ("gpu amp", 1) in rates:
        print(f"AMP / fp32 per GPU: {rates[('gpu amp', 1)] / rates[('gpu fp32', 1)]:.2f}x")


if __name__ == "__main__":
    main()

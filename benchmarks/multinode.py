"""Multi-node overhead, measured in one run: one node of N CPUs against two nodes of N/2.
Prints figures; asserts nothing.

    python benchmarks/multinode.py [--cpus 2] [--images 48] [--min-size 160] [--repeats 2]

Both clusters are local (`ray.cluster_utils.Cluster`, raylets on this machine): A is one
node of N CPUs; B is a head with 0 CPUs (as KubeRay recommends) and two workers of N/2 CPUs.
Placement gives both the same pool (N - 1 whole-CPU actors). Each run is `batchseg run` in a
subprocess (the driver, as a user starts it) with the free model (torchvision Mask R-CNN,
random init, no download) over the same synthetic JPEGs, alternating A and B `--repeats`
times. Figures: images/s from each run's report (wall time from planning to the last write,
model loading included), the ratio B / A (the multi-node overhead; 1.0 = none), and the
driver's peak RSS (the subprocess's ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        pixels = rng.integers(0, 255, (240, 320, 3), np.uint8)
        Image.fromarray(pixels).save(root / f"img_{i:04d}.jpg", quality=90)


def one_run(address: str, images: Path, out: Path, weights: Path, min_size: int) -> tuple[float, float]:
    """(images/s from the run's report, the driver's peak RSS in MiB)."""
    cmd = [sys.executable, "-m", "batchseg", "run", "--input", str(images), "--output", str(out),
           "--backend", "torchvision", "--model", "maskrcnn_resnet50_fpn", "--weights", str(weights),
           "--min-size", str(min_size), "--max-size", str(min_size * 4 // 3), "--device", "cpu",
           "--ray-address", address, "--set", "read_rows_per_block=4"]
    log = out.with_suffix(".log")
    with open(log, "w") as err:
        child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)  # reaped here, so its own rusage is ours to read
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"batchseg run failed:\n{log.read_text()[-2000:]}")
    report = json.loads((out / "run.json").read_text())
    return report["images_per_s"], usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus", type=int, default=2, help="N: CPUs of the single node (even)")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--min-size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import torch
    from ray.cluster_utils import Cluster
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    work = Path(tempfile.mkdtemp(prefix="bench-multinode-"))
    make_images(work / "images", args.images)
    weights = work / "maskrcnn_random.pth"
    torch.save(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict(), weights)

    one = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": args.cpus, "include_dashboard": False})
    two = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [two.add_node(num_cpus=args.cpus // 2) for _ in range(2)]
    figures: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    try:
        for r in range(args.repeats):
            for name, cluster in (("A", one), ("B", two)):
                figures[name].append(one_run(cluster.address, work / "images", work / f"out-{name}-{r}", weights,
                                             args.min_size))
                print(f"run {r} {name}: {figures[name][-1][0]:.3f} images/s, driver peak {figures[name][-1][1]:.0f} MiB",
                      flush=True)
    finally:
        for n in workers:
            two.remove_node(n, allow_graceful=False)
        for cluster in (one, two):
            cluster.remove_node(cluster.head_node, allow_graceful=False)

    best = {name: max(rate for rate, _ in runs) for name, runs in figures.items()}
    peak = {name: max(rss for _, rss in runs) for name, runs in figures.items()}
    print(f"\n{args.images} images, torchvision Mask R-CNN (random init) at min_size {args.min_size}, "
          f"{args.cpus - 1} actor(s) in both; best of {args.repeats}:")
    print(f"  A  one node of {args.cpus} CPUs:              {best['A']:.3f} images/s, driver peak {peak['A']:.0f} MiB")
    print(f"  B  head 0 + two nodes of {args.cpus // 2} CPUs:  {best['B']:.3f} images/s, driver peak {peak['B']:.0f} MiB")
    print(f"  multi-node ratio B / A: {best['B'] / best['A']:.3f}")


if __name__ == "__main__":
    main()

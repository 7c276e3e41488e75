"""Greedy one-to-one matching of two images' instances, shared by the fidelity tables of
benchmarks/gpu.py and benchmarks/hot_path.py (numpy only, so gpu.py keeps it on a bare box)."""

from __future__ import annotations

import numpy as np


def greedy_pairs(box_iou: np.ndarray, threshold: float = 0.5) -> list[tuple[int, int]]:
    """(i, j) pairs from an (A, B) box-IoU matrix whose cross-class cells are 0: highest IoU
    first, each row and column used once, none below `threshold`."""
    pairs, used_a, used_b = [], set(), set()
    for flat in np.argsort(-box_iou, axis=None):
        i, j = divmod(int(flat), box_iou.shape[1])
        if box_iou[i, j] < threshold:
            break
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        pairs.append((i, j))
    return pairs

"""Each task's output column and encoder: the one table that ties tasks to the schema."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchseg.rows import encoding
from batchseg.config import TASKS, ModelConfig


@dataclass(frozen=True)
class Task:
    column: str  # in schema.ROW
    encode: Callable[..., list[dict[str, Any]]]  # (result, score_threshold, allowed ids) -> cell
    persons_only: bool = False


TASK_TABLE = {
    "instance": Task("instances", encoding.encode_instances),
    "panoptic": Task("panoptic", encoding.encode_panoptic),
    "keypoint": Task("keypoints", encoding.encode_keypoints, persons_only=True),
    "densepose": Task("densepose", encoding.encode_densepose, persons_only=True),
}
assert tuple(TASK_TABLE) == TASKS


def allowed_ids(task: str, cfg: ModelConfig, backend: Any) -> set[int] | None:
    """Dataset ids a task keeps: the category allow-list, and persons only for person tasks."""
    names = list(cfg.categories or [])
    if TASK_TABLE[task].persons_only:
        names = [n for n in names if n == "person"] if names else ["person"]
    return backend.categories(cfg).ids_named(names) if names else None

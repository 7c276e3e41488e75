"""Each task's output column and encoder: the one table that ties tasks to the schema."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchseg import encoding
from batchseg.config import TASKS


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

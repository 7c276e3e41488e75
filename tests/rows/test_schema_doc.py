"""docs/schema.md and batchseg.rows.schema.ROW describe the same columns and types."""

import re
from pathlib import Path

import pyarrow as pa
import pytest

from batchseg.rows.schema import DENSEPOSE_PERSON, INSTANCE, KEYPOINT_PERSON, PANOPTIC_SEGMENT, REVIEW, ROW

DOC = (Path(__file__).resolve().parents[2] / "docs/schema.md").read_text()


def _documented(heading: str) -> dict[str, str]:
    section = DOC.split(heading, 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(\w+)` \| ([\w<>\[\]=, ]+) \|", section, flags=re.M))


def _doc_type(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        inner = t.value_type
        return f"list<{'struct' if pa.types.is_struct(inner) else inner}>"
    return "struct" if pa.types.is_struct(t) else str(t)


def test_review_columns_are_documented_with_their_types():
    assert _documented("## Reviews (`reviews/`)") == {f.name: _doc_type(f.type) for f in REVIEW}


def test_row_columns_are_documented_with_their_types():
    assert _documented("## One row per input image") == {f.name: _doc_type(f.type) for f in ROW}


@pytest.mark.parametrize("heading, struct", [
    ("## An instance", INSTANCE),
    ("## A panoptic segment", PANOPTIC_SEGMENT),
    ("## A person with keypoints", KEYPOINT_PERSON),
    ("## A person with DensePose", DENSEPOSE_PERSON),
])
def test_struct_fields_are_documented_with_their_types(heading, struct):
    assert _documented(heading) == {f.name: _doc_type(f.type) for f in struct}

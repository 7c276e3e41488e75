"""The Arrow schema of an output row: the contract with every consumer (see docs/schema.md).

One row per input image, whatever happened to it. `error` is null on success; on failure it
holds a one-line reason, `instances` is null and width/height are null if the image never
decoded. An image with nothing detected has `instances == []`.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

SEGMENTATION = pa.struct([
    pa.field("size", pa.list_(pa.int32()), nullable=False),  # [height, width]
    pa.field("counts", pa.string(), nullable=False),  # COCO compressed RLE, column-major
])

INSTANCE = pa.struct([
    pa.field("category_id", pa.int32(), nullable=False),  # dataset id (COCO: 1..90)
    pa.field("bbox", pa.list_(pa.float64()), nullable=False),  # [x, y, w, h], original pixels
    pa.field("score", pa.float64(), nullable=False),
    pa.field("area", pa.int64(), nullable=False),  # mask area, pixels
    pa.field("segmentation", SEGMENTATION, nullable=False),
])

ROW = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("width", pa.int32()),  # upright (after EXIF orientation), pixels
    pa.field("height", pa.int32()),
    pa.field("source_size", pa.int64()),  # bytes of the image file (or tar member)
    pa.field("source_version", pa.string()),  # ETag or mtime of the listed object
    pa.field("error", pa.string()),
    pa.field("instances", pa.list_(pa.field("item", INSTANCE, nullable=False))),
])


def image_id(uri: str) -> int:
    """Stable positive 63-bit id of an image URI: the same URI gets the same id in every run."""
    return int.from_bytes(hashlib.sha256(uri.encode("utf-8")).digest()[:8], "big") >> 1

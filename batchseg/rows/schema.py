"""The Arrow schema of an output row: the contract with every consumer (see docs/schema.md).

One row per input image, whatever happened to it. `error` is null on success; on failure it
holds a one-line reason, every task column is null, and width/height are null if the image
never decoded. A task column is null when its task was not run; a task that found nothing
gives `[]`.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

ANNOTATIONS = "annotations"  # OUTPUT/annotations/run=RUN_ID/part-*.parquet: the rows
RUNS = "runs"  # OUTPUT/runs/RUN_ID.json: each run's report (OUTPUT/run.json: the latest)
LEDGER = "_ledger"  # OUTPUT/_ledger/: compact keys of what is done (batchseg.store.ledger)
REVIEWS = "reviews"  # OUTPUT/reviews/pull=PULL_ID/part-*.parquet + reviews/pulls/PULL_ID.json (batchseg.store.reviews)
TRACKS = "tracks"  # OUTPUT/tracks/video-VIDEO_ID.parquet: a tracked video's track ids (batchseg.store.tracks)
ERROR_KINDS = ("content", "model", "transient")  # see docs/schema.md, "error_kind"

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
    pa.field("track_id", pa.int32()),  # video frames with video.track: the instance's track (see TRACKS)
])

KEYPOINT_PERSON = pa.struct([
    pa.field("category_id", pa.int32(), nullable=False),
    pa.field("bbox", pa.list_(pa.float64()), nullable=False),
    pa.field("score", pa.float64(), nullable=False),
    pa.field("keypoints", pa.list_(pa.float64()), nullable=False),  # K x [x, y, v], flattened
])

PANOPTIC_SEGMENT = pa.struct([
    pa.field("id", pa.int32(), nullable=False),  # value in the panoptic id map (0 = void)
    pa.field("category_id", pa.int32(), nullable=False),  # COCO thing or stuff id
    pa.field("isthing", pa.bool_(), nullable=False),
    pa.field("area", pa.int64(), nullable=False),
    pa.field("bbox", pa.list_(pa.float64()), nullable=False),  # of the segment's pixels
    pa.field("score", pa.float64()),  # things only
    pa.field("segmentation", SEGMENTATION, nullable=False),
])

DENSEPOSE_PERSON = pa.struct([
    pa.field("category_id", pa.int32(), nullable=False),
    pa.field("bbox", pa.list_(pa.float64()), nullable=False),
    pa.field("score", pa.float64(), nullable=False),
    pa.field("segmentation", SEGMENTATION, nullable=False),  # DensePose foreground
    pa.field("iuv_png", pa.binary(), nullable=False),  # PNG of (I, U*255, V*255) over the box
])


def _list_of(struct: pa.StructType) -> pa.ListType:
    return pa.list_(pa.field("item", struct, nullable=False))


ROW = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("width", pa.int32()),  # upright (after EXIF orientation), pixels
    pa.field("height", pa.int32()),
    pa.field("source_size", pa.int64()),  # bytes of the image file (or tar member)
    pa.field("source_version", pa.string()),  # ETag or mtime of the listed object
    pa.field("error", pa.string()),
    pa.field("error_kind", pa.string()),  # null on success, else one of ERROR_KINDS
    pa.field("review_priority", pa.float64()),  # 0..1, higher = look first; null on error rows
    pa.field("instances", _list_of(INSTANCE)),
    pa.field("panoptic", _list_of(PANOPTIC_SEGMENT)),
    pa.field("keypoints", _list_of(KEYPOINT_PERSON)),
    pa.field("densepose", _list_of(DENSEPOSE_PERSON)),
    pa.field("video_uri", pa.string()),  # a video's frame (or its error row): the video; else null
    pa.field("frame_index", pa.int32()),  # the frame's place in the video, presentation order from 0
    pa.field("pts_s", pa.float64()),  # the frame's presentation time, seconds
])


REVIEW = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),  # as in ROW: the run rows' id of the image
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("width", pa.int32()),  # upright, pixels (as the run saw the image)
    pa.field("height", pa.int32()),
    pa.field("instances", _list_of(INSTANCE)),  # what the annotator submitted; score 1.0
    pa.field("keypoints", _list_of(KEYPOINT_PERSON)),  # score 1.0; v: 0 absent, 2 placed
    pa.field("source", pa.string(), nullable=False),  # "human"
    pa.field("annotator", pa.string()),  # the tool's user (e-mail or id); null if the tool has none
    pa.field("reviewed_at", pa.timestamp("us", tz="UTC")),  # when the annotation was last saved
    pa.field("lead_time_s", pa.float64()),  # seconds the annotator spent (Label Studio's lead_time)
    pa.field("tool", pa.string(), nullable=False),  # "labelstudio" or "coco"
    pa.field("ls_project", pa.int64()),  # Label Studio ids; null for other tools
    pa.field("ls_task", pa.int64()),
    pa.field("ls_annotation", pa.int64()),
    pa.field("run", pa.string()),  # the batchseg run whose predictions the annotator saw; null if unknown
    pa.field("model_version", pa.string()),  # that prediction's model_version; null if none was shown
    pa.field("pull", pa.string(), nullable=False),  # the pull that wrote the row
])


def image_id(uri: str) -> int:
    """Stable positive 63-bit id of an image URI: the same URI gets the same id in every run."""
    return int.from_bytes(hashlib.sha256(uri.encode("utf-8")).digest()[:8], "big") >> 1

"""What kind of input a name is: the file endings batchseg lists, and the error an input raises.

Below both sources (listing folders and shards) and manifests (URI lists, S3 Inventory), which
each need them.
"""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SHARD_EXTENSIONS = (".tar",)
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
MANIFEST_EXTENSIONS = (".parquet", ".csv", ".csv.gz", ".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
INVENTORY_NAME = "manifest.json"
PAGE_ROWS = 1000  # rows per page a listing yields at most: one S3 list page


class InputError(ValueError):
    """An input that cannot be used, with a one-line reason naming the input."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_EXTENSIONS)


def is_manifest_name(name: str) -> bool:
    return name.lower().endswith(MANIFEST_EXTENSIONS)


def is_video_name(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS)


def is_listed_name(name: str) -> bool:
    """An object a listing keeps: an image, a tar shard or a video."""
    return name.lower().endswith(IMAGE_EXTENSIONS + SHARD_EXTENSIONS + VIDEO_EXTENSIONS)

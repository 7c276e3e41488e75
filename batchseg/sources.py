"""List images and tar shards on any fsspec URI, and read their bytes.

A listed entry is either one image file or one tar shard (WebDataset style); a shard expands
into one row per image member when read. Members are named with fsspec's own chained URL,
`tar://MEMBER::SHARD_URI`, so every `image_uri` in the output can be opened with fsspec.open.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SHARD_EXTENSIONS = (".tar",)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_EXTENSIONS)


def list_sources(root: str, storage_options: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield one row per image file or tar shard under `root` (a folder, recursively, or a file).

    Row: {"uri": canonical URI, "size": bytes, "version": etag or mtime as text, "is_shard": bool}.
    Sorted by URI so listings are reproducible.
    """
    fs, path = url_to_fs(root, **storage_options)
    if fs.isfile(path):
        entries = {path: fs.info(path)}
    else:
        entries = fs.find(path, detail=True, withdirs=False)
        if not entries and not fs.exists(path):
            raise FileNotFoundError(f"input not found: {root}")
    for name in sorted(entries):
        info = entries[name]
        if info.get("type", "file") != "file":
            continue
        shard = is_shard_name(name)
        if not (shard or is_image_name(name)):
            continue
        yield {
            "uri": fs.unstrip_protocol(name),
            "size": int(info.get("size") or 0),
            "version": _version(info),
            "is_shard": shard,
        }


def _version(info: dict[str, Any]) -> str:
    """What changes when the object changes: S3 ETag, else modification time."""
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""


def read_bytes(uri: str, storage_options: dict[str, Any]) -> bytes:
    with fsspec.open(uri, "rb", **storage_options) as f:
        return f.read()


def iter_shard(uri: str, storage_options: dict[str, Any]) -> Iterator[tuple[str, int, bytes]]:
    """Yield (member URI, member size, member bytes) for each image in a tar shard, in tar order.

    Streams the tar (mode "r|*"), so a shard is read once front to back with no seeks.
    Raises tarfile.TarError / OSError if the shard itself is unreadable.
    """
    with fsspec.open(uri, "rb", **storage_options) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile() or not is_image_name(member.name):
                continue
            data = tar.extractfile(member)
            payload = data.read() if data is not None else b""
            yield member_uri(uri, member.name), member.size, payload


def member_uri(shard: str, member: str) -> str:
    """fsspec's chained URL of a tar member: `tar://MEMBER::SHARD_URI`."""
    return f"tar://{member}::{shard}"


def split_member(uri: str) -> tuple[str, str] | None:
    """`tar://MEMBER::SHARD_URI` -> (SHARD_URI, MEMBER); None for any other URI."""
    if not uri.startswith("tar://"):
        return None
    member, shard = uri[len("tar://"):].split("::", 1)
    return shard, member


def image_path(uri: str) -> str:
    """The path an image is known by: SHARD_URI/MEMBER for a tar member, else the URI itself."""
    parts = split_member(uri)
    return f"{parts[0]}/{parts[1]}" if parts else uri

"""Writing to the output: whole files or nothing, on any fsspec filesystem."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem



def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def write_json(uri: str, obj: Any, storage_options: dict[str, Any]) -> None:
    """`obj` as indented JSON at `uri`, written atomically."""
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n", storage_options)


def write_text(uri: str, text: str, storage_options: dict[str, Any]) -> None:
    """`text` (UTF-8) at `uri`, written atomically."""
    fs, path = url_to_fs(uri, **storage_options)
    atomic_write(fs, path, text.encode())


# ---- atomic object writes ---------------------------------------------------------------------

log = logging.getLogger(__name__)

PART_SIZE = 16 * 2**20  # S3 multipart part size; a body under one part goes up in a single PUT
_S3_MIN_PART = 5 * 2**20  # S3 refuses smaller parts (all but the last)


@contextlib.contextmanager
def atomic_open(fs, path: str, *, exclusive: bool = False, part_size: int = PART_SIZE) -> Iterator[BinaryIO]:
    """A binary file whose content appears at `path` only if the `with` block exits cleanly.

    An exception, KeyboardInterrupt or SystemExit in the block (Ctrl-C, `ray job stop`, a
    cancelled Ray task) leaves nothing at `path` and no temporary behind. (fsspec's own
    `with fs.open(path, "wb")` does the opposite: its exit flushes and commits whatever was
    written, so an error mid-write publishes a truncated object.)

    - local: a hidden temporary file beside `path` (`.NAME.RANDOM.inprogress`), fsynced, then
      renamed over `path`;
    - S3: one PutObject for a body under `part_size`; otherwise a multipart upload that is
      completed on clean exit and aborted on any failure (an unfinished upload is never
      visible either way; the abort frees its parts);
    - other fsspec filesystems: buffered in memory and written by one `pipe_file` on exit.

    exclusive: raise FileExistsError instead of replacing an existing `path` (a hard link
    locally, `If-None-Match: *` on S3; elsewhere a non-atomic existence check).
    The caller may close the yielded file (pyarrow does); the commit still happens on exit.
    """
    if isinstance(fs, LocalFileSystem):
        writer: _LocalWriter | _S3Writer | _BufferWriter = _LocalWriter(path, exclusive)
    elif is_s3(fs):
        writer = _S3Writer(fs, path, exclusive, part_size)
    else:
        writer = _BufferWriter(fs, path, exclusive)
    committed = False
    try:
        yield writer.file
        writer.commit()
        committed = True
    finally:
        if not committed:
            writer.abort()


def atomic_write(fs, path: str, data: bytes, *, exclusive: bool = False) -> None:
    """Write `data` to `path` all at once or not at all (see atomic_open)."""
    with atomic_open(fs, path, exclusive=exclusive) as f:
        f.write(data)


def is_s3(fs) -> bool:
    protocol = getattr(fs, "protocol", ())
    return bool({"s3", "s3a"} & set([protocol] if isinstance(protocol, str) else protocol))


def s3_error(e: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, S3 error code) behind an exception raised through s3fs, else (None, None).

    s3fs turns botocore's ClientError into OSError subclasses and keeps it as __cause__."""
    for err in (e, e.__cause__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return response.get("ResponseMetadata", {}).get("HTTPStatusCode"), response.get("Error", {}).get("Code")
    return None, None


class _LocalWriter:
    def __init__(self, path: str, exclusive: bool) -> None:
        self.path, self.exclusive = path, exclusive
        self.folder, name = os.path.split(path)
        os.makedirs(self.folder or ".", exist_ok=True)
        self.tmp = os.path.join(self.folder, f".{name}.{uuid.uuid4().hex[:12]}.inprogress")
        self.file = open(self.tmp, "xb")

    def commit(self) -> None:
        if self.file.closed:
            _fsync(self.tmp)
        else:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        if self.exclusive:
            os.link(self.tmp, self.path)  # FileExistsError if taken; never replaces
            os.unlink(self.tmp)
        else:
            os.replace(self.tmp, self.path)
        _fsync(self.folder or ".")  # the rename itself survives a power cut

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Buffer(io.RawIOBase):
    """A write-only binary file that keeps its bytes after close() (the commit happens later)."""

    def __init__(self, on_full=None, part_size: int = 0) -> None:
        self.data, self.size = bytearray(), 0
        self._on_full, self._part_size = on_full, part_size

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if self.closed:
            raise ValueError("write to closed file")
        n = memoryview(b).nbytes
        self.data += b
        self.size += n
        while self._on_full and len(self.data) >= self._part_size:
            part = bytes(self.data[: self._part_size])
            del self.data[: self._part_size]
            self._on_full(part)
        return n

    def tell(self) -> int:
        return self.size


class _S3Writer:
    def __init__(self, fs, path: str, exclusive: bool, part_size: int) -> None:
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)
        self.condition = {"IfNoneMatch": "*"} if exclusive else {}
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.file = _Buffer(self._upload, max(part_size, _S3_MIN_PART))

    def _call(self, method: str, **kwargs) -> dict[str, Any]:
        return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)

    def _upload(self, part: bytes) -> None:
        if self.upload_id is None:
            self.upload_id = self._call("create_multipart_upload")["UploadId"]
        number = len(self.parts) + 1
        out = self._call("upload_part", UploadId=self.upload_id, PartNumber=number, Body=part)
        self.parts.append({"PartNumber": number, "ETag": out["ETag"]})

    def commit(self) -> None:
        try:
            if self.upload_id is None:
                self._call("put_object", Body=bytes(self.file.data), **self.condition)
            else:
                if self.file.data:
                    self._upload(bytes(self.file.data))
                self._call("complete_multipart_upload", UploadId=self.upload_id,
                           MultipartUpload={"Parts": self.parts}, **self.condition)
                self.upload_id = None
        except OSError as e:
            if self.condition and s3_error(e)[0] == 412:
                raise FileExistsError(f"s3://{self.path} exists") from e
            raise
        finally:
            self.fs.invalidate_cache(self.path)

    def abort(self) -> None:
        if self.upload_id is None:
            return
        try:
            self._call("abort_multipart_upload", UploadId=self.upload_id)
        except Exception as e:  # the upload stays invisible; a bucket lifecycle rule frees its parts
            log.warning("could not abort the multipart upload of s3://%s: %s", self.path, e)


class _BufferWriter:
    def __init__(self, fs, path: str, exclusive: bool) -> None:
        self.fs, self.path, self.exclusive = fs, path, exclusive
        self.file = _Buffer()

    def commit(self) -> None:
        kwargs = {"mode": "create"} if self.exclusive else {}
        self.fs.pipe_file(self.path, bytes(self.file.data), **kwargs)

    def abort(self) -> None:
        pass

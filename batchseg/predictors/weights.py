"""Model weights you can trust: pinned on the driver, fetched into a content-keyed cache.

Checkpoints are pickles (a weights URL is code run on every worker), so:
  - the driver pins what the weights *are* before any work starts (`resolve`): a local file's
    sha256, or a remote object's ETag and size; `weights_sha256` in the config is checked
    against the content; plain `http://` is refused unless a sha256 pins the content or
    `allow_http_weights` says so;
  - each node downloads once into a cache keyed by content (sha256), verifying the sha256
    before the file can be loaded and re-checking the store's ETag, so a `latest.pth` that is
    replaced mid-run fails loudly instead of mixing two models in one run (`fetch`).
A per-file lock serialises concurrent downloads on a node; files appear in the cache only
complete (written aside, then renamed).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from fsspec.core import url_to_fs

from batchseg.errors import one_line
from batchseg.errors import redact

_CHUNK = 8 * 2**20


class WeightsError(ValueError):
    """Weights that cannot be used; the message is one line that names the fix."""


@dataclass(frozen=True)
class WeightsRef:
    """What a run loads: `uri` plus the content it had when the run was planned."""

    uri: str
    sha256: str | None  # known content hash (configured, or hashed from a local file)
    etag: str | None  # the store's ETag for remote objects
    size: int | None  # bytes

    def identity(self) -> dict[str, Any]:
        """The content identity that goes into a task's fingerprint (not the URI: moving a
        file does not change the model; replacing its bytes does)."""
        if self.sha256:
            return {"sha256": self.sha256}
        return {"etag": self.etag, "size": self.size}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_dir() -> Path:
    return Path(os.environ.get("BATCHSEG_CACHE", Path.home() / ".cache" / "batchseg")) / "weights"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve(uri: str, storage_options: dict[str, Any], sha256: str | None = None,
            allow_http: bool = False) -> WeightsRef:
    """Driver side: check that `uri` names a file and pin its content. Raises WeightsError
    (one line) for a missing or unreachable file, a refused http:// URL, or a sha256 mismatch.

    Uses info(), not isfile(): fsspec's isfile turns a connection error into False, which
    would call an unreachable host "not found".
    """
    shown = redact(uri)
    if uri.lower().startswith("http://") and not (sha256 or allow_http):
        raise WeightsError(f"weights at {shown} would be fetched over plain http (anyone on the path can swap "
                           "the pickle); use https://, pin the content with weights_sha256, or set allow_http_weights: true")
    try:
        fs, path = url_to_fs(uri, **storage_options)
        info = fs.info(path)
    except FileNotFoundError as e:
        cause = e.__cause__ or e.__context__  # fsspec's http wraps a connection error this way
        if cause is not None and not isinstance(cause, FileNotFoundError):
            raise WeightsError(f"weights not reachable at {shown} ({one_line(cause)})") from None
        raise WeightsError(f"weights not found at {shown}") from None
    except Exception as e:  # unreachable host, bad credentials, unknown protocol
        raise WeightsError(f"weights not reachable at {shown} ({one_line(e)})") from None
    if info.get("type", "file") != "file":
        raise WeightsError(f"weights at {shown} are a {info.get('type')}, not a file")
    size = int(info["size"]) if info.get("size") is not None else None
    if not is_remote(uri):
        actual = file_sha256(path)
        _check_sha256(shown, actual, sha256)
        return WeightsRef(uri, actual, None, size)
    return WeightsRef(uri, sha256.lower() if sha256 else None, _etag(info), size)


def fetch(ref: WeightsRef, storage_options: dict[str, Any]) -> str:
    """Worker side: a local path holding exactly the content `ref` pinned.

    Raises WeightsError when the content differs from what the driver pinned (the file was
    replaced since the run started, or a configured sha256 does not match).
    """
    if not is_remote(ref.uri):
        path = ref.uri.removeprefix("file://")
        _check_sha256(redact(ref.uri), file_sha256(path), ref.sha256, changed=True)
        return path
    cache = cache_dir()
    if ref.sha256 and (cache / f"sha256-{ref.sha256}").is_file():
        return str(cache / f"sha256-{ref.sha256}")
    alias = cache / f"etag-{_short_hash(ref.uri, ref.etag)}"
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(alias) + ".lock"):
        if not ref.sha256 and alias.is_file():
            known = cache / f"sha256-{alias.read_text().strip()}"
            if known.is_file():
                return str(known)
        digest = _download(ref, storage_options, cache)
        _check_sha256(redact(ref.uri), digest, ref.sha256)
        alias.write_text(digest)
    return str(cache / f"sha256-{digest}")


def _download(ref: WeightsRef, storage_options: dict[str, Any], cache: Path) -> str:
    """Download into the cache under its sha256 (hashed while reading); returns the digest."""
    fs, path = url_to_fs(ref.uri, **storage_options)
    partial = cache / f"download-{os.getpid()}-{_short_hash(ref.uri)}.part"
    digest = hashlib.sha256()
    try:
        with fs.open(path, "rb") as src, open(partial, "wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
        now = _etag(fs.info(path)) if ref.etag else None
        if ref.etag and now != ref.etag:
            raise WeightsError(f"weights at {redact(ref.uri)} changed since the run started (ETag {ref.etag} -> {now}); "
                               "re-run to annotate with the new weights, or pin them with weights_sha256")
        final = cache / f"sha256-{digest.hexdigest()}"
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return digest.hexdigest()


def download_once(uri: str, storage_options: dict[str, Any]) -> str:
    """A local copy of an immutable remote file (e.g. a config at a pinned commit), keyed by URI."""
    if not is_remote(uri):
        return uri.removeprefix("file://")
    target = cache_dir() / f"uri-{_short_hash(uri)}-{Path(uri.split('?')[0]).name or 'file'}"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not target.is_file():
                fs, path = url_to_fs(uri, **storage_options)
                partial = target.with_name(target.name + f".part-{os.getpid()}")
                fs.get_file(path, str(partial))
                os.replace(partial, target)
    return str(target)


def _short_hash(*parts: str | None) -> str:
    return hashlib.sha256("\n".join(str(p) for p in parts).encode()).hexdigest()[:32]


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_sha256(shown: str, actual: str, expected: str | None, changed: bool = False) -> None:
    if expected and actual != expected.lower():
        if changed:
            raise WeightsError(f"weights at {shown} changed since the run started (sha256 {expected[:12]}... -> "
                               f"{actual[:12]}...); re-run to annotate with the new weights")
        raise WeightsError(f"weights at {shown} have sha256 {actual}, not the configured weights_sha256 {expected}; "
                           "nothing was loaded: check the file or the pinned hash")


def _etag(info: dict[str, Any]) -> str | None:
    for key in ("ETag", "etag"):
        if info.get(key):
            return str(info[key]).strip('"')
    return None

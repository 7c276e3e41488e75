"""Model weights from a local path, s3:// or http(s) URL, downloaded once per node and cached.

fsspec's own `filecache::` writes straight into the cache file, so two actors starting on one
node could read each other's half-written download; here a per-file lock serialises the
download and the file appears in the cache only complete (written aside, then renamed).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from filelock import FileLock
from fsspec.core import url_to_fs

from batchseg.errors import one_line


def cache_dir() -> Path:
    return Path(os.environ.get("BATCHSEG_CACHE", Path.home() / ".cache" / "batchseg")) / "weights"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def check_weights(uri: str, storage_options: dict[str, Any]) -> None:
    """Raise FileNotFoundError (one line) unless `uri` names an existing file.

    Uses info(), not isfile(): fsspec's isfile turns a connection error into False, which
    would call an unreachable host "not found".
    """
    try:
        fs, path = url_to_fs(uri, **storage_options)
        info = fs.info(path)
    except FileNotFoundError as e:
        cause = e.__cause__ or e.__context__  # fsspec's http wraps a connection error this way
        if cause is not None and not isinstance(cause, FileNotFoundError):
            raise FileNotFoundError(f"weights not reachable at {uri} ({one_line(cause)})") from None
        raise FileNotFoundError(f"weights not found at {uri}") from None
    except Exception as e:  # unreachable host, bad credentials, unknown protocol
        raise FileNotFoundError(f"weights not reachable at {uri} ({one_line(e)})") from None
    if info.get("type", "file") != "file":
        raise FileNotFoundError(f"weights at {uri} are a {info.get('type')}, not a file")


def local_weights(uri: str, storage_options: dict[str, Any]) -> str:
    """Return a local file path holding the weights named by `uri`."""
    if not is_remote(uri):
        return uri.removeprefix("file://")
    name = Path(uri.split("?")[0]).name or "weights"
    target = cache_dir() / f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}-{name}"
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.exists():
            fs, path = url_to_fs(uri, **storage_options)
            partial = target.with_name(target.name + f".part-{os.getpid()}")
            fs.get_file(path, str(partial))
            os.replace(partial, target)
    return str(target)

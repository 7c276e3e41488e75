"""Failure classes: which errors are the image's fault, the model's, or the moment's.

  content    the bytes are not an image we can annotate (empty, truncated, not an image,
             over max_image_pixels, a corrupt tar shard): recorded once, skipped until the
             object changes or --retry-failed.
  model      the model raised on this image (alone), or the image killed its worker
             repeatedly (batchseg.run.inflight): recorded for this model fingerprint; a new
             model tries again.
  transient  I/O that still failed after bounded retries (throttling, timeouts, a vanished
             or forbidden object), GPU memory exhausted at batch size 1: the row is written
             so the run's row count holds, but it is not recorded as done, so the next run
             tries again.
"""

from __future__ import annotations

import tarfile
import time
from collections.abc import Callable
from typing import TypeVar

from batchseg.inputs.imaging import DecodeError

CONTENT, MODEL, TRANSIENT = "content", "model", "transient"
READ_ATTEMPTS = 3  # on top of the storage client's own retries (botocore retries throttling)
T = TypeVar("T")


def read_failure_kind(e: BaseException) -> str:
    """A failed read: the object's own fault (a corrupt shard), else the moment's."""
    return CONTENT if isinstance(e, (tarfile.TarError, DecodeError, EOFError)) else TRANSIENT


def decode_failure_kind(e: BaseException) -> str:
    return CONTENT if isinstance(e, DecodeError) else TRANSIENT


def retry_transient(fn: Callable[[], T], attempts: int = READ_ATTEMPTS, backoff_s: float = 0.5) -> T:
    """fn(), retried with exponential backoff while it raises a transient error."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if read_failure_kind(e) != TRANSIENT or attempt == attempts - 1:
                raise
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA (or host allocator) out of memory inside a forward: retry with fewer images."""
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    return isinstance(e, MemoryError) or "out of memory" in str(e).lower()


_POISONED = ("cuda error", "device-side assert", "illegal memory access", "cublas_status", "cudnn_status")


def poisons_cuda(e: BaseException) -> bool:
    """A CUDA fault after which the process's CUDA context is unusable: only a new process helps."""
    return any(marker in str(e).lower() for marker in _POISONED)

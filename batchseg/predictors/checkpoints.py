"""Loading checkpoint files without running code from them, and saying what they left out.

A `.pth` is loaded with `torch.load(weights_only=True)` (tensors and plain containers only).
A detectron2 model-zoo `.pkl` is a plain pickle of numpy arrays; torch's weights_only
unpickler does not take numpy arrays, so it is read by RestrictedUnpickler, which resolves
only the numpy reconstruction functions and a few harmless builtins and refuses every other
global (os.system, eval, ...), which is how a malicious pickle runs code.
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter
from typing import Any

from batchseg.errors import one_line

log = logging.getLogger(__name__)

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    ("collections", "OrderedDict"),
}


class CheckpointError(ValueError):
    """The file is not a checkpoint that can be loaded safely; the message is one line."""


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only numpy arrays/dtypes and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (module.startswith("numpy.dtypes") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays are allowed)")


def load_pickle(path: str) -> Any:
    """A `.pkl` of numpy arrays (detectron2's model zoo, Caffe2/Detectron1) -> its object."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="latin1").load()
    except Exception as e:
        raise CheckpointError(f"{path} is not a loadable .pkl checkpoint ({one_line(e)})") from None


def load_torch(path: str) -> Any:
    """A torch checkpoint -> its object, tensors and plain containers only (weights_only=True)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a loadable torch checkpoint ({one_line(e)})") from None


def warn_missing(path: str, missing: list[str], total: int) -> None:
    """WARNING naming how many of the model's `total` parameters/buffers `path` left unloaded
    and under which prefixes: a wrong checkpoint must not pass silently as random heads."""
    if missing:
        log.warning("checkpoint %s left %d of %d model parameters/buffers unloaded (randomly initialised), under: %s",
                    path, len(missing), total, prefixes(missing))


def prefixes(keys: list[str], depth: int = 2) -> str:
    """'roi_heads.box_predictor (4), backbone.fpn_lateral2 (2)': keys counted by dotted prefix."""
    counts = Counter(".".join(k.split(".")[:depth]) for k in keys)
    return ", ".join(f"{p} ({n})" for p, n in counts.most_common())

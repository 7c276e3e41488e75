"""Torch helpers shared by the backends: images onto the device, crops off it, fp32 islands.

Only compact data crosses between host and device: uint8 images go in (converted to float on
the device by the model's own normalisation), mask crops come out as one bool buffer.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import torch

from batchseg.predictors.base import CroppedMasks


def image_tensor(image: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A model input (ModelInput.image) -> (3, h, w) uint8 contiguous tensor on `device`.

    image: (h, w, 3) uint8 host array: only its uint8 bytes cross to the device, the transpose
    happens there. Or (3, h, w) uint8 tensor, decoded on the device (decode_on_device): kept
    as it is when already on `device` and contiguous.
    """
    if isinstance(image, torch.Tensor):
        return image.to(device).contiguous()
    with warnings.catch_warnings():  # arrays from Ray's object store are read-only; torch never writes to it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        host = torch.from_numpy(image)
    return host.to(device).permute(2, 0, 1).contiguous()


def crops_to_host(crops: list[torch.Tensor], regions: np.ndarray, height: int, width: int) -> CroppedMasks:
    """Device crops -> CroppedMasks, in one device -> host copy.

    crops: N (h_i, w_i) bool tensors on one device. regions: (N, 4) int, y0, x0, h_i, w_i of
    each crop in the (height, width) image. Each crop is laid out column-major on the device
    (where the transpose is cheap), so the host encodes it without one.
    """
    if not crops:
        return CroppedMasks.empty(height, width)
    flat = torch.cat([c.t().reshape(-1) for c in crops])
    return CroppedMasks.from_flat(flat.cpu().numpy(), regions, height, width)


def compute_in_fp32(module: torch.nn.Module, device_type: str) -> None:
    """Run `module`'s forward with autocast off and floating inputs cast to float32.

    For the few small layers whose outputs become coordinates (box regression): under
    fp16/bf16 autocast they would otherwise compute in half precision.
    """
    forward = module.forward

    @functools.wraps(forward)
    def fp32_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, enabled=False):
            return forward(*_to_float(args), **_to_float(kwargs))

    module.forward = fp32_forward


def outputs_in_fp32(module: torch.nn.Module) -> None:
    """Cast `module`'s floating outputs to float32, so what is decoded from them (box deltas,
    mask probabilities, heatmaps) is decoded in fp32 whatever precision computed them."""
    module.register_forward_hook(lambda _module, _inputs, output: _to_float(output))


def _to_float(value: Any) -> Any:
    """Floating tensors inside tuples/lists/dicts -> float32; everything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_float(v) for k, v in value.items()}
    return value

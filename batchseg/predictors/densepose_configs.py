"""DensePose configs and weights by name.

The `densepose` package does not ship its YAML configs (they live in the source tree's
projects/DensePose/configs). A name like `densepose_rcnn_R_50_FPN_s1x` resolves to, in order:
  1. a path, if it is a file;
  2. `$DENSEPOSE_CONFIGS/NAME.yaml`, or the configs/ folder beside an editable/source install;
  3. the file from the official repository at PINNED_COMMIT, with its _BASE_ chain, downloaded
     once into the batchseg cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from batchseg.predictors.weights import cache_dir, download_once

PINNED_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"
_RAW = f"https://raw.githubusercontent.com/facebookresearch/detectron2/{PINNED_COMMIT}/projects/DensePose/configs/"
DEFAULT_CONFIG = "densepose_rcnn_R_50_FPN_s1x"
_WEIGHTS = {  # from DensePose's model zoo (doc/DENSEPOSE_IUV.md)
    "densepose_rcnn_R_50_FPN_s1x":
        "https://dl.fbaipublicfiles.com/densepose/densepose_rcnn_R_50_FPN_s1x/165712039/model_final_162be9.pkl",
    "densepose_rcnn_R_101_FPN_s1x":
        "https://dl.fbaipublicfiles.com/densepose/densepose_rcnn_R_101_FPN_s1x/165712084/model_final_c6ab63.pkl",
}


def resolve(name: str | None) -> str:
    """Config name or path -> a local YAML path whose _BASE_ files sit beside it."""
    name = name or DEFAULT_CONFIG
    if os.path.isfile(name):
        return name
    rel = name if name.endswith(".yaml") else name + ".yaml"
    for folder in _local_folders():
        if (folder / rel).is_file():
            return str(folder / rel)
    return _download(rel)


def default_weights(name: str | None) -> str:
    key = Path(name or DEFAULT_CONFIG).name.removesuffix(".yaml")
    if key not in _WEIGHTS:
        raise ValueError(f"no default weights known for DensePose config {name!r}; set weights")
    return _WEIGHTS[key]


def _local_folders() -> list[Path]:
    folders = [Path(os.environ["DENSEPOSE_CONFIGS"])] if os.environ.get("DENSEPOSE_CONFIGS") else []
    try:
        import densepose

        folders.append(Path(densepose.__file__).resolve().parents[1] / "configs")
    except ImportError:
        pass
    return folders


def _download(rel: str) -> str:
    """Fetch RAW/rel and, recursively, its _BASE_ into one cache folder; return the local path."""
    target = cache_dir().parent / "densepose-configs" / PINNED_COMMIT / rel
    if not target.is_file():
        fetched = download_once(_RAW + rel, {})  # cached, locked, atomic
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(fetched, target)
    base = (yaml.safe_load(target.read_text()) or {}).get("_BASE_")
    if base:
        _download(os.path.normpath(str(Path(rel).parent / base)))
    return str(target)

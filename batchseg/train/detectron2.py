"""Training through detectron2's own machinery (where detectron2 is installed)."""

from __future__ import annotations

from batchseg.config import ConfigError


def check_installed() -> None:
    """ConfigError (one line) unless detectron2 imports."""
    try:
        import detectron2  # noqa: F401
    except ImportError:
        raise ConfigError("--backend detectron2: detectron2 is not installed (docs/backends.md says how); "
                          "or train with --backend torchvision") from None

"""A trained model's folder, as `batchseg train` writes it and `batchseg run --model-dir` reads it.

    MODELS/v2/
      weights.pt          the model's state dict (torch.load(weights_only=True) loads it)
      weights.pt.sha256   its sha256, as `sha256sum -c` reads it
      label_map.json      class index -> {id, name}, the form `batchseg run --label-map` takes
      model_card.json     what it is: base weights, data, settings, held-out AP before and after
      metrics.jsonl       one line per checkpoint: losses, learning rate, images/s, held-out AP
      curves.png          the loss and held-out AP against the iteration
      checkpoints/        Ray Train's storage (unless --checkpoints put it elsewhere)

Imports neither torch nor Ray: `batchseg run` reads a card before anything starts.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec

from batchseg.config import ConfigError

CARD, WEIGHTS, LABEL_MAP, METRICS, CURVES, STARTED = (
    "model_card.json", "weights.pt", "label_map.json", "metrics.jsonl", "curves.png", "_training.json")


def read_card(model_dir: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """MODEL_DIR/model_card.json; ConfigError (one line) when there is none."""
    uri = f"{model_dir.rstrip('/')}/{CARD}"
    try:
        with fsspec.open(uri, "rb", **storage_options) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise ConfigError(f"--model-dir {model_dir}: no {CARD} there; give a folder `batchseg train` finished "
                          "writing (a run still training has none yet)") from None
    except ValueError as e:
        raise ConfigError(f"--model-dir {model_dir}: {CARD} is not JSON ({e})") from None


def model_settings(model_dir: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """The model fields of a job config that pin MODEL_DIR's model: backend, architecture,
    weights with their sha256, label map, the training image sizes, and the card itself."""
    card = read_card(model_dir, storage_options)
    root = model_dir.rstrip("/")
    return {
        "backend": card["backend"],
        "model": card["model"],
        "weights": f"{root}/{card['weights']['file']}",
        "weights_sha256": card["weights"]["sha256"],
        "label_map": f"{root}/{card['label_map']}",
        "min_size": card["min_size"],
        "max_size": card["max_size"],
        "model_card": f"{root}/{CARD}",
        **({"options": card["options"]} if card.get("options") else {}),
    }

"""Checkpoint files are read without running code from them (batchseg.predictors.checkpoints)."""

import collections
import os
import pickle

import numpy as np
import pytest
import torch

from batchseg.predictors.checkpoints import CheckpointError, load_pickle, load_torch, prefixes


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_numpy_pickles_load_in_every_protocol(tmp_path, protocol):
    data = {"model": collections.OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.zeros(3, np.int64),
                                             s=np.float32(2.5)), "__author__": "Detectron2 Model Zoo"}
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = load_pickle(str(path))
    assert loaded["__author__"] == "Detectron2 Model Zoo"
    assert all(np.array_equal(loaded["model"][k], v) for k, v in data["model"].items())


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_pickles_that_would_run_code_are_refused_in_one_line(tmp_path, payload):
    marker = tmp_path / "ran"
    obj = _RunsCode(marker) if payload == "system" else type("E", (), {"__reduce__": lambda self: (eval, ("1",))})()
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": obj}))
    with pytest.raises(CheckpointError, match=f"refusing to load global .*{payload}") as e:
        load_pickle(str(path))
    assert "\n" not in str(e.value) and not marker.exists()


def test_torch_checkpoints_load_weights_only(tmp_path):
    path = tmp_path / "ok.pth"
    torch.save({"model": {"w": torch.ones(2)}, "iteration": 3}, path)
    assert torch.equal(load_torch(str(path))["model"]["w"], torch.ones(2))
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": _RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="not a loadable torch checkpoint") as e:
        load_torch(str(evil))
    assert "\n" not in str(e.value) and not marker.exists()


def test_prefixes_count_keys_by_their_first_two_names():
    keys = ["roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias", "backbone.fpn.w", "x"]
    assert prefixes(keys) == "roi_heads.box_predictor (2), backbone.fpn (1), x (1)"

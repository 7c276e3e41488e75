"""Where a run's time goes, in the run itself: the predictor actors' time split, the bottleneck
line, and a progress line that counts images (not a tar shard's marker row). Real runs on the
local Ray cluster, with backends made slow on purpose (tests/slow_backends.py)."""

from __future__ import annotations

import io

import pytest

from batchseg import console
from batchseg.run.report import bottleneck
from tests.conftest import run_job

SLOW = "tests.slow_backends:"


def _split(summary):
    predictors = summary["predictors"]
    pool = predictors["pool"]
    assert pool["actors"] >= 1 and len(predictors["actors"]) == pool["actors"]
    assert sum(a["images"] for a in predictors["actors"]) == summary["images"]["in"]
    for name in ("waiting", "decode", "forward", "encode"):
        assert 0.0 <= pool[name] <= 1.0, (name, pool)
    assert pool["images_per_s_per_actor"] > 0
    assert 0 < predictors["startup_s"] < summary["wall_time_s"]
    assert predictors["read_rows_per_s"] > 0 and predictors["decode_rows_per_s"] is None  # CPU: actors decode
    return pool, predictors["bottleneck"]


@pytest.mark.timeout(300)
def test_a_slow_model_is_named_the_bottleneck(ray_cluster, samples, tmp_path):
    _, summary = run_job(inputs=[str(samples.root)], output=str(tmp_path / "out"),
                         models={"instance": {"backend": SLOW + "SlowModelBackend", "score_threshold": 0.0}},
                         batch_size=2, read_rows_per_block=4)
    pool, line = _split(summary)
    assert pool["forward"] > 0.5 and pool["forward"] > pool["decode"], pool
    assert "the model is the bottleneck" in line, line


@pytest.mark.timeout(300)
def test_a_slow_decode_is_named_the_bottleneck(ray_cluster, samples, tmp_path):
    _, summary = run_job(inputs=[str(samples.root)], output=str(tmp_path / "out"),
                         models={"instance": {"backend": SLOW + "SlowDecodeBackend", "score_threshold": 0.0}},
                         batch_size=2, read_rows_per_block=4)
    pool, line = _split(summary)
    assert pool["decode"] > 0.5 and pool["decode"] > pool["forward"], pool
    assert "decode is the bottleneck" in line, line


def test_predictors_starved_by_a_decode_stage_slower_than_reading_name_decode():
    """The GPU layout (decode in its own CPU stage), which this CPU machine cannot run: the
    rule alone, on the figures such a run reports."""
    pool = {"waiting": 0.41, "decode": 0.02, "forward": 0.5, "encode": 0.1}
    line = bottleneck(pool, {"rows_per_s": 300.0}, {"rows_per_s": 40.0})
    assert line.startswith("predictors waited 41% of the time for decoded images: decode is the bottleneck")
    assert "decode is the bottleneck; raise decode CPUs or enable decode_on_device" in line
    assert "reading is the bottleneck" in bottleneck(pool, {"rows_per_s": 30.0}, {"rows_per_s": 40.0})
    assert "the model is the bottleneck" in bottleneck({**pool, "waiting": 0.1}, None, None)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.timeout(300)
def test_the_progress_total_counts_images_not_a_shards_marker_row(ray_cluster, samples, tmp_path):
    """samples.root holds loose images and a tar shard; the shard's marker row is no image."""
    from ray.data._internal.execution import streaming_executor

    assert list(samples.root.rglob("*.tar")), "the input must hold a tar shard"
    saved, shown = streaming_executor.get_progress_manager, _Terminal()
    console.install_progress(stream=shown)
    try:
        _, summary = run_job(inputs=[str(samples.root)], output=str(tmp_path / "out"),
                             models={"instance": {"backend": "tests.oracle:ColorKeyBackend", "score_threshold": 0.0}},
                             batch_size=3, read_rows_per_block=4)
    finally:
        streaming_executor.get_progress_manager = saved
    last = shown.getvalue().rstrip("\n").split("\r")[-1].strip()
    images = len(samples.images)
    assert summary["images"]["in"] == images
    assert last.startswith(f"batchseg: {images}/{images} images (100%)"), last

"""Several tasks in one pass give the same per-task rows as one pass per task."""

import numpy as np
import pytest

from batchseg.rows.encoding import decode_mask, decode_panoptic
from tests.conftest import read_rows, relative_name, run_job

ORACLES = {
    "instance": {"backend": "tests.oracle:ColorKeyBackend", "score_threshold": 0.0},
    "panoptic": {"backend": "tests.oracle:ColorKeyPanoptic"},
}
COLUMNS = {"instance": "instances", "panoptic": "panoptic", "keypoint": "keypoints", "densepose": "densepose"}


def _run(tmp_path, name, inputs, models, **extra):
    _, summary = run_job(inputs=inputs, output=str(tmp_path / name), tasks=list(models), models=models, **extra)
    return summary, {r["image_uri"]: r for r in read_rows(str(tmp_path / name / "annotations"))}


def _same_rows_as_single_task_runs(tmp_path, inputs, models, **extra):
    multi_summary, multi = _run(tmp_path, "all", inputs, models, **extra)
    for task, model in models.items():
        _, single = _run(tmp_path, task, inputs, {task: model}, **extra)
        assert single.keys() == multi.keys()
        column = COLUMNS[task]
        for uri, row in single.items():
            assert multi[uri][column] == row[column], (task, uri)
            assert multi[uri]["error"] == row["error"]
        other = [c for t, c in COLUMNS.items() if t not in models]
        assert all(r[c] is None for r in multi.values() for c in other)
    return multi_summary, multi


def test_oracle_instance_and_panoptic_in_one_pass(ray_cluster, samples, tmp_path):
    inputs = [str(samples.root / "street"), str(samples.root / "odd"), str(samples.root / "bad")]
    summary, rows = _same_rows_as_single_task_runs(tmp_path, inputs, ORACLES)
    assert set(summary["found"]) == {"instances", "panoptic"}
    assert summary["categories"]["panoptic"]["stuff"] == [{"id": 200, "name": "background"}]
    by_name = {relative_name(uri, samples.root): r for uri, r in rows.items()}
    row = by_name["street/scene_a.png"]
    id_map = decode_panoptic(row["panoptic"], row["height"], row["width"])
    things = [s for s in row["panoptic"] if s["isthing"]]
    for inst, seg in zip(row["instances"], things):  # the panoptic things are the instances
        assert np.array_equal(decode_mask(inst["segmentation"]), id_map == seg["id"])
    assert (id_map > 0).all()  # background is a stuff segment: no void pixels here
    assert by_name["bad/empty.jpg"]["panoptic"] is None and by_name["bad/empty.jpg"]["instances"] is None


def test_all_four_detectron2_tasks_in_one_pass(ray_cluster, samples, tmp_path, d2_weights):
    from tests.predictors.test_detectron2_tasks import MODELS

    small = {"min_size": 160, "max_size": 256, "score_threshold": 0.0}
    models = {
        task: {**cfg.model_dump(), **small, "random_init": False, "weights": d2_weights[task]}
        for task, cfg in MODELS.items()
    }
    inputs = [str(samples.root / "street"), str(samples.root / "odd/rotated_exif6.png")]
    summary, rows = _same_rows_as_single_task_runs(tmp_path, inputs, models, batch_size=2)
    assert summary["images"] == {"in": 3, "annotated": 3, "failed": 0}
    assert all(summary["found"][c]["total"] > 0 for c in ("instances", "panoptic", "keypoints", "densepose"))
    assert summary["categories"]["keypoint"]["keypoint_names"][0] == "nose"


@pytest.fixture
def d2_weights(request):
    pytest.importorskip("detectron2")
    pytest.importorskip("densepose")
    return request.getfixturevalue("weights")


try:  # the parity tests' weight files (random init, heads tamed), when detectron2 is here
    from tests.predictors.test_detectron2_tasks import weights  # noqa: F401
except pytest.skip.Exception:
    pass

"""The whole pipeline on a real local Ray cluster, with the colour-keyed oracle backend."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from batchseg.config import load_config
from batchseg.rows.encoding import decode_mask
from batchseg.rows.schema import ROW, image_id
from batchseg.run.stages import Annotate
from tests.conftest import read_rows, relative_name, run_job
from tests.oracle import ColorKeyBackend

ORACLE = {"backend": "tests.oracle:ColorKeyBackend", "score_threshold": 0.0}


@pytest.fixture(scope="module")
def oracle_run(ray_cluster, samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("oracle_out")
    cfg, summary = run_job(
        inputs=[str(samples.root)], output=str(out), models={"instance": ORACLE}, batch_size=3,
        read_rows_per_block=4,
    )
    return out, summary, read_rows(str(out / "annotations"))


def test_one_row_per_listed_image_nothing_lost_or_doubled(oracle_run, samples):
    _, summary, rows = oracle_run
    names = [relative_name(r["image_uri"], samples.root) for r in rows]
    assert sorted(names) == sorted(samples.images)
    assert len(set(r["image_id"] for r in rows)) == len(rows)
    assert summary["images"] == {"in": len(samples.images), "annotated": len(samples.images) - 4, "failed": 4}


def test_segm_and_bbox_ap_are_exactly_one(oracle_run, samples, capsys):
    _, summary, rows = oracle_run
    gt = COCO(str(samples.gt_path))
    ids = {i["file_name"]: i["id"] for i in gt.dataset["images"]}
    results = [
        {**inst, "image_id": ids[relative_name(r["image_uri"], samples.root)]}
        for r in rows if r["error"] is None and relative_name(r["image_uri"], samples.root) in ids
        for inst in r["instances"]
    ]
    assert len(results) == len(gt.dataset["annotations"])
    for iou in ("segm", "bbox"):
        ev = COCOeval(gt, gt.loadRes(results), iou)
        ev.evaluate(), ev.accumulate(), ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0), iou
    assert summary["found"]["instances"]["total"] == len(results)
    per_cat = {}
    for a in gt.dataset["annotations"]:
        per_cat[str(a["category_id"])] = per_cat.get(str(a["category_id"]), 0) + 1
    assert summary["found"]["instances"]["per_category"] == per_cat


def test_rows_follow_the_contract(oracle_run, samples):
    out, _, rows = oracle_run
    for f in (out / "annotations").rglob("*.parquet"):
        assert pq.read_schema(f).remove_metadata() == ROW
    by_name = {relative_name(r["image_uri"], samples.root): r for r in rows}
    for r in rows:
        assert r["image_id"] == image_id(r["image_uri"])
    rotated = by_name["odd/rotated_exif6.png"]
    assert (rotated["width"], rotated["height"]) == (200, 120)
    for inst in rotated["instances"]:
        assert inst["segmentation"]["size"] == [120, 200]
        mask = decode_mask(inst["segmentation"])
        ys, xs = np.nonzero(mask)
        assert inst["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert inst["area"] == mask.sum()
    assert by_name["odd/empty_scene.png"]["instances"] == []  # success, nothing found
    assert by_name["odd/one_pixel.png"]["error"] is None


def test_bad_files_become_error_rows(oracle_run, samples):
    _, _, rows = oracle_run
    errors = {relative_name(r["image_uri"], samples.root): r for r in rows if r["error"]}
    assert sorted(errors) == sorted(samples.bad)
    assert "empty file" in errors["bad/empty.jpg"]["error"]
    assert "max_image_pixels" in errors["bad/bomb.png"]["error"]
    for r in errors.values():
        assert "\n" not in r["error"] and r["instances"] is None and r["width"] is None


def test_run_json(oracle_run):
    out, summary, _ = oracle_run
    written = json.loads((out / "run.json").read_text())
    assert written["images"] == summary["images"]
    assert written["categories"]["instance"]["things"] == [
        {"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}, {"id": 44, "name": "bottle"}
    ]
    assert written["versions"]["ray"] and written["versions"]["torch"] and "detectron2" in written["versions"]
    assert written["config"]["batch_size"] == 3 and written["wall_time_s"] > 0 and written["images_per_s"] > 0
    names = [s["stage"] for s in written["stages"]]
    assert any("read_batch" in n for n in names) and any("Annotate" in n for n in names)
    assert all(s["wall_s"] >= 0 and s["tasks"] > 0 for s in written["stages"])
    assert (out / "runs" / f"{written['run_id']}.stats.txt").read_text().startswith("Operator")


def test_tar_shard_that_is_corrupt_becomes_an_error_row(ray_cluster, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/broken.tar").write_bytes(b"\x00garbage" * 100)
    _, summary = run_job(inputs=[str(tmp_path / "in")], output=str(tmp_path / "out"), models={"instance": ORACLE})
    rows = read_rows(str(tmp_path / "out/annotations"))
    assert len(rows) == 1 and rows[0]["error"].startswith("read failed:")
    assert summary["images"]["failed"] == 1


def _batch(samples, names):
    from batchseg.inputs.imaging import decode_rgb

    imgs = [decode_rgb((samples.root / n).read_bytes(), 10**8) for n in names]
    return {
        "uri": np.array([f"file://{samples.root / n}" for n in names], object),
        "size": np.zeros(len(names), np.int64), "version": np.array(["v"] * len(names), object),
        "error": np.array([None] * len(names), object), "error_kind": np.array([None] * len(names), object),
        "key": np.arange(len(names), dtype=np.int64), "members": np.full(len(names), -1, np.int32),
        "image_0": np.array(imgs + [None], object)[:-1],
        "height": np.array([i.shape[0] for i in imgs], np.int32), "width": np.array([i.shape[1] for i in imgs], np.int32),
    }


def _annotator():
    cfg = load_config(None, [(["inputs"], ["/x"]), (["output"], "/o"), (["models"], {"instance": ORACLE})])
    return Annotate(cfg, "cpu")


def test_one_forward_per_batch(samples):
    ColorKeyBackend.calls.clear()
    table = _annotator()(_batch(samples, ["street/scene_a.png", "park/scene_c.bmp", "odd/one_pixel.png"]))
    assert ColorKeyBackend.calls == [3] and table.num_rows == 3 and table.select(ROW.names).schema == ROW


def test_failed_batched_forward_retries_images_alone(samples, monkeypatch):
    annotate = _annotator()
    backend = annotate.backends["instance"]
    real = backend.predict

    def fragile(images):
        if any(x.width == 1 for x in images):
            raise RuntimeError("CUDA error: an illegal memory access\nmore detail")
        return real(images)

    monkeypatch.setattr(backend, "predict", fragile)
    rows = annotate(_batch(samples, ["street/scene_a.png", "odd/one_pixel.png", "park/scene_c.bmp"])).to_pylist()
    assert [r["error"] is None for r in rows] == [True, False, True]
    assert rows[1]["error"] == "instance: predict failed: RuntimeError: CUDA error: an illegal memory access"
    assert rows[1]["error_kind"] == "model"  # on CPU a "CUDA error" is just an error of this image
    assert len(rows[0]["instances"]) == 2


def test_the_listing_cuts_its_blocks_itself_asking_for_no_cpu(ray_cluster, samples, oracle_run):
    """The rows to read come in blocks of read_rows_per_block, cut inside the listing tasks
    (pipeline._in_blocks_of: Ray Data's StreamingRepartition, fused into the listing map),
    which ask for no CPU: on device cpu the predictor pool holds every CPU (2 actors on the
    session's 2 CPUs), and a stage asking for one would never start."""
    from batchseg.run import job, pipeline, stages
    from batchseg.store.ledger import DoneSet

    _, summary, _ = oracle_run
    assert (summary["actors"]["min"], summary["actors"]["cpus_each"]) == (2, 1.0)
    cfg = load_config(None, [(["inputs"], [str(samples.root)]), (["output"], "/unused")])
    units = job.plan_inputs(cfg)
    ds = pipeline.listing(units, cfg.s3, DoneSet(None), 4, cpus=2, max_retries=0)
    blocks = [len(block["uri"]) for block in ds.iter_batches(batch_size=None)]
    stats = ds.stats()
    listed = sum(len(page["uri"]) for page in stages.list_inputs({"unit": np.arange(len(units))}, units, cfg.s3,
                                                                  DoneSet(None)))
    assert max(blocks) == 4 and sum(blocks) == listed > 8
    assert "MapBatches(list_inputs)->StreamingRepartition" in stats and "\nOperator 2 " not in stats, stats
    [op] = [o for o in ds._logical_plan.dag.post_order_iter() if type(o).__name__ == "StreamingRepartition"]
    assert op.ray_remote_args["num_cpus"] == 0

"""export coco | labelstudio | cvat, eval and render, on real run outputs and on synthetic rows."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from batchseg.rows.encoding import decode_iuv, decode_mask, decode_panoptic
from batchseg.evaluation.evaluate import evaluate
from batchseg.exports.coco import export_coco
from batchseg.exports.cvat import export_cvat
from batchseg.exports.polygons import mask_to_polygons, polygons_to_rle
from batchseg.exports.labelstudio import export_labelstudio
from batchseg.evaluation.render import render
from batchseg.store.results import open_results
from tests.annotated_rows import write_results as write_hand_rows
from tests.conftest import REPO, run_job
from tests.synthetic_results import write_results

ORACLES = {
    "instance": {"backend": "tests.oracle:ColorKeyBackend", "score_threshold": 0.0},
    "panoptic": {"backend": "tests.oracle:ColorKeyPanoptic"},
}


@pytest.fixture(scope="module")
def oracle_results(ray_cluster, samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_run")
    run_job(inputs=[str(samples.root)], output=str(out), tasks=["instance", "panoptic"], models=ORACLES)
    return open_results(str(out))


@pytest.fixture(scope="module")
def people(tmp_path_factory):
    return open_results(str(write_results(tmp_path_factory.mktemp("people"))))


def _rows_by_id(results, column):
    return {r["image_id"]: r for r in results.rows() if r["error"] is None and r[column] is not None}


def test_coco_instances_load_and_masks_round_trip(oracle_results, tmp_path):
    written = export_coco(oracle_results, str(tmp_path))["files"]
    gt = COCO(str(tmp_path / "instances.json"))
    dt = gt.loadRes(str(tmp_path / "instances_results.json"))
    rows = _rows_by_id(oracle_results, "instances")
    assert len(gt.getImgIds()) == len(rows) and written["instances.json"] == len(dt.getAnnIds()) > 0
    for ann in gt.loadAnns(gt.getAnnIds()):
        row = rows[ann["image_id"]]
        masks = [decode_mask(i["segmentation"]) for i in row["instances"] if i["category_id"] == ann["category_id"]]
        assert any(np.array_equal(gt.annToMask(ann).astype(bool), m) for m in masks)
    names = {img["file_name"] for img in gt.dataset["images"]}
    assert "street/scene_a.png" in names and "shards/shard-000000.tar/000001.png" in names


def test_coco_panoptic_png_ids_match_segments_info(oracle_results, tmp_path):
    export_coco(oracle_results, str(tmp_path))
    pan = json.loads((tmp_path / "panoptic.json").read_text())
    assert {c["id"]: c["isthing"] for c in pan["categories"]}[200] == 0
    rows = _rows_by_id(oracle_results, "panoptic")
    for ann in pan["annotations"]:
        rgb = np.asarray(Image.open(tmp_path / "panoptic" / ann["file_name"]), dtype=np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        assert set(np.unique(ids)) - {0} == {s["id"] for s in ann["segments_info"]}
        for seg in ann["segments_info"]:
            assert (ids == seg["id"]).sum() == seg["area"]
        row = rows[ann["image_id"]]
        assert np.array_equal(ids, decode_panoptic(row["panoptic"], row["height"], row["width"]))


def test_coco_keypoints_and_densepose_exports(people, tmp_path):
    export_coco(people, str(tmp_path))
    kp = COCO(str(tmp_path / "person_keypoints.json"))
    category = kp.loadCats(1)[0]
    assert category["keypoints"][0] == "nose" and len(category["skeleton"]) == 19
    results = kp.loadRes(str(tmp_path / "person_keypoints_results.json"))
    assert len(results.getAnnIds()) == 3 and len(kp.getImgIds()) == 3  # the failed row is not an image
    rows = _rows_by_id(people, "densepose")
    for entry in json.loads((tmp_path / "densepose_results.json").read_text()):
        import base64

        iuv = decode_iuv(base64.decodebytes(entry["densepose"]["labels_uv_str"].encode()))
        assert list(iuv.shape) == entry["densepose"]["shape_chw"]
        assert np.array_equal(iuv, decode_iuv(rows[entry["image_id"]]["densepose"][0]["iuv_png"]))


def test_eval_predictions_equal_to_ground_truth_give_ap_100(oracle_results, samples, tmp_path):
    metrics = evaluate(oracle_results, str(samples.gt_path))
    assert metrics["segm"]["AP"] == 100.0 and metrics["bbox"]["AP"] == 100.0
    assert metrics["images"]["matched"] == len(samples.ground_truth["images"])  # by file name


def _panoptic_ground_truth(samples, folder):
    """Panoptic GT built from the samples' instance GT alone: each mask a thing, the rest
    background stuff (id 200) -- independent of the pipeline and its export."""
    folder.mkdir()
    gt = samples.ground_truth
    out = {"images": gt["images"], "annotations": [],
           "categories": [{**c, "isthing": 1} for c in gt["categories"]] + [{"id": 200, "name": "background", "isthing": 0}]}
    for img in gt["images"]:
        id_map = np.ones((img["height"], img["width"]), np.int64)  # 1 = background
        segments = []
        for k, ann in enumerate(a for a in gt["annotations"] if a["image_id"] == img["id"]):
            m = mask_util.decode({"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}).astype(bool)
            id_map[m] = k + 2
            segments.append({"id": k + 2, "category_id": ann["category_id"], "iscrowd": 0})
        segments.append({"id": 1, "category_id": 200, "iscrowd": 0})
        rgb = np.stack([id_map % 256, id_map // 256 % 256, id_map // 65536], -1).astype(np.uint8)
        png = f"{img['id']}.png"
        Image.fromarray(rgb).save(folder / png)
        out["annotations"].append({"image_id": img["id"], "file_name": png, "segments_info": segments})
    (folder.parent / "panoptic_gt.json").write_text(json.dumps(out))
    return out


def test_eval_panoptic_pq(oracle_results, samples, tmp_path):
    gt = _panoptic_ground_truth(samples, tmp_path / "panoptic_gt")
    metrics = evaluate(oracle_results, str(tmp_path / "panoptic_gt.json"))
    assert metrics["panoptic"]["All"]["PQ"] == 100.0 and metrics["panoptic"]["Stuff"]["PQ"] == 100.0
    # relabel the person segments in the GT as dogs: person and dog each lose every match
    for ann in gt["annotations"]:
        for seg in ann["segments_info"]:
            seg["category_id"] = 18 if seg["category_id"] == 1 else seg["category_id"]
    (tmp_path / "panoptic_gt.json").write_text(json.dumps(gt))
    worse = evaluate(oracle_results, str(tmp_path / "panoptic_gt.json"))["panoptic"]
    assert worse["Things"]["PQ"] < 100.0 and worse["Stuff"]["PQ"] == 100.0


def test_labelstudio_brushes_decode_with_label_studio_sdk(oracle_results, tmp_path):
    from label_studio_sdk.converter.brush import decode_rle

    written = export_labelstudio(oracle_results, str(tmp_path), tasks_per_file=4,
                                 url_map=[("file://", "http://files.example/")])["files"]
    files = sorted(p for p in tmp_path.glob("tasks-*.json"))
    assert len(files) == len(written) - 1 and all(len(json.loads(f.read_text())) <= 4 for f in files)
    tasks = [t for f in files for t in json.loads(f.read_text())]
    rows = _rows_by_id(oracle_results, "instances")
    assert len(tasks) == len(rows)
    for task in tasks:
        row = rows[task["data"]["image_id"]]
        assert task["data"]["image"].startswith("http://files.example/") or task["data"]["image"].startswith("tar://")
        result = task["predictions"][0]["result"]
        brushes = [r for r in result if r["from_name"] == "mask"]
        boxes = [r for r in result if r["from_name"] == "box"]
        assert len(brushes) == len(boxes) == len(row["instances"])
        for brush, box, inst in zip(brushes, boxes, row["instances"]):
            h, w = row["height"], row["width"]
            mask = decode_rle(brush["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
            assert np.array_equal(mask, decode_mask(inst["segmentation"]))
            assert box["value"]["x"] == pytest.approx(100 * inst["bbox"][0] / w)
            assert box["value"]["width"] == pytest.approx(100 * inst["bbox"][2] / w)
    config = (tmp_path / "labeling_config.xml").read_text()
    assert '<BrushLabels name="mask" toName="image">' in config and '<BrushLabels name="panoptic"' in config


def test_labelstudio_keypoints_and_s3_references(people, tmp_path):
    export_labelstudio(people, str(tmp_path))
    (task, *_) = json.loads((tmp_path / "tasks-00000.json").read_text())
    assert task["data"]["image"].startswith("s3://lake/people/")
    points = [r for r in task["predictions"][0]["result"] if r["type"] == "keypointlabels"]
    assert [p["value"]["keypointlabels"][0] for p in points][:3] == ["nose", "left_eye", "right_eye"]
    assert '<KeyPointLabels name="keypoints"' in (tmp_path / "labeling_config.xml").read_text()


def test_cvat_archives(people, tmp_path):
    written = export_cvat(people, str(tmp_path))["files"]
    assert set(written) == {"cvat_coco_instances.zip", "cvat_coco_keypoints.zip"}
    with zipfile.ZipFile(tmp_path / "cvat_coco_keypoints.zip") as zf:
        assert zf.namelist() == ["annotations/person_keypoints_default.json", "images/"]
        data = json.loads(zf.read("annotations/person_keypoints_default.json"))
    assert data["categories"][0]["keypoints"][0] == "nose"
    assert {a["keypoints"][2] for a in data["annotations"]} == {2}  # COCO visibility flags
    with zipfile.ZipFile(tmp_path / "cvat_coco_instances.zip") as zf:
        assert zf.namelist() == ["annotations/instances_default.json", "images/"]


def test_render_writes_overlays_and_an_index(oracle_results, samples, tmp_path):
    count = render(oracle_results, str(tmp_path), limit=50)
    index = (tmp_path / "index.html").read_text()
    rows = list(oracle_results.rows(["image_id", "error", "width", "height"]))
    assert count == len(rows)
    for r in rows:
        if r["error"]:
            assert r["error"].split(":")[0] in index
            continue
        overlay = Image.open(tmp_path / f"{r['image_id']}_instances.jpg")
        assert overlay.size == (r["width"], r["height"])  # upright, original size
        assert f"{r['image_id']}_panoptic.jpg" in index


@pytest.mark.parametrize("args, message", [
    (["export", "coco", "{empty}", "{out}"], "no batchseg dataset at"),
    (["eval", "{results}", "--gt", "{nomatch}"], "matches no image"),
    (["export", "yaml", "{results}", "{out}"], "invalid choice: 'yaml'"),
])
def test_export_and_eval_errors(args, message, people, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nomatch.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "zzz.jpg"}], "categories": [{"id": 1, "name": "person"}],
                                                           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]}))
    paths = {"empty": tmp_path / "empty", "out": tmp_path / "out", "results": people.uri, "nomatch": tmp_path / "nomatch.json"}
    cmd = [sys.executable, "-m", "batchseg", *[a.format(**{k: str(v) for k, v in paths.items()}) for a in args]]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]


def test_eval_keypoints_against_their_own_coco_export(people, tmp_path):
    """The dataset-form export (visibility flags instead of scores) as ground truth: OKS ~ 1."""
    export_coco(people, str(tmp_path))
    metrics = evaluate(people, str(tmp_path / "person_keypoints.json"))
    assert metrics["keypoints"]["AP"] == 100.0
    assert metrics["images"] == {"results": 3, "ground_truth": 3, "matched": 3}


# --- hand-made rows (tests/annotated_rows.py): holes, objects in two parts, empty masks -------

DATUMARO_PYTHON = REPO / ".venv-datumaro" / "bin" / "python"


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    return open_results(str(write_hand_rows(tmp_path_factory.mktemp("hand"))))


def _masks_by_image(results):
    """image_id -> [(category_id, (H, W) bool)] of the non-empty instance masks."""
    return {r["image_id"]: [(i["category_id"], decode_mask(i["segmentation"])) for i in r["instances"] if i["area"]]
            for r in results.rows() if r["error"] is None}


def test_dataset_form_leaves_out_empty_masks_results_form_keeps_them(hand, tmp_path):
    summary = export_coco(hand, str(tmp_path))
    assert summary["skipped_empty"] == 4  # one per image
    assert summary["files"]["instances.json"] == 8 and summary["files"]["instances_results.json"] == 12
    gt = COCO(str(tmp_path / "instances.json"))
    assert all(gt.annToMask(a).any() and a["area"] > 0 for a in gt.loadAnns(gt.getAnnIds()))
    results = json.loads((tmp_path / "instances_results.json").read_text())
    assert sum(not mask_util.area(r["segmentation"]) for r in results) == 4


def test_a_run_scores_ap_100_against_its_own_dataset_form_export(hand, tmp_path):
    export_coco(hand, str(tmp_path))
    metrics = evaluate(hand, str(tmp_path / "instances.json"))
    assert metrics["segm"]["AP"] == 100.0 and metrics["bbox"]["AP"] == 100.0
    # what instances.json held before: every instance the model produced, empty masks included.
    # No prediction can match an empty GT mask (pycocotools' IoU of two empty masks is 0).
    dataset = json.loads((tmp_path / "instances.json").read_text())
    results = json.loads((tmp_path / "instances_results.json").read_text())
    dataset["annotations"] = [{**r, "id": n, "area": int(mask_util.area(r["segmentation"])), "iscrowd": 0}
                              for n, r in enumerate(results, start=1)]
    (tmp_path / "with_empty.json").write_text(json.dumps(dataset))
    before = evaluate(hand, str(tmp_path / "with_empty.json"))
    assert before["segm"]["AP"] < 100.0


def test_polygons_keep_holes_and_parts_and_lose_no_iou(hand, tmp_path):
    summary = export_coco(hand, str(tmp_path), polygons=True)
    assert summary["polygons"] == {"converted": 8, "iou_mean": 1.0, "iou_min": 1.0}
    gt = COCO(str(tmp_path / "instances.json"))
    masks = _masks_by_image(hand)
    for ann in gt.loadAnns(gt.getAnnIds()):
        assert isinstance(ann["segmentation"], list) and all(len(p) >= 8 for p in ann["segmentation"])
        expected = [m for c, m in masks[ann["image_id"]] if c == ann["category_id"]]
        assert np.array_equal(gt.annToMask(ann).astype(bool), expected[0])
        if ann["category_id"] == 18:
            assert len(ann["segmentation"]) == 2  # the dog's two parts
        else:
            assert len(ann["segmentation"]) == 1 and not expected[0].all()  # the ring, hole spliced in
    assert evaluate(hand, str(tmp_path / "instances.json"))["segm"]["AP"] == 100.0


def test_mask_to_polygons_is_exact_on_noisy_masks():
    rng = np.random.default_rng(0)
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []
    for density in (0.1, 0.5, 0.8):
        for _ in range(40):
            mask = rng.random((17, 23)) < density  # holes, pinches, single pixels, border contact
            if not mask.any():
                continue
            rle = polygons_to_rle(mask_to_polygons(mask), *mask.shape)
            assert np.array_equal(mask_util.decode(rle).astype(bool), mask)


def _datumaro(archive, fmt):
    if not DATUMARO_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{DATUMARO_PYTHON} missing: `make test` builds it from requirements/datumaro.txt")
        pytest.skip("no .venv-datumaro: run `make test` (it builds it from requirements/datumaro.txt)")
    out = subprocess.run([str(DATUMARO_PYTHON), str(REPO / "tests" / "datumaro_import.py"), str(archive), fmt],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "WARNING" not in out.stderr, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("polygons", [False, True], ids=["rle", "polygons"])
def test_cvat_archives_import_with_datumaro(hand, tmp_path, polygons):
    """datumaro is what CVAT's "COCO 1.0" and "COCO Keypoints 1.0" importers run."""
    export_cvat(hand, str(tmp_path), polygons=polygons)
    imported = _datumaro(tmp_path / "cvat_coco_instances.zip", "coco_instances")
    assert imported["labels"] == ["person", "dog"]
    masks = _masks_by_image(hand)
    assert set(imported["items"]) == {str(i) for i in masks}
    for image_id, anns in imported["items"].items():
        expected = masks[int(image_id)]
        height, width = expected[0][1].shape
        shapes = [a for a in anns if a["type"] != "Bbox"]
        groups = {}
        for a in shapes:
            assert a["type"] == ("Polygon" if polygons else "RleMask")
            if polygons:
                groups.setdefault(a["group"], (a["label"], []))[1].append(a["points"])
            else:
                rle = {"size": [height, width], "counts": a["rle"].encode()}
                groups[a["group"]] = (a["label"], mask_util.decode(rle).astype(bool))
        assert len(groups) == len(expected) == 2  # the empty mask was left out
        got = {label: (polygon_mask(m, height, width) if polygons else m) for label, m in groups.values()}
        names = {1: "person", 18: "dog"}
        for category_id, mask in expected:
            assert np.array_equal(got[names[category_id]], mask)
    people = _datumaro(tmp_path / "cvat_coco_keypoints.zip", "coco_person_keypoints")
    points = [a for anns in people["items"].values() for a in anns if a["type"] == "Points"]
    assert len(points) == 4 and all(len(p["points"]) == 34 and set(p["visibility"]) == {2} for p in points)


def polygon_mask(polygons, height, width):
    return mask_util.decode(polygons_to_rle(polygons, height, width)).astype(bool)


def test_cli_export_polygons_reports_the_iou_kept(hand, tmp_path):
    cmd = [sys.executable, "-m", "batchseg", "export", "cvat", hand.uri, str(tmp_path), "--polygons"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-2:] == ["batchseg: skipped empty: 4", "batchseg: polygons: converted 8, iou mean 1.0, iou min 1.0"]

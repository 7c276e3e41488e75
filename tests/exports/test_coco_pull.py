"""`pull coco`: CVAT's COCO 1.0 and COCO Keypoints 1.0 archives (as `export cvat` writes them, the
layouts CVAT exports too) come back as reviews equal to what went out; file names are matched
to the lake's images; a label outside the category table is one line, exit 2."""

import json
import zipfile

import numpy as np
import pytest

from batchseg.cli.main import main
from batchseg.exports.cvat import export_cvat
from batchseg.rows.encoding import decode_mask
from batchseg.store.results import open_results
from batchseg.store.reviews import open_reviews
from tests.annotated_rows import write_results


@pytest.fixture
def lake(tmp_path):
    return write_results(tmp_path / "out", count=4)


def test_a_cvat_export_round_trips_through_pull_coco(lake, tmp_path, capsys):
    export_cvat(open_results(str(lake)), str(tmp_path / "cvat"))
    archives = [str(tmp_path / "cvat" / name) for name in ("cvat_coco_instances.zip", "cvat_coco_keypoints.zip")]
    assert main(["pull", "coco", *archives, str(lake), "--annotator", "cvat-team"]) == 0
    assert "4 reviews of 4 images (0 unmatched)" in capsys.readouterr().out
    reviews = {r["image_id"]: r for r in open_reviews(str(lake)).rows()}
    rows = {r["image_id"]: r for r in open_results(str(lake)).rows() if r["error"] is None}
    assert set(reviews) == set(rows)
    for image, row in rows.items():
        review = reviews[image]
        assert review["tool"] == "coco" and review["annotator"] == "cvat-team" and review["image_uri"] == row["image_uri"]
        shown = [i for i in row["instances"] if i["area"]]  # the export leaves empty masks out
        assert [i["category_id"] for i in review["instances"]] == [i["category_id"] for i in shown]
        for got, want in zip(review["instances"], shown):
            assert np.array_equal(decode_mask(got["segmentation"]), decode_mask(want["segmentation"]))
        (person,) = review["keypoints"]
        assert np.allclose(np.reshape(person["keypoints"], (-1, 3))[:, :2],
                           np.reshape(row["keypoints"][0]["keypoints"], (-1, 3))[:, :2], atol=0.006)  # written to 2 decimals
    assert main(["acceptance", str(lake), "--out", str(tmp_path / "acc")]) == 0
    report = json.loads((tmp_path / "acc" / "acceptance.json").read_text())
    assert report["overall"]["kept"] == 8 and report["overall"]["edited"] == report["overall"]["deleted"] == 0


def test_unmatched_images_are_counted_and_unknown_labels_stop_the_pull(lake, tmp_path, capsys):
    coco = {"images": [{"id": 1, "file_name": "street/img001.jpg", "width": 81, "height": 61},
                       {"id": 2, "file_name": "elsewhere/zebra.jpg", "width": 10, "height": 10}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 20, 10], "iscrowd": 0,
                             "segmentation": [[2, 3, 22, 3, 22, 13, 2, 13]], "area": 200}],
            "categories": [{"id": 7, "name": "dog"}]}
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(coco))
    assert main(["pull", "coco", str(path), str(lake)]) == 0
    assert "1 reviews of 2 images (1 unmatched)" in capsys.readouterr().out
    (review,) = open_reviews(str(lake)).rows()
    assert review["image_uri"].endswith("street/img001.jpg") and review["instances"][0]["category_id"] == 18  # dog

    coco["categories"][0]["name"] = "giraffe"
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as z:
        z.writestr("annotations/instances_default.json", json.dumps(coco))
    pulls = open_reviews(str(lake)).pulls()
    assert main(["pull", "coco", str(tmp_path / "bad.zip"), str(lake)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'giraffe'" in err and "category table" in err
    assert open_reviews(str(lake)).pulls() == pulls
    assert main(["pull", "coco", str(tmp_path / "missing.json"), str(lake)]) == 2

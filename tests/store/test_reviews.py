"""The reviews dataset: pulls published by their receipt, the newest review per image, and the
merged view of reviews and runs (local folders and the tests' S3 API server)."""

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow.parquet as pq
import pytest

from batchseg.rows.encoding import encode_mask
from batchseg.rows.schema import REVIEW
from batchseg.store.results import open_results
from batchseg.store.reviews import PullWriter, open_reviews
from tests.annotated_rows import RUN_ID, image_row, write_results

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)


def review(row: dict, minutes: int, annotator: str = "ann@example.com", category_id: int = 1) -> dict:
    """A person's review of `row`: one box-sized instance of `category_id`."""
    mask = np.zeros((row["height"], row["width"]), bool)
    mask[5:20, 5:30] = True
    return {"image_id": row["image_id"], "image_uri": row["image_uri"], "width": row["width"], "height": row["height"],
            "instances": [{"category_id": category_id, "bbox": [5.0, 5.0, 25.0, 15.0], "score": 1.0,
                           "area": int(mask.sum()), "segmentation": encode_mask(mask)}],
            "keypoints": [], "source": "human", "annotator": annotator, "reviewed_at": T0 + timedelta(minutes=minutes),
            "lead_time_s": 12.5, "tool": "labelstudio", "ls_project": 1, "ls_task": 10, "ls_annotation": 100 + minutes,
            "run": RUN_ID, "model_version": "m@1"}


def pull(output, reviews: list[dict], rows_per_file: int = 2, **options) -> dict:
    writer = PullWriter(str(output), options or None, rows_per_file=rows_per_file)
    for r in reviews:
        writer.add(r)
    return writer.publish({"tool": "labelstudio", "categories": {"instance": {"things": [{"id": 1, "name": "person"}]}}})


@pytest.fixture
def lake(tmp_path):
    return write_results(tmp_path / "out", count=4)


def _rows_by_id(output):
    return {r["image_id"]: r for r in open_reviews(str(output)).rows()}


def test_a_pull_is_read_only_once_its_receipt_is_written(lake):
    rows = [image_row(f"file:///lake/images/street/img{i:03d}.jpg", 60 + i % 3, 80 + i % 4, i) for i in range(4)]
    writer = PullWriter(str(lake), rows_per_file=1)
    for r in rows[:3]:
        writer.add(review(r, 1))
    writer.flush()
    assert len(list((lake / "reviews").rglob("part-*.parquet"))) == 3  # parts are there ...
    assert open_reviews(str(lake)).pulls() == [] and list(open_reviews(str(lake)).rows()) == []  # ... but unpublished
    receipt = writer.publish({"tool": "labelstudio"})
    assert receipt["rows"] == 3 and receipt["parts"] == 3
    reviews = open_reviews(str(lake))
    assert reviews.pulls() == [writer.pull_id]
    got = list(reviews.rows())
    assert sorted(r["image_id"] for r in got) == sorted(r["image_id"] for r in rows[:3])
    assert set(got[0]) == set(REVIEW.names) and got[0]["pull"] == writer.pull_id and got[0]["source"] == "human"
    assert pq.read_schema(next((lake / "reviews").rglob("part-*.parquet"))).equals(REVIEW)


def test_the_newest_review_of_an_image_wins_across_pulls_and_within_one(lake):
    rows = [image_row(f"file:///lake/images/street/img{i:03d}.jpg", 60 + i % 3, 80 + i % 4, i) for i in range(4)]
    first = pull(lake, [review(rows[0], 1), review(rows[1], 1)])
    # in one pull, two annotations of image 2 (two tasks of one image): the one saved last wins,
    # whatever the order they were written in
    second = pull(lake, [review(rows[1], 5, "second@example.com"), review(rows[2], 9, "late@example.com"),
                         review(rows[2], 3, "early@example.com")], rows_per_file=1)
    reviews = open_reviews(str(lake))
    assert reviews.pulls() == [first["pull"], second["pull"]]
    assert reviews.categories() == {"instance": {"things": [{"id": 1, "name": "person"}]}}
    got = _rows_by_id(lake)
    assert len(got) == 3 and len(list(reviews.rows())) == 3
    assert got[rows[0]["image_id"]]["pull"] == first["pull"]
    assert got[rows[1]["image_id"]]["annotator"] == "second@example.com"
    assert got[rows[2]["image_id"]]["annotator"] == "late@example.com"
    assert list(reviews.image_ids()) == sorted(r["image_id"] for r in rows[:3])
    only = list(reviews.rows(["annotator"]))
    assert all(set(r) == {"image_id", "annotator"} for r in only)


def test_no_reviews_reads_as_empty(tmp_path):
    reviews = open_reviews(str(tmp_path / "nothing"))
    assert reviews.pulls() == [] and list(reviews.rows()) == [] and reviews.categories() == {}
    assert len(reviews.image_ids()) == 0


def test_the_merged_view_takes_the_human_row_where_there_is_one(lake):
    rows = [image_row(f"file:///lake/images/street/img{i:03d}.jpg", 60 + i % 3, 80 + i % 4, i) for i in range(4)]
    pull(lake, [review(rows[1], 1, category_id=18), review(rows[3], 2)])
    merged = list(open_results(str(lake), reviews=True).rows(["image_uri", "error", "instances", "review_priority"]))
    assert len(merged) == 5  # 4 images + 1 failed row, each once
    by_id = {r["image_id"]: r for r in merged}
    assert [by_id[r["image_id"]]["source"] for r in rows] == ["model", "human", "model", "human"]
    assert by_id[rows[1]["image_id"]]["instances"][0]["category_id"] == 18
    assert by_id[rows[1]["image_id"]]["error"] is None and by_id[rows[1]["image_id"]]["run"] == ""
    assert [i["segmentation"] for i in by_id[rows[0]["image_id"]]["instances"]] == \
        [i["segmentation"] for i in rows[0]["instances"]]
    plain = list(open_results(str(lake)).rows(["instances"]))
    assert "source" not in plain[0] and len(plain) == 5


@pytest.mark.timeout(120)
def test_pulls_on_s3(s3_endpoint, lake):
    import s3fs

    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**opts)
    fs.mkdir("reviews-bucket")
    rows = [image_row(f"file:///lake/images/street/img{i:03d}.jpg", 60 + i % 3, 80 + i % 4, i) for i in range(2)]
    pull("s3://reviews-bucket/out", [review(rows[0], 1), review(rows[1], 2)], **opts)
    pull("s3://reviews-bucket/out", [review(rows[0], 7, "again@example.com")], **opts)
    got = {r["image_id"]: r for r in open_reviews("s3://reviews-bucket/out", opts).rows(["annotator"])}
    assert {k: v["annotator"] for k, v in got.items()} == {rows[0]["image_id"]: "again@example.com",
                                                           rows[1]["image_id"]: "ann@example.com"}


@pytest.mark.timeout(400)
def test_skip_reviewed_leaves_reviewed_images_out_of_a_rerun_with_new_weights(ray_cluster, samples, tmp_path):
    """A real local Ray run, reviews of three of its images, then a re-run whose model fingerprint
    changed (another score threshold): everything is annotated again except the reviewed
    images, and the content errors, which stay done for every model."""
    from tests.conftest import read_rows, run_job

    out = tmp_path / "lake"
    oracle = {"backend": "tests.oracle:ColorKeyBackend", "score_threshold": 0.0}
    run_job(inputs=[str(samples.root)], output=str(out), tasks=["instance"], models={"instance": oracle})
    rows = read_rows(str(out / "annotations"))
    good = [r for r in rows if r["error"] is None]
    content_errors = sum(r["error_kind"] == "content" for r in rows)
    reviewed = good[:3]
    writer = PullWriter(str(out))
    for r in reviewed:
        writer.add({**review({**r, "height": r["height"], "width": r["width"]}, 1), "run": None})
    writer.publish({"tool": "coco"})

    _, report = run_job(inputs=[str(samples.root)], output=str(out), tasks=["instance"], skip_reviewed=True,
                        models={"instance": {**oracle, "score_threshold": 0.05}})
    assert report["ledger"]["reviewed"] == 3
    assert report["images"]["in"] == len(rows) - len(reviewed) - content_errors
    rerun = {r["image_id"] for r in read_rows(str(out / "annotations" / f"run={report['run_id']}"))}
    assert not rerun & {r["image_id"] for r in reviewed}
    merged = {r["image_id"]: r["source"] for r in open_results(str(out), reviews=True).rows(["error"])}
    assert len(merged) == len(rows) and sum(s == "human" for s in merged.values()) == 3


def test_export_with_reviews_writes_the_best_labels_of_the_lake(lake, tmp_path, capsys):
    import json

    from batchseg.cli.main import main

    rows = [image_row(f"file:///lake/images/street/img{i:03d}.jpg", 60 + i % 3, 80 + i % 4, i) for i in range(4)]
    pull(lake, [review(rows[2], 1, category_id=18)])
    assert main(["export", "coco", str(lake), str(tmp_path / "best"), "--reviews"]) == 0
    assert main(["export", "coco", str(lake), str(tmp_path / "model")]) == 0
    capsys.readouterr()
    best, model = (json.loads((tmp_path / d / "instances.json").read_text()) for d in ("best", "model"))
    by_image = {d: {} for d in ("best", "model")}
    for name, doc in (("best", best), ("model", model)):
        for ann in doc["annotations"]:
            by_image[name].setdefault(ann["image_id"], []).append(ann["category_id"])
    reviewed = rows[2]["image_id"]
    assert by_image["best"][reviewed] == [18] and by_image["model"][reviewed] == [1, 18]
    assert {k: v for k, v in by_image["best"].items() if k != reviewed} == \
        {k: v for k, v in by_image["model"].items() if k != reviewed}

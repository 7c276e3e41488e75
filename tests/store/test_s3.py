"""End to end against a real S3 API server on 127.0.0.1: images, weights and results in a bucket."""

import json

import boto3
import pytest
import s3fs

from tests.conftest import read_rows, relative_name, run_job


@pytest.fixture(scope="module")
def bucket(s3_endpoint, samples, tv_weights):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="lake")
    for path in samples.root.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "lake", f"images/{path.relative_to(samples.root)}")
    s3.upload_file(str(tv_weights), "lake", "models/maskrcnn.pth")
    return "lake"


def test_s3_in_s3_out_nothing_lost(ray_cluster, s3_endpoint, samples, bucket):
    _, summary = run_job(
        inputs=[f"s3://{bucket}/images/"], output=f"s3://{bucket}/runs/oracle",
        models={"instance": {"backend": "tests.oracle:ColorKeyBackend", "score_threshold": 0.0}},
        s3={"endpoint_url": s3_endpoint}, batch_size=4,
    )
    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    rows = read_rows(f"s3://{bucket}/runs/oracle/annotations", **opts)
    assert sorted(relative_name(r["image_uri"], samples.root) for r in rows) == sorted(samples.images)
    assert rows[0]["image_uri"].startswith(f"s3://{bucket}/images/") or rows[0]["image_uri"].startswith("tar://")
    assert sum(len(r["instances"] or []) for r in rows) == len(samples.ground_truth["annotations"])
    assert {r["source_version"] for r in rows if r["image_uri"].startswith("s3://")} != {""}  # ETags kept
    fs = s3fs.S3FileSystem(**opts)
    written = json.loads(fs.cat(f"{bucket}/runs/oracle/run.json"))
    assert written["images"] == summary["images"] and written["images"]["failed"] == len(samples.bad)


def test_weights_from_s3_are_fetched_and_cached(ray_cluster, s3_endpoint, bucket, tmp_path):
    model = {"backend": "torchvision", "weights": f"s3://{bucket}/models/maskrcnn.pth", "min_size": 128, "max_size": 256}
    _, summary = run_job(
        inputs=[f"s3://{bucket}/images/street/"], output=f"s3://{bucket}/runs/tv",
        models={"instance": model}, s3={"endpoint_url": s3_endpoint},
    )
    assert summary["images"] == {"in": 2, "annotated": 2, "failed": 0}


def test_missing_weights_on_s3_fail_preflight(s3_endpoint, bucket):
    from batchseg.config import ConfigError

    with pytest.raises(ConfigError, match="weights not found"):
        run_job(
            inputs=[f"s3://{bucket}/images/"], output=f"s3://{bucket}/runs/never",
            models={"instance": {"backend": "torchvision", "weights": f"s3://{bucket}/models/nope.pth"}},
            s3={"endpoint_url": s3_endpoint},
        )

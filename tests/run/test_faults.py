"""Faults during a run: a predictor actor dying, object-store errors. Nothing lost, nothing doubled."""

from tests.conftest import read_rows, relative_name, run_job


def test_predictor_actor_killed_mid_run_is_replaced(ray_cluster, samples, tmp_path):
    marker = tmp_path / "died"
    model = {"backend": "tests.oracle:DiesOnceBackend", "score_threshold": 0.0, "options": {"marker": str(marker)}}
    _, summary = run_job(inputs=[str(samples.root)], output=str(tmp_path / "out"), models={"instance": model},
                         batch_size=2)
    assert marker.exists()  # an actor really died
    rows = read_rows(str(tmp_path / "out/annotations"))
    names = [relative_name(r["image_uri"], samples.root) for r in rows]
    assert sorted(names) == sorted(samples.images)  # every image exactly once
    assert summary["images"] == {"in": len(samples.images), "annotated": len(samples.images) - 4, "failed": 4}
    assert summary["found"]["instances"]["total"] == len(samples.ground_truth["annotations"])


def test_transient_s3_errors_are_retried(ray_cluster, s3_endpoint, samples, tmp_path):
    import boto3

    from tests.faulty_proxy import FaultyProxy, every

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="flaky")
    for path in samples.root.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "flaky", f"images/{path.relative_to(samples.root)}")
    with FaultyProxy(s3_endpoint, every(3, budget=40)) as proxy:
        _, summary = run_job(
            inputs=["s3://flaky/images/"], output="s3://flaky/out",
            models={"instance": {"backend": "tests.oracle:ColorKeyBackend", "score_threshold": 0.0}},
            s3={"endpoint_url": proxy.url},
        )
    assert proxy.injected > 10  # faults really happened, on reads, listing and writes alike
    rows = read_rows("s3://flaky/out/annotations", client_kwargs={"endpoint_url": s3_endpoint})
    assert sorted(relative_name(r["image_uri"], samples.root) for r in rows) == sorted(samples.images)
    assert not any("read failed" in (r["error"] or "") for r in rows)  # every throttled read was retried
    assert summary["images"] == {"in": len(samples.images), "annotated": len(samples.images) - 4, "failed": 4}

"""Exactly once at lake scale, on real parts (local Ray, the S3 API server on 127.0.0.1):
retried write tasks, changed weights, done tar shards, poison images (issue 8)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection import maskrcnn_resnet50_fpn

from batchseg.run import inflight, job, pipeline, placement
from batchseg.config import load_config
from batchseg.store.ledger import DoneSet
from tests.conftest import read_rows, relative_name, run_job
from tests.fault_parts import DiesAfterCommit

ORACLE = {"backend": "tests.oracle:ColorKeyBackend", "score_threshold": 0.0}


def test_a_write_task_retried_after_its_commit_adds_no_rows(ray_cluster, samples, tmp_path):
    cfg = load_config(None, [(["inputs"], [str(samples.root)]), (["output"], str(tmp_path / "out")),
                             (["models"], {"instance": ORACLE}), (["rows_per_file"], 4)])
    prepared = job.preflight(cfg)
    sink = DiesAfterCommit(cfg.output, {}, "r1", cfg.rows_per_file, ["instances"], marker=str(tmp_path / "died"))
    ds = pipeline.build(cfg, placement.place(cfg), DoneSet(None), prepared.weights, inflight.start_journal(),
                        prepared.units)
    pipeline.write(ds, sink, cfg.max_retries)
    assert (tmp_path / "died").exists()  # a write task really died after committing
    rows = read_rows(str(tmp_path / "out/annotations"))
    names = [relative_name(r["image_uri"], samples.root) for r in rows]
    assert sorted(names) == sorted(samples.images)  # no duplicate, none missing
    assert sink.counts["images"]["in"] == len(samples.images)


def _save_weights(path, seed):
    torch.manual_seed(seed)
    torch.save(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict(), path)


def test_changed_weights_annotate_everything_again(ray_cluster, samples, tmp_path):
    weights = tmp_path / "latest.pth"
    _save_weights(weights, 0)
    model = {"backend": "torchvision", "weights": str(weights), "min_size": 96, "max_size": 160}
    run = dict(inputs=[str(samples.root / "street"), str(samples.root / "park")], output=str(tmp_path / "out"),
               models={"instance": model})
    assert run_job(**run)[1]["images"]["in"] == 5
    assert run_job(**run)[1]["images"]["in"] == 0  # same weights: nothing to do
    _save_weights(weights, 1)  # the same path, new content
    again = run_job(**run)[1]
    assert again["images"]["in"] == 5 and again["done_before"] == 0
    assert run_job(**run)[1]["images"]["in"] == 0


def test_a_rerun_over_done_tar_shards_reads_no_shard_bytes(ray_cluster, s3_endpoint, samples, tmp_path):
    import boto3

    from tests.faulty_proxy import FaultyProxy

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="shards")
    for shard in (samples.root / "shards").glob("*.tar"):
        s3.upload_file(str(shard), "shards", f"in/{shard.name}")
    s3.put_object(Bucket="shards", Key="in/broken.tar", Body=b"\x00garbage" * 100)
    with FaultyProxy(s3_endpoint) as proxy:
        run = dict(inputs=["s3://shards/in/"], output="s3://shards/out", models={"instance": ORACLE},
                   s3={"endpoint_url": proxy.url})
        first = run_job(**run)[1]
        shard_gets = [p for m, p, _ in proxy.requests_seen if m == "GET" and p.split("?")[0].endswith(".tar")]
        assert first["images"]["in"] > 1 and first["images"]["failed"] == 1 and shard_gets
        proxy.requests_seen.clear()
        second = run_job(**run)[1]
    assert second["images"]["in"] == 0  # the corrupt shard too: recorded once
    assert second["done_before"] == first["images"]["in"]  # images only, the shards counted apart
    assert second["ledger"]["done_shards"] == len(list((samples.root / "shards").glob("*.tar")))
    assert [p for m, p, _ in proxy.requests_seen if p.split("?")[0].endswith(".tar") and m in ("GET", "HEAD")] == []


def test_an_image_that_kills_its_worker_every_time_ends_as_one_error_row(ray_cluster, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, width in enumerate([40, 41, 13, 42]):  # width 13 is the poison
        Image.fromarray(np.full((20, width, 3), 90, np.uint8)).save(folder / f"img_{i}.png")
    model = {"backend": "tests.fault_parts:KillsOnNarrowImages", "options": {"width": 13}}
    _, summary = run_job(inputs=[str(folder)], output=str(tmp_path / "out"), models={"instance": model}, batch_size=4)
    rows = {r["image_uri"].rsplit("/", 1)[-1]: r for r in read_rows(str(tmp_path / "out/annotations"))}
    assert len(rows) == 4 and summary["images"] == {"in": 4, "annotated": 3, "failed": 1}
    assert rows["img_2.png"]["error_kind"] == "model"
    assert "killed its worker" in rows["img_2.png"]["error"]
    assert all(rows[f"img_{i}.png"]["error"] is None for i in (0, 1, 3))


@pytest.mark.parametrize("retry", [False, True])
def test_failed_images_stay_failed_unless_retry_failed(ray_cluster, samples, tmp_path, retry):
    run = dict(inputs=[str(samples.root / "bad")], output=str(tmp_path / "out"), models={"instance": ORACLE})
    assert run_job(**run)[1]["images"]["failed"] == len(samples.bad)
    assert run_job(**run, retry_failed=retry)[1]["images"]["in"] == (len(samples.bad) if retry else 0)

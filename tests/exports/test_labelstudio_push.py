"""`push labelstudio` against a real Label Studio server on 127.0.0.1 (tests/labelstudio_server.py):
the pipeline's output goes in, the tasks come back through the API and are checked against
the Parquet rows; pushing again adds nothing; a newer run replaces predictions; transient
failures (and a response lost after the server committed) are retried without duplicates."""

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter.brush import decode_rle

from batchseg.config import ConfigError
from batchseg.rows.encoding import decode_mask
from batchseg.exports.labelstudio_push import PushSettings, push_labelstudio
from batchseg.run.provenance import model_version
from batchseg.store.results import open_results
from tests.annotated_rows import write_results as write_hand_rows
from tests.conftest import free_port, run_job, wait_http
from tests.faulty_proxy import FaultyProxy
from tests.labelstudio_server import label_studio  # noqa: F401  (a fixture)

ORACLES = {
    "instance": {"backend": "tests.oracle:ColorKeyBackend", "score_threshold": 0.0},
    "panoptic": {"backend": "tests.oracle:ColorKeyPanoptic"},
}
URL_MAP = [("file://", "http://files.example/")]


@pytest.fixture(scope="module")
def output(ray_cluster, samples, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ls_push_run")
    run_job(inputs=[str(samples.root)], output=str(out), tasks=["instance", "panoptic"], models=ORACLES)
    return out


@pytest.fixture(scope="module")
def title() -> str:
    """A project title of this session's own (a reused server keeps earlier sessions' projects)."""
    return f"batchseg demo {time.strftime('%Y%m%d-%H%M%S')}"


@pytest.fixture(scope="module")
def client(label_studio):
    return LabelStudio(base_url=label_studio.url, api_key=label_studio.token)


def _push(output, url, token, project, **settings):
    return push_labelstudio(open_results(str(output)), url, project, token,
                            PushSettings(url_map=URL_MAP, **settings))


def _tasks(client, project_id):
    """Every task of the project with its predictions, in id (= import) order."""
    return sorted(client.tasks.list(project=project_id, fields="all", page_size=100), key=lambda t: t.id)


def _good_rows(output):
    return {r["image_id"]: r for r in open_results(str(output)).rows() if r["error"] is None}


def test_push_creates_the_project_and_tasks_that_match_the_parquet(output, label_studio, client, title):
    rows = _good_rows(output)
    receipt = _push(output, label_studio.url, label_studio.token, title, chunk_size=4)

    assert receipt["status"] == "done" and receipt["project"]["created"]
    assert receipt["tasks"] == {"created": len(rows), "updated": 0, "skipped": 0, "annotated": 0}
    assert receipt["stats"]["failed_images"] == 4 and receipt["rows"] == len(rows) + 4
    assert [c["tasks"] for c in receipt["chunks"]] == [4] * (len(rows) // 4) + ([len(rows) % 4] if len(rows) % 4 else [])
    assert json.loads(Path(receipt["receipt"].removeprefix("file://")).read_text()) == receipt
    project = client.projects.get(id=receipt["project"]["id"])
    assert '<BrushLabels name="mask" toName="image">' in project.label_config

    tasks = _tasks(client, project.id)
    assert len(tasks) == len(rows) == project.task_number
    results = open_results(str(output))
    checked = 0
    for task in tasks:
        row = rows[task.data["image_id"]]
        assert task.data["batchseg_run"] == row["run"] and task.data["review_priority"] == row["review_priority"]
        assert task.data["image"].startswith(("http://files.example/", "tar://"))
        (prediction,) = task.predictions
        assert prediction.model_version == model_version(results.run_info(row["run"]) or {**results.run, "run_id": row["run"]})
        regions = prediction.result
        instances = [i for i in row["instances"] if decode_mask(i["segmentation"]).any()]
        assert len([r for r in regions if r["from_name"] == "box"]) == len(instances)
        assert len([r for r in regions if r["from_name"] == "panoptic"]) == len(row["panoptic"])
        for brush, inst in zip([r for r in regions if r["from_name"] == "mask"], instances):
            h, w = row["height"], row["width"]
            mask = decode_rle(brush["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
            assert np.array_equal(mask, decode_mask(inst["segmentation"]))
            checked += 1
    assert checked >= 10
    # worst first: import order (task ids) follows review_priority, highest first, unknown last
    keys = [(-t.data["review_priority"] if t.data["review_priority"] is not None else np.inf) for t in tasks]
    assert keys == sorted(keys)


def test_push_again_adds_nothing(output, label_studio, client, title):
    rows = _good_rows(output)
    receipt = _push(output, label_studio.url, label_studio.token, title, chunk_size=5)
    assert not receipt["project"]["created"] and receipt["lookup"] == "query"
    assert receipt["tasks"] == {"created": 0, "updated": 0, "skipped": len(rows), "annotated": 0}
    # by id, and finding tasks through a listing of the project instead of filter queries
    again = _push(output, label_studio.url, label_studio.token, str(receipt["project"]["id"]), lookup="index")
    assert again["lookup"] == "index" and again["tasks"] == {"created": 0, "updated": 0, "skipped": len(rows), "annotated": 0}
    assert len(_tasks(client, receipt["project"]["id"])) == len(rows)


@pytest.mark.parametrize("threshold, lookup", [(0.95, "query"), (0.0, "index")])
def test_a_newer_run_replaces_predictions_not_tasks(threshold, lookup, output, samples, label_studio, client, title):
    first = _push(output, label_studio.url, label_studio.token, title)
    project_id = first["project"]["id"]
    # annotate everything again with another threshold: other instances, a newer run id
    run_job(inputs=[str(samples.root)], output=str(output), tasks=["instance", "panoptic"], overwrite=True,
            models={**ORACLES, "instance": {**ORACLES["instance"], "score_threshold": threshold}})
    rows = _good_rows(output)
    (new_run,) = {r["run"] for r in rows.values()}
    receipt = _push(output, label_studio.url, label_studio.token, title, chunk_size=6, lookup=lookup)
    assert receipt["tasks"] == {"created": 0, "updated": len(rows), "skipped": 0, "annotated": 0}
    assert list(receipt["runs"]) == [new_run]
    tasks = _tasks(client, project_id)
    assert len(tasks) == len(rows)
    for task in tasks:
        row = rows[task.data["image_id"]]
        (prediction,) = task.predictions  # replaced, not added
        assert task.data["batchseg_run"] == new_run
        assert len([r for r in prediction.result if r["from_name"] == "box"]) == len(row["instances"])
    assert _push(output, label_studio.url, label_studio.token, title)["tasks"]["skipped"] == len(rows)


def test_transient_failures_are_retried_without_duplicates(output, label_studio, client, title):
    rows = _good_rows(output)
    imports = []

    def fault(method, path, n):
        if method == "POST" and path.split("?")[0].endswith("/import"):
            imports.append(n)
            if len(imports) == 2:
                return "after"  # the server imports the chunk, the client sees a 502
        return "before" if n % 4 == 0 else None  # every 4th request: 503, nothing done

    with FaultyProxy(label_studio.url, fault, refusal=b"Service Unavailable") as proxy:
        receipt = _push(output, proxy.url, label_studio.token, f"{title} flaky", chunk_size=3, backoff_s=0.05)
    assert receipt["status"] == "done" and receipt["retries"] >= 3
    assert receipt["tasks"] == {"created": len(rows), "updated": 0, "skipped": 0, "annotated": 0}
    assert any(outcome == "after" for *_, outcome in proxy.requests_seen)
    assert len(_tasks(client, receipt["project"]["id"])) == len(rows)  # the lost response made no duplicates


def test_retries_are_bounded_and_the_receipt_says_where_it_stopped(output, label_studio, tmp_path):
    with FaultyProxy(label_studio.url, lambda method, path, n: "before" if method == "POST" else None,
                     refusal=b"Service Unavailable") as proxy:
        with pytest.raises(Exception, match="failed after 3 tries"):
            push_labelstudio(open_results(str(output)), proxy.url, "never", label_studio.token,
                             PushSettings(retries=2, backoff_s=0.01), receipt=str(tmp_path / "receipt.json"))
    receipt = json.loads((tmp_path / "receipt.json").read_text())
    assert receipt["status"] == "failed" and "push again to finish" in receipt["error"]


@pytest.mark.parametrize("case, message", [
    ("no key", "set LABEL_STUDIO_API_KEY"),
    ("bad key", "refused the API key"),
    ("no server", "cannot reach Label Studio at"),
    ("no project", "no Label Studio project with id 999"),
    ("not Label Studio", r"does not answer as Label Studio's API \(HTTP 404"),
])
def test_errors_name_the_fix(case, message, output, label_studio, title, tmp_path):
    url, token, project = label_studio.url, label_studio.token, title
    if case == "no key":
        token = ""
    elif case == "bad key":
        token = "not-a-token"
    elif case == "no server":
        url = f"http://127.0.0.1:{free_port()}"
    elif case == "no project":
        project = "999"
    with contextlib.ExitStack() as stack:
        if case == "not Label Studio":  # a plain web server: 404 for /api/projects/
            port = free_port()
            server = stack.enter_context(subprocess.Popen(
                [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            stack.callback(server.terminate)
            url = f"http://127.0.0.1:{port}"
            wait_http(url)
        with pytest.raises(ConfigError, match=message) as e:
            push_labelstudio(open_results(str(output)), url, project, token, receipt=str(tmp_path / "r.json"))
    assert "\n" not in str(e.value)


def test_worst_first_and_empty_masks_left_out(label_studio, client, title, tmp_path):
    hand = open_results(str(write_hand_rows(tmp_path / "hand", count=6)))
    receipt = push_labelstudio(hand, label_studio.url, f"{title} hand", label_studio.token, PushSettings(chunk_size=4))
    assert receipt["stats"]["skipped_empty"] == 6 and receipt["tasks"]["created"] == 6
    tasks = _tasks(client, receipt["project"]["id"])
    assert [t.data["review_priority"] for t in tasks] == [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]  # import order
    assert all(r["value"].get("rle") for t in tasks for r in t.predictions[0].result if r["type"] == "brushlabels")


def test_cli_push(output, label_studio, client, title, tmp_path):
    cmd = [sys.executable, "-m", "batchseg", "push", "labelstudio", str(output), "--url", label_studio.url,
           "--project", f"{title} cli", "--chunk-size", "8", "--url-map", "file://=http://files.example/",
           "--receipt", str(tmp_path / "receipt.json")]
    env = {**os.environ, "LABEL_STUDIO_API_KEY": label_studio.token}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    rows = _good_rows(output)
    assert lines[0].endswith(f"{title} cli' (created) at {label_studio.url}")
    assert lines[1] == f"batchseg: {len(rows)} tasks in {-(-len(rows) // 8)} chunks: {len(rows)} created, 0 updated, 0 skipped, 0 kept for their annotations (0 retries)"
    assert lines[2] == "batchseg: left out 4 failed images and 0 empty masks"
    assert json.loads((tmp_path / "receipt.json").read_text())["tasks"]["created"] == len(rows)
    env.pop("LABEL_STUDIO_API_KEY")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "batchseg: no Label Studio API key: set LABEL_STUDIO_API_KEY (Label Studio: Account & Settings -> Access Token)"]


def test_s3_references_resolve_through_a_connected_s3_storage(label_studio, client, title, s3_endpoint, tmp_path):
    """s3:// stays s3:// (Label Studio's cloud-storage form): once an S3 source storage for the
    bucket is connected to the project -- no sync -- Label Studio serves the image."""
    import boto3
    import httpx

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="ls-lake")
    hand = open_results(str(write_hand_rows(tmp_path / "hand", count=2, root="s3://ls-lake/images")))
    images = {r["image_uri"]: f"image bytes of {r['image_uri']}".encode() for r in hand.rows() if r["error"] is None}
    for uri, body in images.items():
        s3.put_object(Bucket="ls-lake", Key=uri.removeprefix("s3://ls-lake/"), Body=body)
    receipt = push_labelstudio(hand, label_studio.url, f"{title} s3", label_studio.token)
    project_id = receipt["project"]["id"]
    assert {t.data["image"] for t in _tasks(client, project_id)} == set(images)
    client.import_storage.s3.create(project=project_id, bucket="ls-lake", s3endpoint=s3_endpoint, region_name="us-east-1",
                                    aws_access_key_id="testing", aws_secret_access_key="testing", presign=False)
    for task in client.tasks.list(project=project_id, include="id,data", resolve_uri=True):
        resolved = task.data["image"]
        assert resolved.startswith(f"/tasks/{task.id}/resolve/?fileuri=")  # Label Studio's storage proxy
        got = httpx.get(label_studio.url + resolved, headers={"Authorization": f"Token {label_studio.token}"},
                        follow_redirects=True, timeout=60)
        assert got.status_code == 200 and got.content in images.values()


@pytest.mark.timeout(600)
def test_video_frames_go_as_image_tasks_label_studio_serves_grouped_by_video(
        ray_cluster, label_studio, client, title, s3_endpoint, tmp_path):
    """Frame rows (VIDEO#t=SECONDS) of a PyAV-made video: each task's image is the frame as a
    JPEG on the S3 API server, which Label Studio itself serves once an S3 storage is connected;
    pushing again writes no frame; a submitted annotation pulls back to the frame's row."""
    import boto3
    import httpx
    from PIL import Image

    from batchseg.config import StorageConfig
    from batchseg.exports.labelstudio_pull import pull_labelstudio
    from batchseg.store.reviews import open_reviews
    from tests.videos import make_video, picture

    lake, out = tmp_path / "lake", tmp_path / "out"
    lake.mkdir()
    make_video(lake / "street.mp4", frames=30, height=64, width=96)
    run_job(inputs=[str(lake)], output=str(out), models={"instance": ORACLES["instance"]}, video={"fps": 5})
    rows = _good_rows(out)
    assert len(rows) == 15 and all("#t=" in r["image_uri"] for r in rows.values())
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="ls-frames")
    settings = PushSettings(frames="s3://ls-frames/pushed", chunk_size=6)
    storage = StorageConfig(endpoint_url=s3_endpoint)
    receipt = push_labelstudio(open_results(str(out)), label_studio.url, f"{title} video", label_studio.token,
                               settings, storage=storage)
    assert receipt["tasks"]["created"] == 15 and receipt["frames"] == {
        "folder": "s3://ls-frames/pushed", "tasks": 15, "written": 15, "unreadable": 0, "first_unreadable": None}
    project_id = receipt["project"]["id"]
    tasks = _tasks(client, project_id)  # as pushed: once a storage is connected, Label Studio resolves the URIs
    client.import_storage.s3.create(project=project_id, bucket="ls-frames", s3endpoint=s3_endpoint, region_name="us-east-1",
                                    aws_access_key_id="testing", aws_secret_access_key="testing", presign=False)
    resolved_images = {t.id: t.data["image"] for t in client.tasks.list(project=project_id, include="id,data",
                                                                        resolve_uri=True)}
    assert len(tasks) == 15
    for task in tasks:
        row = rows[task.data["image_id"]]
        assert task.data["video"] == row["video_uri"] and task.data["frame_uri"] == row["image_uri"]
        assert (task.data["frame_index"], task.data["pts_s"]) == (row["frame_index"], row["pts_s"])
        assert task.data["image"] == f"s3://ls-frames/pushed/street.mp4/{row['frame_index']:06d}.jpg"
        resolved = resolved_images[task.id]
        assert resolved.startswith(f"/tasks/{task.id}/resolve/?fileuri=")  # Label Studio's storage proxy
        got = httpx.get(label_studio.url + resolved, headers={"Authorization": f"Token {label_studio.token}"},
                        follow_redirects=True, timeout=60)
        assert got.status_code == 200, resolved
        image = Image.open(io.BytesIO(got.content))
        assert image.size == (96, 64)
        error = np.abs(np.asarray(image.convert("RGB"), int) - picture(row["frame_index"], 30, 64, 96)).mean()
        assert error < 4  # that frame (JPEG-close), not a neighbour: the red square moves 3 px a frame
        brushes = [r for r in task.predictions[0].result if r["from_name"] == "mask"]
        assert len(brushes) == len(row["instances"]) and all(b["original_width"] == 96 for b in brushes)

    again = push_labelstudio(open_results(str(out)), label_studio.url, str(project_id), label_studio.token,
                             settings, storage=storage)
    assert again["tasks"]["skipped"] == 15 and again["frames"]["written"] == 0
    assert len(_tasks(client, project_id)) == 15

    chosen = tasks[3]
    client.annotations.create(id=chosen.id, result=chosen.predictions[0].result, lead_time=3.0)
    pulled = pull_labelstudio(str(out), label_studio.url, str(project_id), label_studio.token)
    assert pulled["rows"] == 1 and pulled["counts"]["unmatched"] == 0
    (review,) = open_reviews(str(out)).rows()
    row = rows[chosen.data["image_id"]]
    assert review["image_id"] == row["image_id"] and review["image_uri"] == row["image_uri"]
    assert len(review["instances"]) == len(row["instances"])

    # by default the frames go next to the results, named through --url-map like photos; a
    # video gone since the run makes no task (counted, named), and the next push makes them
    local = PushSettings(url_map=[(f"file://{out}/", "http://files.example/")], chunk_size=4)
    (lake / "street.mp4").rename(tmp_path / "moved.mp4")
    gone = push_labelstudio(open_results(str(out)), label_studio.url, f"{title} video local", label_studio.token, local)
    assert gone["status"] == "done" and gone["tasks"]["created"] == 0 and gone["frames"]["unreadable"] == 15
    assert gone["frames"]["first_unreadable"].startswith(f"file://{lake}/street.mp4#t=")
    (tmp_path / "moved.mp4").rename(lake / "street.mp4")
    cmd = [sys.executable, "-m", "batchseg", "push", "labelstudio", str(out), "--url", label_studio.url,
           "--project", f"{title} video local", "--url-map", f"file://{out}/=http://files.example/",
           "--receipt", str(tmp_path / "receipt.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LABEL_STUDIO_API_KEY": label_studio.token})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"batchseg: 15 video frame images written to file://{out}/labelstudio_push/frames" in done.stdout.splitlines()
    back = json.loads((tmp_path / "receipt.json").read_text())
    assert back["tasks"]["created"] == back["frames"]["written"] == 15 and back["frames"]["unreadable"] == 0
    for task in _tasks(client, back["project"]["id"]):
        name = task.data["image"].removeprefix("http://files.example/")
        assert name.startswith("labelstudio_push/frames/street.mp4/")
        assert Image.open(out / name).size == (96, 64)
    with pytest.raises(ConfigError, match="^--frames bogus://x: .*give a local folder or s3://"):
        push_labelstudio(open_results(str(out)), label_studio.url, title, label_studio.token, PushSettings(frames="bogus://x"))

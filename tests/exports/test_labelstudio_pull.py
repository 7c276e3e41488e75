"""`pull labelstudio` and acceptance against a real Label Studio server on 127.0.0.1
(tests/labelstudio_server.py): hand-made rows are pushed, the test acts as annotators through
the API (accepts, edits a mask, changes a class, deletes and adds regions, cancels a task, two
annotators on one task), pulls, and checks the reviews and every acceptance count against what
it did. Then: annotating more and pulling again adds only that; a pull cut off by the
fault-injecting proxy publishes nothing and the next one completes; push leaves annotated tasks'
predictions alone; a wrong project, a bad key and a label outside the category table are one
line each, exit 2. One server and one pushed project serve the whole module, in file order."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter.brush import decode_rle

from batchseg.cli.main import main
from batchseg.evaluation.acceptance import acceptance
from batchseg.exports.labelstudio import brush_rle, labeling_config
from batchseg.exports.labelstudio_pull import PullSettings, pull_labelstudio
from batchseg.exports.labelstudio_push import PushFailed, PushSettings, push_labelstudio
from batchseg.rows.encoding import decode_mask
from batchseg.rows.schema import ANNOTATIONS, ROW, RUNS, image_id
from batchseg.store.results import open_results
from batchseg.store.reviews import open_reviews
from tests.annotated_rows import RUN_ID, image_row, run_report, write_results
from tests.faulty_proxy import FaultyProxy
from tests.labelstudio_server import label_studio  # noqa: F401  (a fixture)

pytestmark = pytest.mark.timeout(600)
IMAGES = 9  # t0..t7 are annotated below, t8 never is
PERSON, DOG = 1, 18


def _uri(i: int) -> str:
    return f"file:///lake/images/street/img{i:03d}.jpg"


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Path:
    return write_results(tmp_path_factory.mktemp("ls_pull") / "out", count=IMAGES)


@pytest.fixture(scope="module")
def client(label_studio):
    return LabelStudio(base_url=label_studio.url, api_key=label_studio.token)


@pytest.fixture(scope="module")
def project(lake, label_studio, client) -> dict:
    """The lake pushed, then annotated: returns {"id", "tasks": [task dict per image i], "users"}."""
    title = f"batchseg pull {time.strftime('%Y%m%d-%H%M%S')}"
    receipt = push_labelstudio(open_results(str(lake)), label_studio.url, title, label_studio.token, PushSettings())
    pid = receipt["project"]["id"]
    by_image = {t.data["image_id"]: t.model_dump() for t in client.tasks.list(project=pid, fields="all", page_size=100)}
    tasks = [by_image[image_id(_uri(i))] for i in range(IMAGES)]
    second = client.users.create(email=f"second-{time.time_ns()}@example.com", username=f"second{time.time_ns()}")

    def shown(i):
        return [dict(r) for r in tasks[i]["predictions"][0]["result"]]

    def annotate(i, result, **kw):
        return client.annotations.create(id=tasks[i]["id"], result=result, lead_time=10.0 + i, **kw)

    annotate(0, shown(0))
    annotate(1, shown(1))
    edited = shown(2)  # the ring's mask loses 10 columns: IoU ~0.6, below 0.9
    for r in edited:
        if r["id"] == "i0m":
            h, w = r["original_height"], r["original_width"]
            mask = decode_rle(r["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
            cols = np.nonzero(mask.any(0))[0]
            mask[:, cols[-10:]] = False
            r["value"] = {**r["value"], "rle": brush_rle(mask)}
    annotate(2, edited)
    recast = shown(3)  # the dog becomes a person, box and mask
    for r in recast:
        if r["id"] in ("i1", "i1m"):
            r["value"] = {**r["value"], r["type"]: ["person"]}
    annotate(3, recast)
    annotate(4, [r for r in shown(4) if r["id"] not in ("i1", "i1m")])  # the dog deleted
    added = shown(5)
    h, w = added[0]["original_height"], added[0]["original_width"]
    extra = np.zeros((h, w), bool)
    extra[52:58, 20:40] = True  # a dog the model missed
    added.append({"id": "new1", "type": "brushlabels", "from_name": "mask", "to_name": "image", "original_width": w,
                  "original_height": h, "image_rotation": 0,
                  "value": {"format": "rle", "rle": brush_rle(extra), "brushlabels": ["dog"]}})
    annotate(5, added)
    annotate(6, [], was_cancelled=True)  # skipped
    annotate(7, shown(7))  # the first annotator accepts everything ...
    time.sleep(1.1)
    annotate(7, [r for r in shown(7) if r["id"] not in ("i0", "i0m")], completed_by=second.id)  # ... a later one deletes the ring
    return {"id": pid, "title": title, "tasks": tasks, "second": second.email, "shown": shown,
            "version": tasks[0]["predictions"][0]["model_version"]}


@pytest.fixture(scope="module")
def first_pull(lake, label_studio, project) -> dict:
    return pull_labelstudio(str(lake), label_studio.url, str(project["id"]), label_studio.token)


def _reviews(lake) -> dict[int, dict]:
    return {r["image_id"]: r for r in open_reviews(str(lake)).rows()}


def test_the_pull_holds_exactly_what_the_annotators_submitted(lake, project, first_pull):
    assert first_pull["rows"] == 7 and first_pull["counts"]["several_annotators"] == 1
    assert first_pull["counts"]["unmatched"] == 0 and first_pull["counts"]["ignored_regions"] == 7 * 3  # panoptic brushes
    reviews = _reviews(lake)
    assert set(reviews) == {image_id(_uri(i)) for i in (0, 1, 2, 3, 4, 5, 7)}  # t6 was cancelled, t8 never done
    rows = {r["image_id"]: r for r in open_results(str(lake)).rows()}
    for i in (0, 1, 2, 3, 4, 5, 7):
        review, task = reviews[image_id(_uri(i))], project["tasks"][i]
        assert review["source"] == "human" and review["tool"] == "labelstudio" and review["run"] == RUN_ID
        assert review["model_version"] == project["version"] and review["lead_time_s"] == 10.0 + i
        assert review["ls_project"] == project["id"] and review["ls_task"] == task["id"]
        assert review["image_uri"] == _uri(i) and (review["width"], review["height"]) == (80 + i % 4, 60 + i % 3)
    # accepted unchanged: the masks come back pixel for pixel (brush RLE -> COCO RLE), boxes from the masks
    accepted, original = reviews[image_id(_uri(0))], rows[image_id(_uri(0))]
    shown = [inst for inst in original["instances"] if inst["area"]]
    assert [i["category_id"] for i in accepted["instances"]] == [PERSON, DOG]
    for got, want in zip(accepted["instances"], shown):
        assert np.array_equal(decode_mask(got["segmentation"]), decode_mask(want["segmentation"]))
        assert got["area"] == want["area"] and got["score"] == 1.0
    person = accepted["keypoints"][0]
    assert np.allclose(np.reshape(person["keypoints"], (-1, 3))[:, :2],
                       np.reshape(original["keypoints"][0]["keypoints"], (-1, 3))[:, :2], atol=1e-6)
    assert set(np.reshape(person["keypoints"], (-1, 3))[:, 2]) == {2.0}
    assert [i["category_id"] for i in reviews[image_id(_uri(3))]["instances"]] == [PERSON, PERSON]
    assert [i["category_id"] for i in reviews[image_id(_uri(4))]["instances"]] == [PERSON]
    assert [i["category_id"] for i in reviews[image_id(_uri(5))]["instances"]] == [PERSON, DOG, DOG]
    two = reviews[image_id(_uri(7))]  # the newest of two annotators
    assert two["annotator"] == project["second"] and [i["category_id"] for i in two["instances"]] == [DOG]
    assert reviews[image_id(_uri(0))]["annotator"] == "batchseg@example.com"


def test_acceptance_counts_what_the_annotators_did(lake, first_pull, tmp_path):
    report = acceptance(open_results(str(lake)), open_reviews(str(lake)), str(tmp_path / "tasks.parquet"))
    assert report["images"] == {"reviewed": 7, "scored": 7, "unscored": 0}
    overall = report["overall"]
    assert {k: overall[k] for k in ("kept", "edited", "class_changed", "deleted", "added")} == {
        "kept": 10, "edited": 2, "class_changed": 1, "deleted": 2, "added": 1}
    assert report["per_category"] == {
        "person": {"kept": 5, "edited": 1, "class_changed": 0, "deleted": 1, "added": 0},
        "dog": {"kept": 5, "edited": 1, "class_changed": 1, "deleted": 1, "added": 1}}
    assert 0.5 < overall["mean_iou"] < 1.0
    assert {e["edits"]: e["images"] for e in report["lead_time_by_edits"]} == {0: 2, 1: 5}
    tasks = pq.read_table(tmp_path / "tasks.parquet").to_pylist()
    assert sorted(t["edits"] for t in tasks) == [0, 0, 1, 1, 1, 1, 1] and len({t["ls_task"] for t in tasks}) == 7
    # priorities are 0.1 * i: the edited images (2..7) rank above the accepted ones (0, 1)
    assert report["review_priority"]["spearman_rho"] > 0.5
    assert report["review_priority"]["top_decile_edit_rate"] > report["review_priority"]["bottom_decile_edit_rate"]
    assert 0 < report["ap"]["segm"]["AP"] < 100


def test_annotating_more_pulls_only_that_and_a_cut_pull_publishes_nothing(lake, label_studio, client, project,
                                                                         first_pull):
    tasks = project["tasks"]
    client.annotations.create(id=tasks[6]["id"], result=project["shown"](6), lead_time=5.0)
    first = client.tasks.get(id=tasks[0]["id"]).annotations[0]
    time.sleep(1.1)
    client.annotations.update(id=first["id"], result=[r for r in project["shown"](0) if r["id"] not in ("i1", "i1m")])
    before = open_reviews(str(lake)).pulls()

    pages = []

    def cut_after_first_page(method, path, n):
        if path.startswith("/api/tasks/"):
            pages.append(path)
            return "before" if len(pages) > 1 else None
        return None

    with FaultyProxy(label_studio.url, cut_after_first_page, refusal=b"Service Unavailable") as proxy:
        with pytest.raises(PushFailed, match="failed after 2 tries"):
            pull_labelstudio(str(lake), proxy.url, str(project["id"]), label_studio.token,
                             PullSettings(page_size=1, retries=1, backoff_s=0.01, rows_per_file=1))
    assert proxy.injected == 2
    assert open_reviews(str(lake)).pulls() == before  # nothing published ...
    assert len(list((lake / "reviews").glob("pull=*/part-*.parquet"))) > first_pull["parts"]  # ... though a part was written
    assert len(_reviews(lake)) == 7

    again = pull_labelstudio(str(lake), label_studio.url, str(project["id"]), label_studio.token)
    assert again["rows"] == 2 and again["since"] == first_pull["high_water"]
    reviews = _reviews(lake)
    assert len(reviews) == 8
    assert [i["category_id"] for i in reviews[image_id(_uri(0))]["instances"]] == [PERSON]  # the edit replaced it
    assert reviews[image_id(_uri(6))]["pull"] == again["pull"]
    assert pull_labelstudio(str(lake), label_studio.url, str(project["id"]), label_studio.token)["rows"] == 0


def test_push_leaves_annotated_tasks_predictions_alone(lake, label_studio, client, project, first_pull):
    newer = "20261123T000000Z-0002"  # a re-run with other weights: every image gets new predictions
    rows = [image_row(_uri(i), 60 + i % 3, 80 + i % 4, i) for i in range(IMAGES)]
    (lake / ANNOTATIONS / f"run={newer}").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW), lake / ANNOTATIONS / f"run={newer}" / "part-00000.parquet")
    report = run_report(newer, ["file:///lake/images"])
    report["provenance"]["tasks"]["instance"]["weights_sha256"] = "7a" * 32
    (lake / RUNS / f"{newer}.json").write_text(json.dumps(report))
    shutil.copy(lake / RUNS / f"{newer}.json", lake / "run.json")
    receipt = push_labelstudio(open_results(str(lake)), label_studio.url, str(project["id"]), label_studio.token,
                               PushSettings(lookup="query"))
    # t0..t7 carry a submitted annotation (t6's since the re-annotation above); t8 none
    assert receipt["tasks"] == {"created": 0, "updated": 1, "skipped": 0, "annotated": IMAGES - 1}
    after = {t.data["image_id"]: t for t in client.tasks.list(project=project["id"], fields="all", page_size=100)}
    for i in range(IMAGES):
        task = after[image_id(_uri(i))]
        assert task.data["batchseg_run"] == (newer if i == 8 else RUN_ID)
        assert len(task.predictions) == 1


def _cli(capsys, monkeypatch, key, *args):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", key)
    code = main(["pull", "labelstudio", *args])
    return code, capsys.readouterr()


def test_a_wrong_project_a_bad_key_and_an_unknown_label_are_one_line_each(lake, label_studio, client, project,
                                                                          capsys, monkeypatch, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(lake, out)
    pulls = open_reviews(str(out)).pulls()
    code, seen = _cli(capsys, monkeypatch, label_studio.token, str(out), "--url", label_studio.url,
                      "--project", "no such project")
    assert code == 2 and seen.err.strip().count("\n") == 0 and "no Label Studio project titled 'no such project'" in seen.err
    code, seen = _cli(capsys, monkeypatch, "0" * 40, str(out), "--url", label_studio.url, "--project", str(project["id"]))
    assert code == 2 and seen.err.strip().count("\n") == 0 and "refused the API key" in seen.err

    # a project of its own: a hand-imported task matched by --url-map, one that matches no image, and a giraffe
    categories = open_results(str(out)).categories
    config = labeling_config(categories).replace('<Label value="dog"/>', '<Label value="dog"/><Label value="giraffe"/>')
    other = client.projects.create(title=f"hand {time.time_ns()}", label_config=config)
    client.projects.import_tasks(id=other.id, request=[
        {"data": {"image": "http://files.example/lake/images/street/img001.jpg"}},
        {"data": {"image": "http://elsewhere.example/zebra.jpg"}}])
    hand = sorted(client.tasks.list(project=other.id, page_size=10), key=lambda t: t.id)
    box = {"type": "rectanglelabels", "from_name": "box", "to_name": "image", "original_width": 81,
           "original_height": 61, "value": {"x": 10, "y": 10, "width": 50, "height": 40, "rotation": 0,
                                             "rectanglelabels": ["person"]}}
    for task in hand:
        client.annotations.create(id=task.id, result=[{**box, "id": "b1"}])
    code, seen = _cli(capsys, monkeypatch, label_studio.token, str(out), "--url", label_studio.url,
                      "--project", str(other.id), "--url-map", "file:///=http://files.example/")
    assert code == 0, seen.err
    receipt = json.loads(next((out / "reviews" / "pulls").glob(f"*{seen.out.split()[2]}.json")).read_text())
    assert receipt["rows"] == 1 and receipt["counts"]["unmatched"] == 1
    hand_review = _reviews(out)[image_id(_uri(1))]
    assert hand_review["ls_task"] == hand[0].id
    (rasterised,) = hand_review["instances"]  # 50% x 40% of 81 x 61 from (10%, 10%): x 8.1..48.6, y 6.1..30.5
    assert rasterised["category_id"] == PERSON and np.allclose(rasterised["bbox"], [8.1, 6.1, 40.5, 24.4], atol=1)
    assert 40 * 24 <= rasterised["area"] <= 41 * 25

    client.annotations.create(id=hand[0].id, result=[{**box, "id": "b2", "value": {**box["value"], "rectanglelabels": ["giraffe"]}}])
    pulls = open_reviews(str(out)).pulls()
    code, seen = _cli(capsys, monkeypatch, label_studio.token, str(out), "--url", label_studio.url,
                      "--project", str(other.id), "--url-map", "file:///=http://files.example/")
    assert code == 2 and seen.err.strip().count("\n") == 0 and "'giraffe'" in seen.err and "category table" in seen.err
    assert open_reviews(str(out)).pulls() == pulls

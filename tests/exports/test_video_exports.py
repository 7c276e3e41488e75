"""Video exports (issue 20) of a real tracked run (PyAV-made videos, local Ray, the colour-key
oracle), read back by the readers the suite uses: YouTube-VIS by the rules of its published
loader (youtubevos/cocoapi `ytvos.py`: annToRLE, loadRes) with pycocotools, CVAT through
datumaro (what CVAT's importers run), FiftyOne by fiftyone itself, Label Studio's brush masks
by label-studio-sdk's converter."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from pycocotools import mask as mask_util

from batchseg.exports import video as exports
from batchseg.samples import SHAPE_COLORS
from batchseg.store.results import open_results
from tests.conftest import run_job
from tests.exports.test_exports import _datumaro, polygon_mask
from tests.videos import make_video, picture

ORACLE = {"backend": "tests.oracle:ColorKeyBackend", "score_threshold": 0.0}
FRAMES = 30
NAMES = {cid: name for cid, name in SHAPE_COLORS.values()}


def truth(frame_index: int) -> dict[int, np.ndarray]:
    """category id -> (H, W) bool mask of its shape in that frame."""
    rgb = picture(frame_index, FRAMES)
    out = {}
    for color, (cid, _) in SHAPE_COLORS.items():
        mask = np.all(rgb == color, axis=-1)
        if mask.any():
            out[cid] = mask
    return out


@pytest.fixture(scope="module")
def tracked(ray_cluster, tmp_path_factory):
    """A run with tracks over two videos; a segment border (1 s) falls inside every track."""
    root = tmp_path_factory.mktemp("video-exports")
    lake = root / "lake"
    lake.mkdir()
    make_video(lake / "street.mp4", frames=FRAMES)
    make_video(lake / "park.webm", frames=FRAMES)
    run_job(inputs=[str(lake)], output=str(root / "out"), models={"instance": ORACLE},
            video={"fps": 5, "segment_s": 1.0, "track": True})
    return open_results(str(root / "out"))


def _frame_index(name: str) -> int:
    return int(name.rsplit("/", 1)[-1].split(".")[0])


@pytest.mark.timeout(600)
def test_youtube_vis_follows_the_loaders_rules_and_each_shape_is_one_track(tracked, tmp_path):
    summary = exports.export_youtube_vis(tracked, str(tmp_path), frames=True)
    data = json.loads((tmp_path / "youtube_vis.json").read_text())
    assert summary["videos"] == len(data["videos"]) == 2 and summary["frames"] == 30
    assert {c["id"] for c in data["categories"]} == set(NAMES)
    videos = {v["id"]: v for v in data["videos"]}
    for video in videos.values():
        assert video["length"] == len(video["file_names"]) == 15
        assert all((tmp_path / "JPEGImages" / name).is_file() for name in video["file_names"])
    per_video: dict[int, list[int]] = {}
    for ann in data["annotations"]:
        video = videos[ann["video_id"]]
        assert len(ann["segmentations"]) == len(ann["bboxes"]) == len(ann["areas"]) == video["length"]
        per_video.setdefault(ann["video_id"], []).append(ann["category_id"])
        for name, segm in zip(video["file_names"], ann["segmentations"]):
            if segm is None:
                continue
            rle = mask_util.frPyObjects(segm, video["height"], video["width"]) if isinstance(segm["counts"], list) \
                else {"size": segm["size"], "counts": segm["counts"].encode()}  # ytvos annToRLE
            mask = mask_util.decode(rle).astype(bool)
            assert np.array_equal(mask, truth(_frame_index(name))[ann["category_id"]])
            assert mask_util.area(rle) == ann["areas"][video["file_names"].index(name)]
    for categories in per_video.values():  # four shapes, four tracks, in both videos
        assert sorted(categories) == sorted(NAMES)
    yellow = next(a for a in data["annotations"] if NAMES[a["category_id"]] == "bottle")
    assert yellow["segmentations"][:7] == [None] * 7 and None not in yellow["segmentations"][8:]


@pytest.mark.timeout(600)
def test_cvat_for_video_imports_with_datumaro_as_one_track_per_shape(tracked, tmp_path):
    summary = exports.export_cvat_video(tracked, str(tmp_path))
    assert len(summary["files"]) == 2 and set(summary["files"].values()) == {4} and summary["parts_dropped"] == 0
    for archive in summary["files"]:
        imported = _datumaro(tmp_path / archive, "cvat")
        assert sorted(imported["labels"]) == sorted(NAMES.values())
        tracks: dict[str, set] = {}
        for frame, anns in imported["items"].items():
            expected = truth(int(frame))
            for ann in anns:
                tracks.setdefault(ann["label"], set()).add(ann["track_id"])
                cid = next(c for c, n in NAMES.items() if n == ann["label"])
                assert np.array_equal(polygon_mask([ann["points"]], 48, 64), expected[cid])
        assert len(tracks) == 4 and all(len(ids) == 1 for ids in tracks.values())
        assert len({next(iter(ids)) for ids in tracks.values()}) == 4


@pytest.mark.timeout(600)
def test_cvat_coco_with_frame_images_imports_with_datumaro(tracked, tmp_path):
    summary = exports.export_cvat_coco_frames(tracked, str(tmp_path))
    assert summary["frames"] == 30
    with zipfile.ZipFile(tmp_path / "cvat_coco_frames.zip") as zf:
        images = [n for n in zf.namelist() if n.startswith("images/") and n.endswith(".jpg")]
        coco = json.loads(zf.read("annotations/instances_default.json"))
    assert len(images) == 30
    frame_of = {str(i["id"]): i["frame_index"] for i in coco["images"]}
    imported = _datumaro(tmp_path / "cvat_coco_frames.zip", "coco_instances")
    assert set(imported["items"]) == set(frame_of)
    for image, anns in imported["items"].items():
        expected = truth(frame_of[image])
        masks = [a for a in anns if a["type"] == "RleMask"]
        assert len(masks) == len(expected)
        for ann in masks:
            cid = next(c for c, n in NAMES.items() if n == ann["label"])
            assert np.array_equal(mask_util.decode({"size": [48, 64], "counts": ann["rle"].encode()}).astype(bool),
                                  expected[cid])


@pytest.mark.timeout(600)
def test_fiftyone_video_dataset_has_frames_with_track_indexes(tracked, tmp_path, tmp_path_factory):
    import os
    import uuid

    os.environ["FIFTYONE_DATABASE_DIR"] = str(tmp_path_factory.mktemp("fiftyone-db"))
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    fo = pytest.importorskip("fiftyone")
    summary = exports.export_fiftyone_video(tracked, str(tmp_path))
    assert summary["files"] == {"samples.json": 2} and summary["frames"] == 30
    dataset = fo.Dataset.from_dir(str(tmp_path), dataset_type=fo.types.FiftyOneDataset,
                                  name=f"batchseg-video-{uuid.uuid4().hex[:8]}")
    assert dataset.media_type == "video" and len(dataset) == 2
    assert dataset.count("frames") == 30 and dataset.count("frames.instances.detections") == summary["detections"]
    for sample in dataset:
        indexes: dict[str, set[int]] = {}
        for number, frame in sample.frames.items():
            expected = truth(number - 1)
            for det in frame["instances"].detections:
                indexes.setdefault(det.label, set()).add(det.index)
                cid = next(c for c, n in NAMES.items() if n == det.label)
                full = det.to_segmentation(frame_size=(64, 48)).mask.astype(bool)
                assert np.array_equal(full, expected[cid])
        assert len(indexes) == 4 and all(len(i) == 1 for i in indexes.values())
    dataset.delete()


def test_labelstudio_frames_are_image_tasks_grouped_by_video(tracked, tmp_path):
    from label_studio_sdk.converter.brush import decode_rle

    summary = exports.export_labelstudio_video(tracked, str(tmp_path))
    files = sorted(tmp_path.glob("videos/*.json"))
    assert len(files) == 2 and summary["tasks"] == 30
    for path in files:
        tasks = json.loads(path.read_text())
        assert len({t["data"]["video"] for t in tasks}) == 1  # one video a file
        times = [t["data"]["pts_s"] for t in tasks]
        assert times == sorted(times) and len(times) == 15
        for task in tasks:
            assert (tmp_path / task["data"]["image"].removeprefix("file://").split(str(tmp_path) + "/", 1)[1]).is_file()
            expected = truth(task["data"]["frame_index"])
            brushes = [r for r in task["predictions"][0]["result"] if r["from_name"] == "mask"]
            assert len(brushes) == len(expected)
            for brush in brushes:
                cid = next(c for c, n in NAMES.items() if n == brush["value"]["brushlabels"][0])
                mask = decode_rle(brush["value"]["rle"]).reshape(48, 64, 4)[:, :, 3] > 0
                assert np.array_equal(mask, expected[cid])


@pytest.mark.timeout(600)
def test_cli_export_video_writes_the_chosen_formats_and_refuses_an_unknown_one(tracked, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "batchseg", "export", "video", tracked.uri, str(tmp_path)]
    done = subprocess.run(cmd + ["--formats", "youtube-vis,cvat-video"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "youtube-vis/youtube_vis.json (8 items)" in done.stdout  # 4 tracks in each of 2 videos
    assert (tmp_path / "youtube-vis/youtube_vis.json").is_file() and len(list(tmp_path.glob("cvat-video/cvat_video/*.zip"))) == 2
    bad = subprocess.run(cmd + ["--formats", "youtube"], capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2 and "unknown format 'youtube'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

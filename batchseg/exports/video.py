"""Video results out to video-aware tools: frames grouped by video, instances as tracks.

Every format reads the newest row per frame (store.results, with stored track ids) and groups
the frames by `video_uri`, in presentation order; a video's frame rows (their RLE strings) are
held in memory while it is written, one export at a time. An instance with no track id (a run
without `video.track`) is a track of its own. Frames are numbered two ways: `frame_index` (the
video's own frame number: what a CVAT task created from the video file shows) and the sampled
frames' order (what a tool reading the written frame images sees).

- `export_youtube_vis`: DEST/youtube_vis.json, COCO video instance segmentation in the
  YouTube-VIS layout: `videos` (file_names, one per sampled frame), `annotations` one per track
  with per-frame `segmentations` (COCO RLE or null), `bboxes`, `areas`; `categories`. With
  `frames`, DEST/JPEGImages/VIDEO/NNNNNN.jpg (the decoded frames).
- `export_cvat_video`: DEST/cvat_video/VIDEO.zip per video, CVAT for video 1.1
  (annotations.xml: a <track> per track, one <polygon> a sampled frame, keyframes, `outside`
  after the track's last frame; frame = frame_index). CVAT track shapes are one polygon a
  frame: a mask in several parts keeps its largest (counted as `parts_dropped`).
- `export_cvat_coco_frames`: DEST/cvat_coco_frames.zip, CVAT's "COCO 1.0" with the frame
  images (images/VIDEO/NNNNNN.jpg) and annotations/instances_default.json (track_id attribute).
- `export_fiftyone_video`: a FiftyOne video dataset (LegacyFiftyOneDataset layout, media type
  video): one sample per video file, frames numbered frame_index + 1, `instances` Detections
  with masks and `index` = track id.
- `export_labelstudio_video`: Label Studio image tasks (its video tasks have no brush masks),
  one file per video (DEST/videos/VIDEO_ID.json) in time order, the frame images written to
  DEST/frames/ (`FrameImages`, which `batchseg push labelstudio` writes frames with too),
  `video`, `frame_uri`, `frame_index`, `pts_s` in each task's data (`frame_task`).
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import quoteattr

import fsspec
import numpy as np
from PIL import Image

from batchseg.config import ConfigError
from batchseg.errors import one_line
from batchseg.exports.coco import file_name, has_mask, input_roots
from batchseg.exports.fiftyone import _ndarray, box_and_mask
from batchseg.exports.labelstudio import TaskMaker, labeling_config
from batchseg.exports.polygons import mask_to_polygons
from batchseg.inputs.video import read_frame
from batchseg.rows.encoding import decode_mask
from batchseg.rows.schema import image_id
from batchseg.store.results import Results
from batchseg.store.storage import write_text

COLUMNS = ["image_id", "image_uri", "width", "height", "error", "review_priority", "instances", "video_uri",
           "frame_index", "pts_s"]


@dataclass
class Video:
    """One video's annotated frames, in presentation order; `tracks` renumbers them 1, 2, ..."""

    uri: str
    name: str  # relative to the run's input roots
    frames: list[dict[str, Any]] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.frames[0]["width"]

    @property
    def height(self) -> int:
        return self.frames[0]["height"]

    def frame_name(self, row: dict[str, Any]) -> str:
        return frame_name(self.name, row)

    def tracks(self) -> dict[int, list[tuple[int, dict[str, Any]]]]:
        """Track number (1, 2, ... by first appearance) -> [(position of the frame, instance)]."""
        numbers: dict[Any, int] = {}
        out: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        for position, row in enumerate(self.frames):
            for k, instance in enumerate(row["instances"] or []):
                key = instance.get("track_id") if instance.get("track_id") is not None else ("alone", position, k)
                number = numbers.setdefault(key, len(numbers) + 1)
                out.setdefault(number, []).append((position, instance))
        return out


def videos(results: Results) -> list[Video]:
    """The annotated frames of every video in `results`, grouped and in time order. Raises
    ConfigError when there are none."""
    roots = input_roots(results)
    found: dict[str, Video] = {}
    for row in results.rows(COLUMNS):
        if row["error"] is None and row.get("video_uri") and row.get("pts_s") is not None:
            uri = row["video_uri"]
            found.setdefault(uri, Video(uri, file_name(uri, roots))).frames.append(row)
    if not found:
        raise ConfigError(f"no video frames in {results.uri}; the video exports need a run over video inputs")
    for video in found.values():
        video.frames.sort(key=lambda r: r["pts_s"])
    return [found[uri] for uri in sorted(found)]


def frame_name(video_name: str, row: dict[str, Any]) -> str:
    """A frame image's name: VIDEO/NNNNNN.jpg (VIDEO: the video's name under the input roots,
    NNNNNN: frame_index)."""
    return f"{video_name}/{row['frame_index']:06d}.jpg"


def frame_jpeg(row: dict[str, Any], storage_options: dict[str, Any]) -> bytes:
    """The frame decoded again from its video (`VIDEO#t=SECONDS`), as a JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(read_frame(row["image_uri"], storage_options)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _categories(results: Results) -> list[dict[str, Any]]:
    return [{**c, "supercategory": c["name"]} for c in results.categories.get("instance", {}).get("things", [])]


def _names(results: Results) -> dict[int, str]:
    return {c["id"]: c["name"] for c in _categories(results)}


def _put(dest: str, name: str, data: bytes, opts: dict[str, Any]) -> None:
    with fsspec.open(f"{dest.rstrip('/')}/{name}", "wb", **opts) as f:
        f.write(data)


# --- YouTube-VIS ------------------------------------------------------------------------------


def export_youtube_vis(results: Results, dest: str, storage_options: dict[str, Any] | None = None,
                       input_options: dict[str, Any] | None = None, frames: bool = False) -> dict[str, Any]:
    """Write DEST/youtube_vis.json (and the frames with `frames`; `input_options` reach the
    videos). Returns {"files": {"youtube_vis.json": tracks}, "videos", "frames"}."""
    opts = storage_options or {}
    out_videos, annotations, written = [], [], 0
    for vid, video in enumerate(videos(results), start=1):
        n = len(video.frames)
        out_videos.append({"id": vid, "width": video.width, "height": video.height, "length": n,
                           "file_names": [video.frame_name(r) for r in video.frames], "video_uri": video.uri,
                           "pts_s": [r["pts_s"] for r in video.frames]})
        for number, observed in video.tracks().items():
            segmentations: list[Any] = [None] * n
            bboxes: list[Any] = [None] * n
            areas: list[Any] = [None] * n
            for position, instance in observed:
                if has_mask(instance):
                    segmentations[position] = dict(instance["segmentation"])
                    bboxes[position], areas[position] = instance["bbox"], instance["area"]
            if not any(s is not None for s in segmentations):
                continue
            annotations.append({"id": len(annotations) + 1, "video_id": vid, "category_id": observed[0][1]["category_id"],
                                "iscrowd": 0, "width": video.width, "height": video.height, "length": n,
                                "segmentations": segmentations, "bboxes": bboxes, "areas": areas,
                                "score": float(np.mean([i["score"] for _, i in observed])), "track_id": number})
        if frames:
            for row in video.frames:
                _put(dest, f"JPEGImages/{video.frame_name(row)}", frame_jpeg(row, input_options or {}), opts)
                written += 1
    body = {"info": {"description": "batchseg pre-labels"}, "licenses": [], "categories": _categories(results),
            "videos": out_videos, "annotations": annotations}
    write_text(f"{dest.rstrip('/')}/youtube_vis.json", json.dumps(body), opts)
    return {"files": {"youtube_vis.json": len(annotations)}, "videos": len(out_videos), "frames": written}


# --- CVAT --------------------------------------------------------------------------------------


def export_cvat_video(results: Results, dest: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write DEST/cvat_video/VIDEO.zip (annotations.xml) per video. Returns {"files": {archive:
    tracks}, "parts_dropped"}."""
    opts = storage_options or {}
    names = _names(results)
    written, dropped = {}, 0
    for video in videos(results):
        lines, tracks = [], 0
        for number, observed in video.tracks().items():
            shapes = []
            for position, instance in observed:
                parts = mask_to_polygons(decode_mask(instance["segmentation"]))
                if not parts:
                    continue
                dropped += len(parts) - 1
                largest = max(parts, key=lambda p: _polygon_area(np.asarray(p).reshape(-1, 2)))
                points = ";".join(f"{x:.2f},{y:.2f}" for x, y in np.asarray(largest).reshape(-1, 2))
                shapes.append(_polygon(video.frames[position]["frame_index"], points, outside=False))
            if not shapes:
                continue
            last = observed[-1][0]
            if last + 1 < len(video.frames):  # the track ends: outside from the next sampled frame on
                shapes.append(_polygon(video.frames[last + 1]["frame_index"], points, outside=True))
            label = names.get(observed[0][1]["category_id"], str(observed[0][1]["category_id"]))
            lines.append(f'  <track id="{number - 1}" label={quoteattr(label)} source="auto">\n' + "".join(shapes)
                         + "  </track>\n")
            tracks += 1
        archive = f"cvat_video/{video.name.replace('/', '__')}.zip"
        _put(dest, archive, _zip({"annotations.xml": _cvat_xml(video, names, lines).encode()}), opts)
        written[archive] = tracks
    return {"files": written, "parts_dropped": dropped}


def _polygon(frame: int, points: str, outside: bool) -> str:
    return (f'    <polygon frame="{frame}" keyframe="1" outside="{int(outside)}" occluded="0" '
            f'points="{points}" z_order="0"></polygon>\n')


def _polygon_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))) / 2


def _cvat_xml(video: Video, names: dict[int, str], tracks: list[str]) -> str:
    labels = "".join(f"      <label><name>{n}</name><attributes></attributes></label>\n" for n in names.values())
    last = max(r["frame_index"] for r in video.frames)
    return ('<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n  <version>1.1</version>\n  <meta>\n    <task>\n'
            f"      <name>{video.name}</name>\n      <size>{last + 1}</size>\n      <mode>interpolation</mode>\n"
            f"      <overlap>0</overlap>\n      <start_frame>0</start_frame>\n      <stop_frame>{last}</stop_frame>\n"
            f"      <labels>\n{labels}      </labels>\n      <original_size><width>{video.width}</width>"
            f"<height>{video.height}</height></original_size>\n    </task>\n  </meta>\n"
            + "".join(tracks) + "</annotations>\n")


def export_cvat_coco_frames(results: Results, dest: str, storage_options: dict[str, Any] | None = None,
                            input_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write DEST/cvat_coco_frames.zip: CVAT's COCO 1.0 with the frame images. Returns
    {"files": {archive: annotations}, "frames"}."""
    images, annotations, members = [], [], {}
    for video in videos(results):
        tracks = {id(i): number for number, observed in video.tracks().items() for _, i in observed}
        for row in video.frames:
            name = video.frame_name(row)
            members[f"images/{name}"] = frame_jpeg(row, input_options or {})
            images.append({"id": row["image_id"], "file_name": name, "width": row["width"], "height": row["height"],
                           "coco_url": row["image_uri"], "video_uri": video.uri, "frame_index": row["frame_index"]})
            for instance in row["instances"] or []:
                if has_mask(instance):
                    annotations.append({"id": len(annotations) + 1, "image_id": row["image_id"],
                                        "category_id": instance["category_id"], "bbox": instance["bbox"],
                                        "area": instance["area"], "iscrowd": 0, "score": instance["score"],
                                        "segmentation": dict(instance["segmentation"]),
                                        "attributes": {"track_id": tracks[id(instance)]}})
    body = {"info": {"description": "batchseg pre-labels"}, "licenses": [], "categories": _categories(results),
            "images": images, "annotations": annotations}
    members["annotations/instances_default.json"] = json.dumps(body).encode()
    _put(dest, "cvat_coco_frames.zip", _zip(members), storage_options or {})
    return {"files": {"cvat_coco_frames.zip": len(annotations)}, "frames": len(images)}


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


# --- FiftyOne ----------------------------------------------------------------------------------


def export_fiftyone_video(results: Results, dest: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write DEST/samples.json, DEST/frames/VIDEO_ID.json and DEST/metadata.json. Returns
    {"files": {"samples.json": videos}, "frames", "detections", "not_local"}."""
    opts = storage_options or {}
    names = _names(results)
    samples, frames, detections, not_local = [], 0, 0, 0
    for video in videos(results):
        numbers = {id(i): n for n, observed in video.tracks().items() for _, i in observed}
        labels = {}
        for row in video.frames:
            found = []
            for instance in row["instances"] or []:
                if not has_mask(instance):
                    continue
                box, mask = box_and_mask(instance["bbox"], instance["segmentation"], row["width"], row["height"])
                found.append({"_cls": "Detection", "label": names.get(instance["category_id"], str(instance["category_id"])),
                              "bounding_box": box, "mask": _ndarray(mask), "confidence": instance["score"],
                              "index": numbers[id(instance)]})
            detections += len(found)
            labels[str(row["frame_index"] + 1)] = {"image_id": row["image_id"], "pts_s": row["pts_s"],
                                                   "instances": {"_cls": "Detections", "detections": found}}
        frames += len(labels)
        path = video.uri.removeprefix("file://")
        not_local += not path.startswith("/")
        frames_file = f"frames/{image_id(video.uri)}.json"
        write_text(f"{dest.rstrip('/')}/{frames_file}", json.dumps({"frames": labels}), opts)
        samples.append({"filepath": path, "tags": [], "video_uri": video.uri, "frames": frames_file,
                        "metadata": {"_cls": "VideoMetadata", "frame_width": video.width, "frame_height": video.height}})
    write_text(f"{dest.rstrip('/')}/samples.json", json.dumps({"samples": samples}), opts)
    write_text(f"{dest.rstrip('/')}/metadata.json", json.dumps({"media_type": "video", "info": {}}), opts)
    return {"files": {"samples.json": len(samples)}, "frames": frames, "detections": detections, "not_local": not_local}


# --- Label Studio ------------------------------------------------------------------------------


class FrameUnreadable(RuntimeError):
    """A frame could not be decoded again from its video (gone, changed or corrupt since the run)."""


class FrameImages:
    """Frame rows' images as JPEG files under FOLDER/VIDEO/NNNNNN.jpg (`frame_name`), decoded
    again from the videos: `uri` says where a frame's image goes, `write` puts it there."""

    def __init__(self, results: Results, folder: str, storage_options: dict[str, Any] | None = None,
                 input_options: dict[str, Any] | None = None) -> None:
        self.roots = input_roots(results)
        self.fs, self.folder = fsspec.core.url_to_fs(folder.rstrip("/"), **(storage_options or {}))
        self.input_options = input_options or {}
        self.named = self.written = 0  # frames `uri` was asked for; frames written

    def uri(self, row: dict[str, Any]) -> str:
        self.named += 1
        return self.fs.unstrip_protocol(self._path(row))

    def write(self, row: dict[str, Any]) -> None:
        """Raises FrameUnreadable when the video does not give the frame; storage errors of
        the destination as they are."""
        try:
            data = frame_jpeg(row, self.input_options)
        except Exception as e:  # PyAV, the video's storage, a frame no longer there: the video is at fault
            raise FrameUnreadable(f"{row['image_uri']}: {one_line(e)}") from e
        path = self._path(row)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(data)
        self.written += 1

    def _path(self, row: dict[str, Any]) -> str:
        return f"{self.folder}/{frame_name(file_name(row['video_uri'], self.roots), row)}"


def frame_task(make: TaskMaker, row: dict[str, Any], frames: FrameImages) -> dict[str, Any] | None:
    """A video frame row's Label Studio image task (None for an error row): `image` is the
    frame's image in `frames` (through the task maker's url_map); `video`, `frame_uri`,
    `frame_index` and `pts_s` in its data group it by video and name the frame."""
    if row["error"] is not None:
        return make(row)
    task = make({**row, "image_uri": frames.uri(row)})
    task["data"].update(video=row["video_uri"], frame_uri=row["image_uri"], frame_index=row["frame_index"],
                        pts_s=row["pts_s"])
    return task


def export_labelstudio_video(results: Results, dest: str, storage_options: dict[str, Any] | None = None,
                             input_options: dict[str, Any] | None = None,
                             url_map: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Write DEST/videos/VIDEO_ID.json (a video's frame tasks, in time order), the frame images
    DEST/frames/VIDEO/NNNNNN.jpg (task `image`: their URI, through `url_map`) and
    labeling_config.xml. Returns {"files": {file: tasks}, "tasks", "regions", "skipped_empty"}."""
    opts = storage_options or {}
    make = TaskMaker(results, url_map=url_map)
    root = dest.rstrip("/")
    frames = FrameImages(results, f"{root}/frames", opts, input_options)
    written = {}
    for video in videos(results):
        tasks = []
        for row in video.frames:
            frames.write(row)
            tasks.append(frame_task(make, row, frames))
        name = f"videos/{image_id(video.uri)}.json"
        write_text(f"{root}/{name}", json.dumps(tasks), opts)
        written[name] = len(tasks)
    write_text(f"{root}/labeling_config.xml", labeling_config(results.categories), opts)
    return {"files": {**written, "labeling_config.xml": 1}, **make.stats.as_dict()}

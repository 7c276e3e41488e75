"""Video inputs (issue 20) on real parts: videos made with PyAV (H.264 MP4, VP9 WebM, H.264
MKV), decoded by PyAV, run through a local Ray cluster with the colour-key oracle, and on the
S3 API server behind the counting proxy."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchseg.config import ConfigError, VideoConfig, load_config
from batchseg.inputs import video
from batchseg.samples import SHAPE_COLORS
from tests.conftest import read_rows, run_job
from tests.videos import listing, make_video, picture, rotate_mp4

ORACLE = {"backend": "tests.oracle:ColorKeyBackend", "score_threshold": 0.0}
VFR_MS = [0, 100, 300, 400, 800, 900, 1500, 1600, 2300, 2400]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    return {
        "mp4": make_video(root / "walk.mp4"),
        "webm": make_video(root / "walk.webm"),
        "vfr": make_video(root / "vfr.mkv", frames=len(VFR_MS), times_ms=VFR_MS),
    }


def _read(path: Path, cfg: VideoConfig) -> list[tuple[int, float]]:
    uri = "file://" + str(path)
    return [(f.index, f.pts_s) for s in video.plan_segments(uri, {}, cfg) for f in video.read_segment(uri, {}, cfg, s)]


def _expected(frames: list[tuple[int, float, bool]], cfg: VideoConfig, rate: float) -> list[tuple[int, float]]:
    """What each sampling mode must pick, from PyAV's own listing."""
    end = cfg.end if cfg.end is not None else math.inf
    inside = [(i, t, key) for i, t, key in frames if cfg.start <= t + 1e-9 and t < end - 1e-9]
    if cfg.fps:
        picked, k = [], 0
        while (at := cfg.start + k / cfg.fps) < min(end, frames[-1][1] + 1 / rate) - 1e-9:
            on_screen = [f for f in inside if f[1] <= at + 1e-9]
            if on_screen and (not picked or picked[-1] != on_screen[-1][:2]):
                picked.append(on_screen[-1][:2])
            k += 1
        return picked[:cfg.max_frames] if cfg.max_frames else picked
    if cfg.every_n:
        picked = [(i, t) for i, t, _ in inside if i % cfg.every_n == 0]
        return [(i, t) for i, t in picked if not cfg.max_frames or i // cfg.every_n < cfg.max_frames]
    picked = [(i, t) for i, t, key in inside if key or not cfg.keyframes_only]
    if cfg.keyframes_only:
        return picked[:cfg.max_frames] if cfg.max_frames else picked
    return [(i, t) for i, t in picked if not cfg.max_frames or i < cfg.max_frames]


MODES = {
    "every frame": {},
    "fps 3": {"fps": 3},
    "fps 2.5 from 0.45 s to 2.1 s": {"fps": 2.5, "start": 0.45, "end": 2.1},
    "every 4th": {"every_n": 4},
    "every 3rd, at most 4": {"every_n": 3, "max_frames": 4},
    "keyframes": {"keyframes_only": True},
    "keyframes, at most 2": {"keyframes_only": True, "max_frames": 2},
    "at most 7 from 1 s": {"max_frames": 7, "start": 1.0},
}


@pytest.mark.parametrize("segment_s", [60.0, 0.7])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("clip", ["mp4", "webm", "vfr"])
def test_sampled_frames_and_times_are_exact_against_pyav_listing(clips, clip, mode, segment_s):
    cfg = VideoConfig(**MODES[mode], segment_s=segment_s)
    got = _read(clips[clip], cfg)
    want = _expected(listing(clips[clip]), cfg, rate=10)
    assert [i for i, _ in got] == [i for i, _ in want]
    assert np.allclose([t for _, t in got], [t for _, t in want], atol=1e-9)
    assert len(got) == len(set(t for _, t in got))  # a frame is taken once, however many segments


def test_a_variable_frame_rate_is_sampled_by_time_not_by_count(clips):
    times = [t for _, t in _read(clips["vfr"], VideoConfig(fps=1))]
    assert times == [0.0, 0.9, 1.6]  # the frames on screen at 0 s, 1 s and 2 s


def test_segments_cover_the_sampled_span_and_the_last_runs_to_the_end(clips):
    uri = "file://" + str(clips["mp4"])
    segments = video.plan_segments(uri, {}, VideoConfig(segment_s=1.0, start=0.5))
    assert [(s.index, s.count, s.start) for s in segments] == [(0, 3, 0.5), (1, 3, 1.5), (2, 3, 2.5)]
    assert segments[-1].end == math.inf and segments[0].end == 1.5


def test_rotation_metadata_is_applied(clips, tmp_path):
    turned = rotate_mp4(clips["mp4"], tmp_path / "phone.mp4")
    frames = list(video.read_segment("file://" + str(turned), {}, VideoConfig(), video.Segment(0, 1, 0.0)))
    assert frames[0].rgb.shape == (64, 48, 3)  # shown upright: turned a quarter clockwise
    assert np.array_equal(frames[5].rgb, np.rot90(picture(5, 30), -1))


def test_videos_are_listed_in_folders_manifests_and_as_files_in_any_case(clips, tmp_path):
    from batchseg.inputs import sources

    lake = tmp_path / "lake"
    (lake / "cams").mkdir(parents=True)
    for name in ("a.MP4", "b.mov", "c.MKV", "d.webm", "e.avi", "f.m4v", "notes.txt"):
        (lake / "cams" / name).write_bytes(b"x")
    (tmp_path / "list.csv").write_text("uri\n" + "\n".join(str(lake / "cams" / n) for n in ("a.MP4", "notes.txt")))
    listed = {r["uri"].rsplit("/", 1)[1] for page in sources.iter_input(sources.classify(str(lake), {}), {}) for r in page}
    assert listed == {"a.MP4", "b.mov", "c.MKV", "d.webm", "e.avi", "f.m4v"}
    assert sources.classify(str(lake / "cams" / "b.mov"), {}).kind == "video"
    manifest = sources.classify(str(tmp_path / "list.csv"), {})
    assert [r["uri"].rsplit("/", 1)[1] for page in sources.iter_input(manifest, {}) for r in page] == ["a.MP4"]


def test_a_frame_is_fetched_again_by_its_uri(clips):
    uri = video.frame_uri("file://" + str(clips["webm"]), 1.2)
    assert uri.endswith("walk.webm#t=1.200")
    assert np.array_equal(video.read_frame(uri, {}), picture(12, 30))
    with pytest.raises(video.VideoError, match="no frame at t=1.250"):
        video.read_frame(video.frame_uri("file://" + str(clips["webm"]), 1.25), {})


@pytest.mark.parametrize("given, message", [
    ({"fps": 2, "every_n": 3}, "fps and every_n both set; choose one sampling mode"),
    ({"start": 5, "end": 2}, "end (2) must be after start (5)"),
    ({"fps": 0}, "config error at video.fps"),
    ({"max_frame": 3}, "unknown field 'max_frame'; did you mean 'max_frames'?"),
])
def test_a_bad_video_block_fails_before_any_work(given, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [(["inputs"], ["x"]), (["output"], "o"), (["video"], given)])


def _colors_of(row) -> set[int]:
    return {i["category_id"] for i in row["instances"]}


@pytest.mark.timeout(300)
def test_frames_become_rows_exactly_once_and_a_new_sampling_adds_only_its_new_frames(ray_cluster, clips, tmp_path):
    lake = tmp_path / "lake"
    lake.mkdir()
    for name in ("mp4", "webm"):
        (lake / clips[name].name.upper()).write_bytes(clips[name].read_bytes())  # any case: .MP4
    run = dict(inputs=[str(lake)], output=str(tmp_path / "out"), models={"instance": ORACLE}, video={"fps": 5})
    first = run_job(**run)[1]
    rows = read_rows(str(tmp_path / "out/annotations"))
    assert first["images"] == {"in": 30, "annotated": 30, "failed": 0} and len(rows) == 30
    red, green, blue, yellow = (cid for cid, _ in SHAPE_COLORS.values())
    by_uri = {r["image_uri"]: r for r in rows}
    frame = by_uri["file://" + str(lake / "WALK.MP4") + "#t=2.000"]
    assert (frame["video_uri"], frame["frame_index"], frame["pts_s"]) == ("file://" + str(lake / "WALK.MP4"), 20, 2.0)
    assert (frame["width"], frame["height"]) == (64, 48) and _colors_of(frame) == {red, green, blue, yellow}
    assert _colors_of(by_uri["file://" + str(lake / "WALK.WEBM") + "#t=0.400"]) == {red, green, blue}
    assert len({r["image_id"] for r in rows}) == 30

    assert run_job(**run)[1]["images"]["in"] == 0  # done: nothing read again
    more = run_job(**{**run, "video": {"fps": 10}})[1]
    assert more["images"]["in"] == 30  # the 2 x 15 frames new under 10 fps, not the 30 done
    rows = read_rows(str(tmp_path / "out/annotations"))
    assert len(rows) == 60 and len({r["image_id"] for r in rows}) == 60
    assert run_job(**{**run, "video": {"fps": 10}})[1]["images"]["in"] == 0


@pytest.mark.timeout(300)
def test_a_truncated_video_keeps_its_frames_and_an_unsupported_codec_is_one_error_each_recorded_once(
        ray_cluster, clips, tmp_path):
    lake = tmp_path / "lake"
    lake.mkdir()
    whole = make_video(tmp_path / "long.webm", frames=40)
    (lake / "cut.webm").write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    # H.264 relabelled with a codec tag FFmpeg has no decoder for (as ProRes RAW would be)
    (lake / "raw.mov").write_bytes(clips["mp4"].read_bytes().replace(b"avc1", b"zzzz"))
    run = dict(inputs=[str(lake)], output=str(tmp_path / "out"), models={"instance": ORACLE},
               video={"segment_s": 0.7})  # several segments each: still one error row a video
    first = run_job(**run)[1]
    rows = read_rows(str(tmp_path / "out/annotations"))
    errors = {r["image_uri"].rsplit("/", 1)[1]: r for r in rows if r["error"]}
    frames = [r for r in rows if not r["error"]]
    assert set(errors) == {"cut.webm", "raw.mov"} and {r["error_kind"] for r in errors.values()} == {"content"}
    assert "truncated" in errors["cut.webm"]["error"] and "unsupported video codec" in errors["raw.mov"]["error"]
    assert errors["cut.webm"]["video_uri"] == "file://" + str(lake / "cut.webm")
    assert 5 < len(frames) < 40 and sorted(r["frame_index"] for r in frames) == list(range(len(frames)))
    assert all(r["video_uri"].endswith("cut.webm") for r in frames)
    assert first["images"] == {"in": len(rows), "annotated": len(frames), "failed": 2}
    assert run_job(**run)[1]["images"]["in"] == 0  # recorded once


@pytest.mark.timeout(300)
def test_a_video_cut_short_by_a_crash_is_read_again_for_its_missing_frames_only(ray_cluster, clips, tmp_path):
    """The crash is simulated on storage: the frames whose write tasks had not committed when
    the job died (those past 1.5 s) are taken out of the annotations and the ledger alike (a
    task commits both); the markers stay, so they must count their frames to see the gap."""
    import pyarrow.compute as pc

    run = dict(inputs=[str(clips["mp4"])], output=str(tmp_path / "out"), models={"instance": ORACLE},
               video={"segment_s": 1.0})
    assert run_job(**run)[1]["images"]["in"] == 30
    lost: set[int] = set()
    for part in (tmp_path / "out/annotations").glob("run=*/part-*.parquet"):
        table = pq.read_table(part)
        cut = pc.greater_equal(table["pts_s"], 1.5)
        lost |= set(table.filter(cut)["image_id"].to_pylist())
        pq.write_table(table.filter(pc.invert(cut)), part)
    for part in (tmp_path / "out/_ledger").glob("run=*/part-*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.filter(pc.invert(pc.is_in(table["image"], pa.array(sorted(lost), pa.int64())))), part)
    left = len(read_rows(str(tmp_path / "out/annotations")))
    assert 0 < left < 30
    again = run_job(**run)[1]
    assert again["images"]["in"] == 30 - left == len(lost) == 15  # the missing frames, no other
    rows = read_rows(str(tmp_path / "out/annotations"))
    assert len(rows) == 30 and len({r["image_uri"] for r in rows}) == 30
    assert run_job(**run)[1]["images"]["in"] == 0


@pytest.mark.timeout(300)
def test_a_noop_rerun_on_s3_reads_no_video_bytes(ray_cluster, s3_endpoint, clips):
    import boto3

    from tests.faulty_proxy import FaultyProxy

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="videos")
    s3.upload_file(str(clips["mp4"]), "videos", "cams/walk.mp4")
    s3.upload_file(str(clips["webm"]), "videos", "cams/walk.webm")
    with FaultyProxy(s3_endpoint) as proxy:
        run = dict(inputs=["s3://videos/cams/"], output="s3://videos/out", models={"instance": ORACLE},
                   s3={"endpoint_url": proxy.url}, video={"fps": 2, "segment_s": 1.0})
        first = run_job(**run)[1]
        video_gets = [p for m, p, _ in proxy.requests_seen if m == "GET" and p.split("?")[0].endswith((".mp4", ".webm"))]
        assert first["images"]["in"] == 12 and video_gets
        proxy.requests_seen.clear()
        second = run_job(**run)[1]
    assert second["images"]["in"] == 0 and second["done_before"] == 12
    assert [p for m, p, _ in proxy.requests_seen if m in ("GET", "HEAD") and p.split("?")[0].endswith((".mp4", ".webm"))] == []
    rows = read_rows("s3://videos/out/annotations", client_kwargs={"endpoint_url": s3_endpoint})
    assert sorted({r["video_uri"] for r in rows}) == ["s3://videos/cams/walk.mp4", "s3://videos/cams/walk.webm"]


def _tracks_by_color(output: Path) -> dict[int, set[int]]:
    from batchseg.store.results import open_results

    found: dict[int, set[int]] = {}
    for row in open_results(str(output)).rows():
        for instance in row["instances"] or []:
            found.setdefault(instance["category_id"], set()).add(instance["track_id"])
    return found


@pytest.mark.timeout(400)
def test_each_shape_keeps_one_track_id_across_frames_and_segment_borders(ray_cluster, clips, tmp_path):
    run = dict(inputs=[str(clips["mp4"])], output=str(tmp_path / "out"), models={"instance": ORACLE},
               video={"fps": 4, "segment_s": 0.9, "track": True})
    untracked = run_job(**{**run, "video": {**run["video"], "track": False}})[1]
    assert "tracks" not in untracked and _tracks_by_color(tmp_path / "out") and all(
        ids == {None} for ids in _tracks_by_color(tmp_path / "out").values())
    # turning tracking on for the done video tracks it, annotating nothing again
    summary = run_job(**run)[1]
    assert summary["images"]["in"] == 0 and summary["done_before"] == 12
    assert summary["tracks"]["runs"] == 1 and summary["tracks"]["videos"] == 1 and summary["tracks"]["frames"] == 12
    red, green, blue, yellow = (cid for cid, _ in SHAPE_COLORS.values())
    tracks = _tracks_by_color(tmp_path / "out")
    assert set(tracks) == {red, green, blue, yellow} and all(len(ids) == 1 for ids in tracks.values())
    assert len({next(iter(ids)) for ids in tracks.values()}) == 4  # four shapes, four tracks
    # a denser sampling adds frames; the video is tracked again over all of them, with stored ids;
    # the runs tracked before are not looked at again
    denser = run_job(**{**run, "video": {**run["video"], "fps": 8}})[1]["tracks"]
    assert denser["runs"] == 1 and denser["frames"] == 24
    again = _tracks_by_color(tmp_path / "out")
    assert all(len(ids) == 1 and None not in ids for ids in again.values())


def _box_instance(category_id: int, x: int, y: int, size: int = 8) -> dict:
    from batchseg.rows.encoding import encode_mask

    mask = np.zeros((48, 64), bool)
    mask[y:y + size, x:x + size] = True
    return {"category_id": category_id, "segmentation": encode_mask(mask)}


def test_tracks_link_by_mask_iou_within_a_category_and_stitch_across_segments():
    from batchseg.rows import tracks

    # two cars crossing paths (same category), a dog standing still, a person appearing late
    frames = [[_box_instance(3, 2 + 3 * k, 10), _box_instance(3, 50 - 3 * k, 30), _box_instance(18, 30, 2)]
              + ([_box_instance(1, 5, 38)] if k >= 4 else []) for k in range(8)]
    whole = tracks.track_video([frames], 0.3)[0]
    cut = tracks.track_video([frames[:3], frames[3:6], frames[6:]], 0.3)  # borders inside every track
    assert [ids for seg in cut for ids in seg] == whole
    assert [ids[:3] for ids in whole] == [[1, 2, 3]] * 8 and all(ids[3] == 4 for ids in whole[4:])
    # a jump too far for IoU >= 0.3 starts a new track; another category never continues one
    assert tracks.match([_box_instance(3, 0, 0)], [_box_instance(3, 6, 0)], 0.3) == []
    assert tracks.match([_box_instance(3, 0, 0)], [_box_instance(1, 0, 0)], 0.3) == []
    assert tracks.match([_box_instance(3, 0, 0)], [_box_instance(3, 1, 0)], 0.3) == [(0, 0)]

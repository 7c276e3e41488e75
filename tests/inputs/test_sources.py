"""Inputs: classification, streaming fanned-out listing, manifests and S3 Inventory, on local
trees and the moto S3 server (counted, throttled or not, through tests.faulty_proxy)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import tarfile
import threading
import time
from pathlib import Path
from urllib.parse import quote_plus

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchseg.inputs import manifests, sources
from batchseg.inputs.sources import (
    InputError,
    classify,
    distinct_roots,
    is_image_name,
    iter_listing,
    iter_shard,
)
from tests.faulty_proxy import FaultyProxy, every


def flat(pages) -> list[dict]:
    return [row for page in pages for row in page]


def by_uri(rows) -> list[dict]:
    return sorted(rows, key=lambda r: r["uri"])


def uris(rows) -> set[str]:
    return {r["uri"] for r in rows}


def found_by_fsspec(root: str, storage_options: dict) -> list[dict]:
    """The rows the listing gave before it streamed (fs.find, sorted): what earlier runs'
    done keys were made of, so the new listing must give the same."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(root, **storage_options)
    entries = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    return [{"uri": fs.unstrip_protocol(name), "size": info["size"],
             "version": str(info.get("ETag") or info.get("mtime")).strip('"'), "is_shard": name.endswith(".tar")}
            for name, info in sorted(entries.items())
            if info["type"] == "file" and (is_image_name(name) or name.lower().endswith(".tar"))]


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    """Storage options for the S3 API server (credentials come from the environment)."""
    return {"client_kwargs": {"endpoint_url": s3_endpoint}}


def make_bucket(s3: dict, bucket: str, objects: dict[str, bytes]) -> fsspec.AbstractFileSystem:
    fs = fsspec.filesystem("s3", **s3, skip_instance_cache=True)
    if not fs.exists(bucket):
        fs.mkdir(bucket)
        fs.pipe({f"{bucket}/{key}": data for key, data in objects.items()})
    return fs


# ---------------------------------------------------------------------------------------------
# local folders


def test_local_listing_gives_the_rows_the_old_listing_gave(samples):
    """Same URIs, sizes and versions (mtime text) as before, so earlier runs' done keys match."""
    pages = list(iter_listing(str(samples.root), {}))
    rows = flat(pages)
    assert by_uri(rows) == found_by_fsspec(str(samples.root), {})
    names = {r["uri"].split("/images/", 1)[1] for r in rows}
    assert "notes.txt" not in names
    assert {"street/scene_b.PNG", "odd/photo.JPEG", "park/nested/scene_e.webp"} <= names
    assert [r["is_shard"] for r in rows if r["uri"].endswith(".tar")] == [True]
    assert all(r["uri"].startswith("file:///") and r["size"] >= 0 and r["version"] for r in rows)


def make_tree(root: Path, folders: int = 30, depth: int = 3) -> set[str]:
    """A tree of `folders` top folders, each `depth` deep, with images, shards and other files."""
    expected = set()
    for i in range(folders):
        folder = root / f"f{i:02d}"
        for level in range(depth):
            folder.mkdir(parents=True, exist_ok=True)
            for j, ext in enumerate((".jpg", ".PNG", ".tar", ".txt", ".json")[: 2 + (i + level) % 4]):
                path = folder / f"x{j}{ext}"
                path.write_bytes(b"z" * j)
                if ext != ".txt" and ext != ".json":
                    expected.add(f"file://{path}")
            folder = folder / f"l{level}"
    return expected


@pytest.mark.parametrize("concurrency", [1, 4])
def test_local_tree_is_listed_once_per_file_in_bounded_pages(tmp_path, concurrency):
    expected = make_tree(tmp_path)
    pages = list(iter_listing(str(tmp_path), {}, concurrency=concurrency, page_rows=7))
    rows = flat(pages)
    assert len(rows) == len(expected) and uris(rows) == expected
    assert all(0 < len(page) <= 7 for page in pages)
    assert all(r["size"] == os.stat(r["uri"][7:]).st_size for r in rows)


def test_a_folder_of_many_files_streams_in_pages(tmp_path):
    for i in range(2500):
        (tmp_path / f"{i}.jpg").touch()
    pages = list(iter_listing(str(tmp_path), {}))
    assert sum(map(len, pages)) == 2500 and max(map(len, pages)) <= 1000 and len(pages) >= 3


def test_symlinked_files_are_listed_and_symlinked_folders_not_entered(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real/a.jpg").write_bytes(b"abc")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "real/a.jpg")
    (tmp_path / "real/loop").symlink_to(tmp_path)  # would never end if entered
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    rows = flat(iter_listing(str(tmp_path), {}))
    assert uris(rows) == {f"file://{tmp_path}/real/a.jpg", f"file://{tmp_path}/link.jpg"}
    assert {r["size"] for r in rows} == {3}


def test_closing_the_listing_early_stops_its_threads(tmp_path):
    make_tree(tmp_path)
    listing = iter_listing(str(tmp_path), {}, concurrency=4, page_rows=2, queue_pages=1)
    assert len(next(listing)) <= 2
    listing.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("listing-")]


def test_a_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        flat(iter_listing(str(tmp_path / "absent"), {}))


def test_other_filesystems_are_listed_folder_by_folder():
    fs = fsspec.filesystem("memory")
    fs.pipe({"/lake/a.jpg": b"1", "/lake/b/c.png": b"22", "/lake/b/d/e.tar": b"333", "/lake/b/skip.txt": b""})
    rows = flat(iter_listing("memory://lake", {}, concurrency=2))
    assert {(r["uri"], r["size"], r["is_shard"]) for r in rows} == {
        ("memory:///lake/a.jpg", 1, False), ("memory:///lake/b/c.png", 2, False), ("memory:///lake/b/d/e.tar", 3, True),
    }
    assert all(r["version"] for r in rows)
    fs.rm("/lake", recursive=True)


# ---------------------------------------------------------------------------------------------
# S3


NESTED = {
    **{f"lake/s{i:03d}/img{j}.jpg": b"x" * j for i in range(150) for j in range(i % 4)},
    # siblings that sort around each other: "-" and "." come before "/"
    "lake/abc-1/x.jpg": b"1", "lake/abc.jpg": b"2", "lake/abc/y.JPG": b"3", "lake/abc0.png": b"4",
    "lake/abd/z.tar": b"5", "lake/abc.\U0010ffff/q.jpg": b"6",
    "lake/deep/a/b/c/d.png": b"7", "lake/deep/a/b/e.txt": b"8", "lake/s050.jpg": b"9", "lake/s0505/k.jpg": b"10",
    "lake/dir/": b"", "lake/ü ber/ß +%.jpg": b"11", "elsewhere/no.jpg": b"",
}


@pytest.mark.parametrize("concurrency", [1, 2, 16])
def test_s3_nested_prefixes_are_fanned_out_and_listed_once(s3, concurrency):
    make_bucket(s3, "ls-nested", NESTED)
    rows = flat(iter_listing("s3://ls-nested/lake/", s3, concurrency=concurrency))
    expected = {f"s3://ls-nested/{k}" for k in NESTED
                if k.startswith("lake/") and (is_image_name(k) or k.endswith(".tar"))}
    assert len(rows) == len(expected) and uris(rows) == expected
    assert by_uri(rows) == found_by_fsspec("s3://ls-nested/lake", s3)  # ETags and sizes as before


def test_s3_folders_of_one_object_cost_few_requests(s3, s3_endpoint):
    make_bucket(s3, "ls-sparse", {f"s/{i:04d}/a.jpg": b"" for i in range(1200)})
    with FaultyProxy(s3_endpoint) as proxy:
        rows = flat(iter_listing("s3://ls-sparse/s", {"client_kwargs": {"endpoint_url": proxy.url}}))
    assert len(rows) == 1200
    assert len(proxy.requests_seen) < 200  # not one a folder: runs of small prefixes share a listing


def test_s3_flat_prefix_of_several_pages(s3):
    make_bucket(s3, "ls-flat", {f"p/{i:05d}.png": b"" for i in range(2100)} | {"p/readme.md": b""})
    pages = list(iter_listing("s3://ls-flat/p", s3))
    assert sum(map(len, pages)) == 2100 and max(map(len, pages)) <= 1000
    assert by_uri(flat(pages)) == found_by_fsspec("s3://ls-flat/p", s3)


def test_s3_listing_yields_its_first_page_before_it_has_listed_the_rest(s3, s3_endpoint):
    make_bucket(s3, "ls-flat", {f"p/{i:05d}.png": b"" for i in range(2100)} | {"p/readme.md": b""})
    with FaultyProxy(s3_endpoint) as proxy:
        opts = {"client_kwargs": {"endpoint_url": proxy.url}}
        listing = iter_listing("s3://ls-flat/p/", opts, concurrency=1, page_rows=100, queue_pages=1)
        first = next(listing)
        time.sleep(0.5)  # room for the listing to run ahead as far as the queue lets it
        assert len(first) == 100 and len(proxy.requests_seen) == 1  # of the 3 list pages needed
        assert len(first) + sum(map(len, listing)) == 2100 and len(proxy.requests_seen) == 3


def test_s3_throttled_listing_requests_are_retried(s3, s3_endpoint):
    make_bucket(s3, "ls-nested", NESTED)
    with FaultyProxy(s3_endpoint, every(3, budget=10)) as proxy:
        rows = flat(iter_listing("s3://ls-nested/lake", {"client_kwargs": {"endpoint_url": proxy.url}}, concurrency=4))
    assert proxy.injected > 0
    assert by_uri(rows) == found_by_fsspec("s3://ls-nested/lake", s3)


def test_s3_missing_bucket_raises(s3):
    with pytest.raises(FileNotFoundError):
        flat(iter_listing("s3://no-such-bucket-here/x/", s3))


# ---------------------------------------------------------------------------------------------
# a folder input split into listing units


def listed_units(units, storage_options) -> list[dict]:
    return [row for unit in units for page in sources.iter_input(unit, storage_options) for row in page]


def deep_tree(root):
    """Files at every level, folders of a few files, one with many, an empty one, a symlinked folder."""
    files = ["a.jpg", "notes.txt", "b/c.png", "b/d/e.tar", "b/d/f/g.jpg", "h/i.jpg", "h/j/k.webp"]
    files += [f"big/{i:04d}.jpg" for i in range(30)] + [f"m{i:02d}/n/o.jpg" for i in range(40)]
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (root / "empty").mkdir()
    (root / "linked").symlink_to(root / "h")  # not entered, whole or split
    return files


@pytest.mark.parametrize("units", [1, 3, 32])
def test_a_split_folder_lists_every_file_once(tmp_path, monkeypatch, units):
    monkeypatch.setattr(sources, "SPLIT_UNITS", units)
    deep_tree(tmp_path)
    folder = classify(str(tmp_path), {})
    split = sources.split_folder(folder, {})
    assert 1 <= len(split) <= units and all(u.uri == folder.uri for u in split)
    assert len(split) == min(units, 42) or units == 1  # 42 sub-folders once the root is opened
    assert by_uri(listed_units(split, {})) == found_by_fsspec(str(tmp_path), {})


def test_a_folder_is_opened_a_level_at_a_time_and_big_folders_stay_closed(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SPLIT_ENTRIES", 25)
    monkeypatch.setattr(sources, "SPLIT_REQUESTS", 8)
    names = [f"x/{i:02d}/img.jpg" for i in range(20)] + [f"y/{i:02d}.jpg" for i in range(30)] + ["top.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    split = sources.split_folder(classify(str(tmp_path), {}), {})
    # root and x, y opened (3 requests); x's 20 folders would take 20 more: they are the units,
    # with y (30 entries, too many to open) listed whole by the last
    starts = [[os.path.relpath(unit, tmp_path) for unit in u.start] for u in split]
    assert sorted(starts[:-1]) == [[f"x/{i:02d}"] for i in range(20)] and starts[-1] == ["y"]
    assert [r["uri"] for r in split[0].rows] == [f"file://{tmp_path}/top.png"]
    assert by_uri(listed_units(split, {})) == found_by_fsspec(str(tmp_path), {})


def test_a_folder_with_too_many_entries_to_open_stays_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SPLIT_ENTRIES", 20)
    deep_tree(tmp_path)
    folder = classify(str(tmp_path), {})
    assert sources.split_folder(folder, {}) == [folder]  # 45 entries at its top
    split = sources.split_folder(classify(str(tmp_path / "b"), {}), {})
    assert by_uri(listed_units(split, {})) == found_by_fsspec(str(tmp_path / "b"), {})


def test_a_split_s3_prefix_lists_every_object_once_for_a_few_requests(s3, s3_endpoint):
    make_bucket(s3, "ls-nested", NESTED)
    with FaultyProxy(s3_endpoint) as proxy:
        opts = {"client_kwargs": {"endpoint_url": proxy.url}}
        split = sources.split_folder(classify("s3://ls-nested/lake/", opts), opts)
        opened = len(proxy.requests_seen) - 2  # classify: a HEAD and a LIST
    assert len(split) == sources.SPLIT_UNITS and 1 <= opened <= sources.SPLIT_REQUESTS
    assert by_uri(listed_units(split, s3)) == found_by_fsspec("s3://ls-nested/lake", s3)


def test_a_split_s3_prefix_of_more_than_a_page_stays_whole(s3):
    make_bucket(s3, "ls-flat", {f"p/{i:05d}.png": b"" for i in range(2100)} | {"p/readme.md": b""})
    folder = classify("s3://ls-flat/p", s3)
    assert sources.split_folder(folder, s3) == [folder]


def test_a_folder_on_another_filesystem_is_not_split():
    """Its `ls` returns a whole folder, however flat: opening it on the driver could list millions."""
    fs = fsspec.filesystem("memory")
    fs.pipe({"/split/a.jpg": b"1", "/split/b/c.png": b"22"})
    folder = classify("memory://split", {})
    assert sources.split_folder(folder, {}) == [folder]
    fs.rm("/split", recursive=True)


# ---------------------------------------------------------------------------------------------
# what an input is


def test_classify_local(samples, tmp_path):
    root = samples.root
    assert classify(str(root), {}) == sources.Input("prefix", f"file://{root}")
    image = classify(str(root / "street/scene_a.png"), {})
    assert image.kind == "image" and image.rows == (found_by_fsspec(str(root / "street/scene_a.png"), {})[0],)
    assert classify(str(root / "shards/shard-000000.tar"), {}).rows[0]["is_shard"]
    for name, kind in (("list.csv.gz", "manifest"), ("l.parquet", "manifest"), ("l.jsonl", "manifest"),
                       ("manifest.json", "inventory")):
        (tmp_path / name).write_bytes(b"")
        assert classify(str(tmp_path / name), {}).kind == kind
    (tmp_path / "notes.txt").write_text("hi")
    for path, message in ((tmp_path / "notes.txt", "input is neither a folder"),
                          (tmp_path / "absent", "input not found")):
        with pytest.raises(InputError, match=message) as e:
            classify(str(path), {})
        assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_classify_s3(s3):
    make_bucket(s3, "ls-nested", NESTED)
    assert classify("s3://ls-nested/lake", s3) == sources.Input("prefix", "s3://ls-nested/lake")
    assert classify("s3://ls-nested/lake/s001/", s3).kind == "prefix"
    shard = classify("s3://ls-nested/lake/abd/z.tar", s3)
    assert shard.kind == "shard" and shard.rows[0] == {"uri": "s3://ls-nested/lake/abd/z.tar", "size": 1,
                                                   "version": shard.rows[0]["version"], "is_shard": True}
    assert len(shard.rows[0]["version"]) == 32  # the ETag, as the listing gives it
    for uri in ("s3://ls-nested/nothing-here/", "s3://no-such-bucket-here/"):
        with pytest.raises(InputError, match=f"input not found: {uri}"):
            classify(uri, s3)


def test_distinct_roots_drop_roots_inside_others(tmp_path):
    assert distinct_roots(["s3://lake/2024/", "s3://lake/", "s3://lake-b/x", "s3://lake/2024/a.jpg",
                           "s3://lake/"]) == ["s3://lake", "s3://lake-b/x"]
    assert distinct_roots([str(tmp_path / "a"), f"file://{tmp_path}/a/b/", str(tmp_path / "ab")]) == [
        f"file://{tmp_path}/a", f"file://{tmp_path}/ab"]


# ---------------------------------------------------------------------------------------------
# manifests


def write_csv(path: Path, header: list[str], rows: list[list], gz: bool = False) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    data = text.getvalue().encode()
    path.write_bytes(gzip.compress(data) if gz else data)


def read_all(uri: str, storage_options: dict, **kwargs) -> list[dict]:
    parts = manifests.manifest_parts(uri, storage_options, **kwargs)
    return flat(page for part in parts for page in manifests.read_manifest_part(part, storage_options))


def test_csv_manifest_with_size_and_etag(tmp_path):
    write_csv(tmp_path / "m.csv", ["URI", "Size", "ETag", "label"], [
        ["s3://lake/a.jpg", 10, '"e1"', "cat"],
        ["images/b.PNG", "", "e2", "dog"],          # relative to the manifest's folder
        ["/data/c.tar", 30, "", ""],                # absolute: a local file
        ["s3://lake/notes.txt", 1, "e4", ""],       # not an image
    ])
    assert by_uri(read_all(str(tmp_path / "m.csv"), {})) == [
        {"uri": "file:///data/c.tar", "size": 30, "version": "", "is_shard": True},
        {"uri": f"file://{tmp_path}/images/b.PNG", "size": -1, "version": "e2", "is_shard": False},
        {"uri": "s3://lake/a.jpg", "size": 10, "version": "e1", "is_shard": False},
    ]


def test_csv_gz_manifest_of_paths_only(tmp_path):
    write_csv(tmp_path / "m.csv.gz", ["path"], [[f"sub/{i}.jpg"] for i in range(2500)], gz=True)
    parts = manifests.manifest_parts(str(tmp_path / "m.csv.gz"), {})
    pages = list(manifests.read_manifest_part(parts[0], {}))
    assert len(parts) == 1 and max(map(len, pages)) <= 1000
    rows = flat(pages)
    assert len(rows) == 2500 and rows[0] == {"uri": f"file://{tmp_path}/sub/0.jpg", "size": -1, "version": "",
                                             "is_shard": False}


@pytest.mark.parametrize("gz", [False, True])
def test_json_lines_manifests(tmp_path, gz):
    lines = [{"url": "s3://lake/a.jpg", "size": 5, "version": "v1"}, {"url": "s3://lake/b.webp"},
             {"url": "s3://lake/c.gif", "version": "v3"}]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    path = tmp_path / ("m.jsonl.gz" if gz else "m.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    assert by_uri(read_all(str(path), {})) == [
        {"uri": "s3://lake/a.jpg", "size": 5, "version": "v1", "is_shard": False},
        {"uri": "s3://lake/b.webp", "size": -1, "version": "", "is_shard": False},
    ]


def test_parquet_manifest_splits_by_row_groups(tmp_path):
    n = 5000
    table = pa.table({
        "bucket": ["lake"] * n,
        "key": [f"k/{i}.{'jpg' if i % 5 else 'txt'}" for i in range(n)],
        "size": pa.array(range(n), pa.int32()),
        "last_modified": pa.array([i * 1000 for i in range(n)], pa.timestamp("ms", tz="UTC")),
        "is_latest": [i % 7 != 0 for i in range(n)],
    })
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=1000)
    parts = manifests.manifest_parts(str(tmp_path / "m.parquet"), {}, rows_per_part=2000)
    assert [p.pieces for p in parts] == [(0, 1), (2, 3), (4,)]
    rows = flat(page for part in parts for page in manifests.read_manifest_part(part, {}))
    expected = [i for i in range(n) if i % 5 and i % 7]
    assert sorted(r["size"] for r in rows) == expected
    assert rows[0]["uri"] == "s3://lake/k/1.jpg" and rows[0]["version"].startswith("1970-01-01 00:00:01")


def test_parquet_manifest_of_uris_without_optional_columns(tmp_path):
    pq.write_table(pa.table({"uri": ["s3://lake/a.jpg", "s3://lake/b.tif", None]}), tmp_path / "m.parquet")
    assert read_all(str(tmp_path / "m.parquet"), {}) == [
        {"uri": "s3://lake/a.jpg", "size": -1, "version": "", "is_shard": False},
        {"uri": "s3://lake/b.tif", "size": -1, "version": "", "is_shard": False},
    ]


def test_manifest_on_s3_resolves_relative_paths_in_its_bucket(s3):
    text = "path,etag\nimages/a.jpg,e1\n../other/b.png,e2\n"
    make_bucket(s3, "ls-manifests", {"runs/m.csv": text.encode()})
    assert by_uri(read_all("s3://ls-manifests/runs/m.csv", s3)) == [
        {"uri": "s3://ls-manifests/other/b.png", "size": -1, "version": "e2", "is_shard": False},
        {"uri": "s3://ls-manifests/runs/images/a.jpg", "size": -1, "version": "e1", "is_shard": False},
    ]


BAD = {
    "cols.csv": (b"name,label\na.jpg,x\n", "expected one of uri, url, path, or bucket and key (found: name, label)"),
    "key-only.csv": (b"key,size\na.jpg,1\n", "expected one of uri, url, path, or bucket and key"),
    "empty.csv": (b"", "empty"),
    "list.jsonl": (b'["a.jpg"]\n', "the first line is not a JSON object"),
    "broken.jsonl": (b'{"uri": \n', "cannot read it"),
    "broken.parquet": (b"PAR1 not really", "cannot read it"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_manifests_fail_at_planning_with_one_line(tmp_path, name):
    data, message = BAD[name]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        manifests.manifest_parts(str(tmp_path / name), {})
    assert "\n" not in str(e.value) and name in str(e.value)


def test_manifest_errors_while_reading_are_one_line(tmp_path):
    write_csv(tmp_path / "m.csv", ["uri", "size"], [["a.jpg", "twelve"]])
    (part,) = manifests.manifest_parts(str(tmp_path / "m.csv"), {})
    with pytest.raises(InputError, match="m.csv: cannot read it") as e:
        flat(manifests.read_manifest_part(part, {}))
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="manifest not found"):
        manifests.manifest_parts(str(tmp_path / "absent.csv"), {})


# ---------------------------------------------------------------------------------------------
# S3 Inventory


SOURCE = {
    "img/a b.jpg": b"1", "img/ü/ß.PNG": b"22", "img/plus+sign.jpg": b"333", "img/100%.jpeg": b"4444",
    "img/shard.tar": b"55555", "img/readme.txt": b"6", **{f"img/many/{i}.jpg": b"7" for i in range(30)},
}
CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"


def inventory_records(s3: dict) -> list[dict]:
    """What an inventory of the `ls-inv-src` bucket with all versions holds: every object (from a
    real listing, so ETags match), plus an old version and a delete marker S3 would list."""
    fs = make_bucket(s3, "ls-inv-src", SOURCE)
    out = [{"bucket": "ls-inv-src", "key": info["Key"].split("/", 1)[1], "version_id": "v2", "is_latest": True,
            "is_delete_marker": False, "size": info["size"], "last_modified_date": info["LastModified"],
            "e_tag": info["ETag"].strip('"'), "storage_class": "STANDARD"}
           for info in fs.find("ls-inv-src", detail=True).values()]
    old = dict(out[0], key="img/old.jpg", version_id="v1", is_latest=False)
    gone = dict(out[0], key="img/gone.jpg", version_id="v3", is_delete_marker=True, size=None, e_tag=None)
    return sorted(out, key=lambda r: r["key"]) + [old, gone]


def csv_gz(records: list[dict], slash_safe: bool) -> bytes:
    """A CSV inventory file as S3 writes it: no header, every field quoted, keys URL-encoded."""
    text = io.StringIO()
    writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for r in records:
        when = r["last_modified_date"].strftime("%Y-%m-%dT%H:%M:%S.000Z")
        size = "" if r["size"] is None else r["size"]
        writer.writerow([r["bucket"], quote_plus(r["key"], safe="/" if slash_safe else ""), r["version_id"],
                         str(r["is_latest"]).lower(), str(r["is_delete_marker"]).lower(), size, when,
                         r["e_tag"] or "", r["storage_class"]])
    return gzip.compress(text.getvalue().encode())


def columnar(records: list[dict], fmt: str) -> bytes:
    table = pa.Table.from_pylist(records).cast(pa.schema([
        ("bucket", pa.string()), ("key", pa.string()), ("version_id", pa.string()), ("is_latest", pa.bool_()),
        ("is_delete_marker", pa.bool_()), ("size", pa.int64()), ("last_modified_date", pa.timestamp("ms", "UTC")),
        ("e_tag", pa.string()), ("storage_class", pa.string()),
    ]))
    sink = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, sink)
    else:
        from pyarrow import orc

        orc.write_table(table, sink)
    return sink.getvalue()


PARQUET_SCHEMA = ("message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); "
                  "optional binary version_id (UTF8); optional boolean is_latest; optional boolean is_delete_marker; "
                  "optional int64 size; optional int64 last_modified_date (TIMESTAMP_MILLIS); "
                  "optional binary e_tag (UTF8); optional binary storage_class (UTF8); }")
ORC_SCHEMA = ("struct<bucket:string,key:string,version_id:string,is_latest:boolean,is_delete_marker:boolean,"
              "size:bigint,last_modified_date:timestamp,e_tag:string,storage_class:string>")


def publish_inventory(s3: dict, fmt: str) -> str:
    """Write an inventory of `ls-inv-src` into `ls-inv-dest` the way S3 lays it out; returns its manifest."""
    records = inventory_records(s3)
    half = len(records) // 2
    prefix = f"reports/ls-inv-src/daily-{fmt}"
    if fmt == "csv":
        files = {f"{prefix}/data/one.csv.gz": csv_gz(records[:half], slash_safe=False),
                 f"{prefix}/data/two.csv.gz": csv_gz(records[half:], slash_safe=True)}
        schema = CSV_SCHEMA
    else:
        files = {f"{prefix}/data/one.{fmt}": columnar(records[:half], fmt),
                 f"{prefix}/data/two.{fmt}": columnar(records[half:], fmt)}
        schema = PARQUET_SCHEMA if fmt == "parquet" else ORC_SCHEMA
    manifest = {
        "sourceBucket": "ls-inv-src", "destinationBucket": "arn:aws:s3:::ls-inv-dest", "version": "2016-11-30",
        "creationTimestamp": "1514944800000", "fileFormat": {"csv": "CSV", "parquet": "Parquet", "orc": "ORC"}[fmt],
        "fileSchema": schema,
        "files": [{"key": key, "size": len(data), "MD5checksum": "0" * 32} for key, data in files.items()],
    }
    key = f"{prefix}/2026-11-21T01-00Z/manifest.json"
    fs = make_bucket(s3, "ls-inv-dest", {})
    fs.pipe({f"ls-inv-dest/{k}": v for k, v in files.items()} | {f"ls-inv-dest/{key}": json.dumps(manifest).encode()})
    return f"s3://ls-inv-dest/{key}"


@pytest.mark.parametrize("fmt", ["csv", "parquet", "orc"])
def test_s3_inventory_gives_the_rows_a_listing_gives(s3, fmt, tmp_path):
    manifest = publish_inventory(s3, fmt)
    assert classify(manifest, s3).kind == "inventory"
    parts = manifests.manifest_parts(manifest, s3)
    assert [p.uri.rsplit("/", 1)[1] for p in parts] == [f"one.{fmt}{'.gz' * (fmt == 'csv')}",
                                                        f"two.{fmt}{'.gz' * (fmt == 'csv')}"]
    listed = by_uri(flat(iter_listing("s3://ls-inv-src/", s3)))
    assert by_uri(read_all(manifest, s3)) == listed  # keys decoded; old versions, delete markers skipped
    assert "s3://ls-inv-src/img/a b.jpg" in uris(listed) and "s3://ls-inv-src/img/plus+sign.jpg" in uris(listed)

    # a copy on local disk finds its data files beside the manifest
    fsspec.filesystem("s3", **s3).get("ls-inv-dest/reports/", str(tmp_path) + "/", recursive=True)
    local = tmp_path / f"ls-inv-src/daily-{fmt}/2026-11-21T01-00Z/manifest.json"
    assert by_uri(read_all(str(local), {})) == listed


@pytest.mark.parametrize("doc, message", [
    ("not json", "not a manifest.json with fileFormat, fileSchema and files"),
    (json.dumps({"fileFormat": "CSV", "files": []}), "not a manifest.json with fileFormat, fileSchema and files"),
    (json.dumps({"fileFormat": "XLS", "fileSchema": "Bucket, Key", "files": []}), "fileFormat 'XLS' is not CSV"),
    (json.dumps({"fileFormat": "CSV", "fileSchema": "Bucket, Size", "files": []}), "expected bucket and key"),
])
def test_bad_inventory_manifests_fail_with_one_line(tmp_path, doc, message):
    (tmp_path / "manifest.json").write_text(doc)
    with pytest.raises(InputError, match=message) as e:
        manifests.manifest_parts(str(tmp_path / "manifest.json"), {})
    assert "\n" not in str(e.value) and "manifest.json" in str(e.value)


def test_iter_input_reads_every_kind(samples, tmp_path):
    write_csv(tmp_path / "m.csv", ["uri"], [["s3://lake/a.jpg"]])
    root = samples.root
    kinds = {str(root): len(found_by_fsspec(str(root), {})), str(root / "street/scene_a.png"): 1,
             str(tmp_path / "m.csv"): 1}
    for uri, count in kinds.items():
        assert len(flat(sources.iter_input(classify(uri, {}), {}))) == count


# ---------------------------------------------------------------------------------------------
# reading


def test_shard_members_are_images_only_with_chained_urls(samples):
    shard = samples.root / "shards/shard-000000.tar"
    uri = f"file://{shard}"
    members = list(iter_shard(uri, {}))
    assert [m[0] for m in members] == [f"tar://000001.png::{uri}", f"tar://000002.png::{uri}"]
    with tarfile.open(shard) as tar:
        assert members[0][2] == tar.extractfile("000001.png").read()
    with fsspec.open(members[1][0], "rb") as f:  # the member URI opens with fsspec as it is
        assert f.read() == members[1][2]


def test_image_name_rule():
    assert is_image_name("a/B.TIF") and is_image_name("x.jpeg") and not is_image_name("x.gif")


# --- names that are easy to get wrong ----------------------------------------------------------

def _read_rows(uris: list[str]) -> list[tuple[str, int, str | None]]:
    """(uri, members, error) of what stages.read_batch makes of these listed objects."""
    import numpy as np

    from batchseg.config import StorageConfig
    from batchseg.store.ledger import DoneSet
    from batchseg.run.stages import read_batch

    batch = {"uri": np.array(uris, object), "size": np.full(len(uris), -1), "version": np.array(["v"] * len(uris), object),
             "is_shard": np.array([u.endswith(".tar") for u in uris])}
    out = []
    for b in read_batch(batch, StorageConfig(), DoneSet(None), rows_per_batch=16):
        out += list(zip(b["uri"], b["members"].tolist(), b["error"]))
    return out


def test_a_name_appended_to_a_tar_twice_is_one_image(tmp_path):
    """`tar rf` adds a second copy of a name: one row, and the shard counts one member, so that a
    re-run finds the shard done (two copies of one key would never add up to two members)."""
    shard = tmp_path / "d.tar"
    with tarfile.open(shard, "w") as tar:
        for name, body in (("a.jpg", b"first"), ("b.jpg", b"other"), ("a.jpg", b"second")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    rows = _read_rows([f"file://{shard}"])
    assert [(u.split("::")[0], m) for u, m, _ in rows] == [("tar://a.jpg", -1), ("tar://b.jpg", -1), (f"file://{shard}", 2)]


def test_names_with_double_colons_are_objects_not_chains(tmp_path):
    (tmp_path / "a::b.jpg").write_bytes(b"bytes")
    shard = tmp_path / "s::1.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("x::y.jpg")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"xy"))
    rows = _read_rows([f"file://{tmp_path}/a::b.jpg", f"file://{shard}"])
    assert [e for *_, e in rows] == [None, None, None]
    assert sources.split_member(rows[1][0]) == (f"file://{shard}", "x::y.jpg")


def test_a_manifest_row_that_a_folder_input_lists_too_is_listed_once(tmp_path):
    """Inputs `images/` and a manifest naming images/a.png, images/b.png and other/c.png (two
    spellings): each image is one row of the run, not two."""
    import numpy as np

    from batchseg.config import load_config
    from batchseg.run.job import plan_inputs
    from batchseg.store.ledger import DoneSet
    from batchseg.run.stages import list_inputs

    for name in ("images/a.png", "images/b.png", "other/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"png")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri\n{tmp_path}/images/a.png\nfile://{tmp_path}/images/b.png\n{tmp_path}/other/c.png\n")
    cfg = load_config(None, [(["inputs"], [str(tmp_path / "images"), str(manifest)]), (["output"], str(tmp_path / "out")),
                             (["models"], {"instance": {"backend": "torchvision", "random_init": True}})])
    units = plan_inputs(cfg)
    uris = [u for page in list_inputs({"unit": np.arange(len(units))}, units, cfg.s3, DoneSet(None))
            for u in page["uri"]]
    assert sorted(uris) == [f"file://{tmp_path}/{n}" for n in ("images/a.png", "images/b.png", "other/c.png")]

import tarfile

from batchseg.sources import is_image_name, iter_shard, list_sources


def test_listing_is_recursive_sorted_and_filters_extensions(samples):
    rows = list(list_sources(str(samples.root), {}))
    names = [r["uri"].split("/images/", 1)[1] for r in rows]
    assert names == sorted(names)
    assert "notes.txt" not in names
    assert "street/scene_b.PNG" in names and "odd/photo.JPEG" in names  # case-insensitive
    assert "park/nested/scene_e.webp" in names  # recursive
    assert [r["is_shard"] for r in rows if r["uri"].endswith(".tar")] == [True]
    assert all(r["uri"].startswith("file:///") and r["size"] >= 0 and r["version"] for r in rows)


def test_single_file_input(samples):
    rows = list(list_sources(str(samples.root / "street/scene_a.png"), {}))
    assert len(rows) == 1 and rows[0]["size"] == (samples.root / "street/scene_a.png").stat().st_size


def test_shard_members_are_images_only_with_chained_urls(samples):
    shard = samples.root / "shards/shard-000000.tar"
    uri = f"file://{shard}"
    members = list(iter_shard(uri, {}))
    assert [m[0] for m in members] == [f"tar://000001.png::{uri}", f"tar://000002.png::{uri}"]
    with tarfile.open(shard) as tar:
        assert members[0][2] == tar.extractfile("000001.png").read()
    import fsspec  # the member URI opens with fsspec as it is

    with fsspec.open(members[1][0], "rb") as f:
        assert f.read() == members[1][2]


def test_image_name_rule():
    assert is_image_name("a/B.TIF") and is_image_name("x.jpeg") and not is_image_name("x.gif")

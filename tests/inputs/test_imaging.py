import io

import numpy as np
import pytest
from PIL import Image

from batchseg.inputs.imaging import DecodeError, ShortestEdge, decode_image, decode_rgb, model_inputs, resize_shortest_edge

LIMIT = 89_478_485


def read(samples, name):
    return (samples.root / name).read_bytes()


def test_exif_orientation_is_applied(samples):
    rgb = decode_rgb(read(samples, "odd/rotated_exif6.png"), LIMIT)
    assert rgb.shape == (120, 200, 3)  # stored 200 x 120 sideways, shown upright
    gt = next(i for i in samples.ground_truth["images"] if i["file_name"] == "odd/rotated_exif6.png")
    assert (gt["height"], gt["width"]) == rgb.shape[:2]
    assert tuple(rgb[20, 100]) == (255, 0, 0)  # the red bar sits at the top once upright


@pytest.mark.parametrize("name", ["odd/gray.jpg", "odd/gray16.png", "odd/rgba.png", "odd/palette.png", "odd/cmyk.jpg"])
def test_odd_modes_become_8bit_rgb(samples, name):
    rgb = decode_rgb(read(samples, name), LIMIT)
    assert rgb.dtype == np.uint8 and rgb.shape == (61, 97, 3)
    assert rgb[:, -1].mean() > 200 and rgb[:, 0].mean() < 60  # the gradient survived


def test_sixteen_bit_is_scaled_not_clipped():
    wide = np.array([[0, 257 * 100, 65535]], np.uint16)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    rgb = decode_rgb(buf.getvalue(), LIMIT)
    assert rgb[0, :, 0].tolist() == [0, 100, 255]


@pytest.mark.parametrize("name, reason", [
    ("bad/empty.jpg", "empty file"),
    ("bad/truncated.jpg", "cannot decode image"),
    ("bad/not_an_image.png", "not an image"),
    ("bad/bomb.png", "max_image_pixels"),
])
def test_bad_files_give_one_line_reasons(samples, name, reason):
    with pytest.raises(DecodeError) as e:
        decode_rgb(read(samples, name), LIMIT)
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_pixel_limit_is_configurable(samples):
    with pytest.raises(DecodeError, match="max_image_pixels=1000"):
        decode_rgb(read(samples, "street/scene_a.png"), 1000)


@pytest.mark.parametrize("h, w, short, cap, expected", [
    (240, 320, 800, 1333, (800, 1067)),
    (12, 600, 800, 1333, (27, 1333)),
    (100, 100, 100, 1333, (100, 100)),
])
def test_resize_shortest_edge(h, w, short, cap, expected):
    out = resize_shortest_edge(np.zeros((h, w, 3), np.uint8), short, cap)
    assert out.shape[:2] == expected


@pytest.mark.parametrize("name", ["odd/rotated_exif6.png", "odd/gray.jpg", "odd/gray16.png", "odd/rgba.png",
                                  "odd/palette.png", "odd/cmyk.jpg", "street/scene_a.png"])
def test_resize_from_the_pil_image_equals_the_array_path(samples, name):
    """The decode stage's path (decode_image, then ShortestEdge.from_image: one copy into numpy)
    gives the pixels of decoding to an array and resizing that, for every mode and orientation;
    a preprocessor without from_image gets the array."""
    data, prep = read(samples, name), ShortestEdge(150, 210)
    image = decode_image(data, LIMIT)
    assert image.mode == "RGB"
    array_path = resize_shortest_edge(decode_rgb(data, LIMIT), 150, 210)
    resized, plain = model_inputs(image, [prep, lambda rgb: rgb + 0])
    assert np.array_equal(resized, array_path) and resized.shape[:2] != image.size[::-1]  # it did resize
    assert np.array_equal(plain, decode_rgb(data, LIMIT))
    from_frame, = model_inputs(decode_rgb(data, LIMIT), [prep])  # a video frame comes as an array
    assert np.array_equal(from_frame, array_path)


def test_resize_matches_detectron2_when_installed():
    T = pytest.importorskip("detectron2.data.transforms")
    rng = np.random.default_rng(0)
    for h, w in [(240, 320), (181, 257), (12, 600), (1, 1)]:
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        ours = resize_shortest_edge(img, 128, 256)
        theirs = T.ResizeShortestEdge([128, 128], 256).get_transform(img).apply_image(img)
        assert np.array_equal(ours, theirs)

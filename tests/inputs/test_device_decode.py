"""decode_on_device: JPEGs decoded in the predictor actor, on its device, against the CPU path.

CI has no GPU: torchvision decodes JPEGs on the CPU too (libjpeg instead of nvJPEG), so the
device path runs here with device "cpu". What a GPU changes (nvJPEG's IDCT and chroma
upsampling, resizing in float) is not measured here.
"""

import importlib.util
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from batchseg.run import placement
from batchseg.config import ConfigError, load_config
from batchseg.inputs.imaging import ShortestEdge, decode_rgb, device_jpeg_header
from batchseg.predictors.base import preprocess_plan
from batchseg.predictors.device import image_tensor
from batchseg.run.stages import Annotate, decode_batch, decode_on_device

LIMIT = 89_478_485
TOLERANCE = 2.0  # mean |difference| on 0..255 allowed between the device path and PIL


def scene(h: int = 97, w: int = 131) -> np.ndarray:
    """(h, w, 3) uint8: smooth gradients and a sharp red block, so that both resampling and
    orientation errors show."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.dstack([xx * 255 / w, yy * 255 / h, (xx + yy) % 64 * 4]).astype(np.uint8)
    rgb[h // 10:h // 3, w // 6:w // 2] = (255, 0, 0)
    return rgb


def jpeg(rgb: np.ndarray, orientation: int | None = None, **save) -> bytes:
    buf, image = io.BytesIO(), Image.fromarray(rgb)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save["exif"] = exif
    image.save(buf, format="JPEG", quality=92, **save)
    return buf.getvalue()


def encoded(kind: str) -> bytes:
    rgb = scene()
    if kind == "gray":
        return jpeg(rgb[:, :, 0].copy())
    if kind == "progressive":
        return jpeg(rgb, progressive=True)
    if kind == "cmyk":
        buf = io.BytesIO()
        Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG")
        return buf.getvalue()
    if kind == "png":
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        return buf.getvalue()
    good = jpeg(rgb)
    if kind == "truncated":
        return good[:len(good) // 2]
    if kind == "corrupt":  # a whole JPEG (header, EOI) whose scan is garbage: the device gets it, and fails
        return good[:600] + np.random.default_rng(0).integers(0, 255, len(good) - 602, np.uint8).tobytes() + good[-2:]
    if kind == "appended":  # data after EOI, as motion photos carry
        return good + b"trailer"
    return good


KINDS = {  # kind -> does the device take it?
    "baseline": True, "gray": True,
    "progressive": False, "cmyk": False, "png": False, "truncated": False, "appended": False,
    "corrupt": True,  # its header is fine; the device decode fails, then the CPU gives today's error
}


@pytest.mark.parametrize("kind, taken", KINDS.items())
def test_which_files_the_device_takes(kind, taken):
    header = device_jpeg_header(encoded(kind), LIMIT)
    assert (header is not None) == taken
    if taken:
        assert (header.height, header.width, header.orientation) == (97, 131, 1)


def test_a_jpeg_over_the_pixel_limit_stays_on_the_cpu_for_its_error():
    data = encoded("baseline")
    assert device_jpeg_header(data, 1000) is None
    assert decode_one(data, 1000, jpegs_to_device=True) == decode_one(data, 1000)


def test_every_exif_orientation_gives_the_cpu_size_and_pixels():
    prep = ShortestEdge(97, 1000)  # no resize: the decode and the orientation alone
    for orientation in range(1, 9):
        data = jpeg(scene(), orientation)
        header = device_jpeg_header(data, LIMIT)
        cpu = decode_rgb(data, LIMIT)
        assert header.orientation == orientation and (header.height, header.width) == cpu.shape[:2]
        out = decode_on_device(decode_batch(read_rows([data]), models(), LIMIT, jpegs_to_device=True), [prep], LIMIT, "cpu")
        device = out["image_0"][0]
        assert isinstance(device, torch.Tensor) and (out["height"][0], out["width"][0]) == cpu.shape[:2]
        assert mean_abs_diff(hwc(device), prep(cpu)) < TOLERANCE, orientation  # measured: 0.0 with libjpeg


SIZES = [(97, 131), (480, 640), (1080, 1920), (1920, 1080), (333, 517), (50, 2000), (800, 1333), (7, 9)]


@pytest.mark.parametrize("h, w", SIZES)
def test_device_preprocessing_matches_the_cpu_shape_exactly_and_pixels_closely(h, w):
    rgb = scene(h, w)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    for prep in preprocessors():
        cpu, device = prep(rgb), prep.on_device(tensor)
        assert device.dtype == torch.uint8 and hwc(device).shape == cpu.shape, prep
        assert mean_abs_diff(hwc(device), cpu) < 0.5 and max_abs_diff(hwc(device), cpu) <= 4, prep


def test_decode_stage_passes_device_jpegs_on_and_decodes_the_rest_as_before():
    kinds = list(KINDS)
    rows = read_rows([encoded(k) for k in kinds])
    before = decode_batch(rows, models(), LIMIT)
    after = decode_batch(rows, models(), LIMIT, jpegs_to_device=True)
    for i, kind in enumerate(kinds):
        passed = len(after["jpeg"][i]) > 0
        assert passed == KINDS[kind], kind
        if passed:  # the size from the header; no image yet
            assert (after["height"][i], after["width"][i], after["error"][i]) == (97, 131, None)
            assert after["image_0"][i].size == 0
        else:
            assert (after["height"][i], after["width"][i]) == (before["height"][i], before["width"][i]), kind
            assert np.array_equal(after["image_0"][i], before["image_0"][i]), kind
            assert (after["error"][i], after["error_kind"][i]) == (before["error"][i], before["error_kind"][i]), kind


def test_decoding_on_threads_gives_the_same_batch_in_the_same_order():
    """decode_threads: the actor's decoder pool, against one image after another."""
    from concurrent.futures import ThreadPoolExecutor

    rows = read_rows([encoded(k) for k in KINDS] + [jpeg(scene(60 + i, 80 + i), 6) for i in range(8)])
    alone = decode_batch(rows, models(), LIMIT)
    with ThreadPoolExecutor(3) as decoder:
        threaded = decode_batch(rows, models(), LIMIT, decoder=decoder)
    assert alone.keys() == threaded.keys()
    for column in alone:
        for a, b in zip(alone[column], threaded[column]):
            assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, column


def test_actor_decode_gives_the_cpu_rows_sizes_errors_and_close_pixels():
    kinds = list(KINDS)
    rows = read_rows([encoded(k) for k in kinds] + [jpeg(scene(), 6)])
    two = models(panoptic={"backend": "tests.inputs.test_device_decode:SmallerInput"})
    preps, _ = preprocess_plan(two)
    assert preps == [ShortestEdge(64, 96), ShortestEdge(40, 50)]  # two model inputs per image
    cpu = decode_batch(rows, two, LIMIT)
    device = decode_on_device(through_arrow(decode_batch(rows, two, LIMIT, jpegs_to_device=True)), preps, LIMIT, "cpu")
    for i, kind in enumerate(kinds + ["exif6"]):
        assert (device["height"][i], device["width"][i]) == (cpu["height"][i], cpu["width"][i]), kind
        assert (device["error"][i], device["error_kind"][i]) == (cpu["error"][i], cpu["error_kind"][i]), kind
        on_device = KINDS.get(kind, True) and kind != "corrupt"
        if cpu["error"][i] is None:
            rgb = decode_rgb(rows["data"][i], LIMIT)
            for k, prep in enumerate(preps):
                image = device[f"image_{k}"][i]
                assert isinstance(image, torch.Tensor) == on_device, kind
                got = hwc(image) if on_device else image
                assert got.shape == prep(rgb).shape and mean_abs_diff(got, prep(rgb)) < TOLERANCE, kind
    assert "cannot decode image" in device["error"][kinds.index("corrupt")]


@pytest.mark.parametrize("backend", ["torchvision", "detectron2"])
def test_annotate_rows_equal_the_cpu_path(backend):
    if backend == "detectron2":
        pytest.importorskip("detectron2")
    job = load_config(None, [(["inputs"], ["/x"]), (["output"], "/o"), (["models"], {"instance": {
        "backend": backend, "random_init": True, "min_size": 64, "max_size": 96, "score_threshold": 0.0}})])
    annotate = Annotate(job, "cpu")
    seen, predict = [], annotate.backends["instance"].predict

    def recording(images):
        seen.extend(type(x.image) for x in images)
        return predict(images)

    annotate.backends["instance"].predict = recording
    kinds = list(KINDS)
    rows = read_rows([encoded(k) for k in kinds] + [jpeg(scene(), 8)])
    cpu = annotate(through_arrow(decode_batch(rows, job.models, LIMIT))).to_pylist()
    seen_cpu, seen[:] = list(seen), []
    device = annotate(through_arrow(decode_batch(rows, job.models, LIMIT, jpegs_to_device=True))).to_pylist()
    keys = ("image_id", "width", "height", "error", "error_kind")
    assert [{k: r[k] for k in keys} for r in device] == [{k: r[k] for k in keys} for r in cpu]
    assert all((r["instances"] is None) == (r["error"] is not None) for r in device)
    assert set(seen_cpu) == {np.ndarray}
    # baseline, gray and exif 8 decoded on the device; progressive, CMYK, PNG and appended on the CPU
    assert seen.count(torch.Tensor) == 3 and seen.count(np.ndarray) == 4


def test_image_tensor_takes_a_device_tensor_as_it_is():
    tensor = torch.zeros((3, 5, 7), dtype=torch.uint8)
    assert image_tensor(tensor, "cpu") is tensor
    assert image_tensor(np.zeros((5, 7, 3), np.uint8), "cpu").shape == (3, 5, 7)


def test_decode_on_device_needs_cuda():
    with pytest.raises(ConfigError, match="decode_on_device needs CUDA; set device: cuda"):
        load_config(None, [(["inputs"], ["/x"]), (["output"], "/o"), (["device"], "cpu"), (["decode_on_device"], True)])


def test_decode_on_device_needs_a_backend_that_preprocesses_on_the_device(tmp_path):
    from batchseg.run.job import preflight

    job = load_config(None, [(["inputs"], [str(tmp_path)]), (["output"], str(tmp_path / "o")), (["device"], "cuda"),
                             (["decode_on_device"], True),
                             (["models"], {"instance": {"backend": "tests.oracle:ColorKeyBackend"}})])
    with pytest.raises(ConfigError, match="models.instance: backend .* cannot preprocess on the device .* "
                                          "set decode_on_device: false$"):
        preflight(job)


def test_auto_on_a_cpu_cluster_says_decode_on_device_is_off(caplog):
    job = load_config(None, [(["inputs"], ["/x"]), (["output"], "/o"), (["decode_on_device"], True)])
    with caplog.at_level(logging.INFO, logger="batchseg.run.placement"):
        assert placement.place(job, (placement.Node("n", "127.0.0.1", {"CPU": 2.0}),)).device == "cpu"
    assert "decode_on_device is off: device auto resolved to cpu" in caplog.text


def models(**more):
    """Model configs by task: torchvision instance at 64/96, and `more`."""
    given = {"instance": {"backend": "torchvision", "random_init": True, "min_size": 64, "max_size": 96}, **more}
    return load_config(None, [(["inputs"], ["/x"]), (["output"], "/o"), (["tasks"], list(given)),
                              (["models"], given)]).models


class SmallerInput:
    """Just enough of a backend for the decode stages: a second, smaller model input."""

    @staticmethod
    def preprocessor(cfg):
        return ShortestEdge(40, 50)


def preprocessors():
    preps = [ShortestEdge(800, 1333), ShortestEdge(64, 96)]
    if importlib.util.find_spec("detectron2") is None:
        return preps
    from batchseg.predictors.detectron2 import D2Preprocess

    return preps + [D2Preprocess(800, 1333, True), D2Preprocess(640, 1000, False)]


def read_rows(data: list[bytes]) -> dict[str, np.ndarray]:
    """A batch as read_batch leaves it."""
    n = len(data)
    return {
        "uri": objects([f"file:///img{i}.jpg" for i in range(n)]), "size": np.array([len(d) for d in data], np.int64),
        "version": objects(["v"] * n), "key": np.arange(n, dtype=np.int64), "members": np.full(n, -1, np.int32),
        "data": objects(data), "error": objects([None] * n), "error_kind": objects([None] * n),
    }


def through_arrow(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch as the next stage gets it from Ray Data: an all-null column comes back as NaN
    floats, a column of equally shaped images as one array."""
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(BlockAccessor.batch_to_block(batch)).to_batch_format("numpy")


def decode_one(data: bytes, max_pixels: int, **kwargs) -> tuple:
    out = decode_batch(read_rows([data]), models(), max_pixels, **kwargs)
    return out["error"][0], out["error_kind"][0], out["height"][0], out["width"][0]


def objects(values) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr


def hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).cpu().numpy()


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())

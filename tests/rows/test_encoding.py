import numpy as np
import pytest
from pycocotools import mask as mask_util

from batchseg.rows.encoding import crop_counts, decode_mask, encode_densepose, encode_instances, encode_mask, encode_panoptic
from batchseg.predictors.base import CroppedMasks, DensePose, Detections, Panoptic, PanopticSegment, group_by_shape
from tests import reference_encoding as reference


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (13, 17), (31, 2), (101, 63), (257, 181)])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 1.0])
def test_rle_round_trip_is_exact(shape, density):
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    mask = rng.random(shape) < density
    seg = encode_mask(mask)
    assert seg["size"] == list(shape)
    assert isinstance(seg["counts"], str)
    assert np.array_equal(decode_mask(seg), mask)
    # pycocotools agrees on the area and reads our string as its own compressed RLE
    assert mask_util.area({"size": seg["size"], "counts": seg["counts"].encode()}) == mask.sum()


def test_rle_is_column_major_like_pycocotools():
    mask = np.zeros((3, 4), bool)
    mask[0, 1] = True  # column-major index 3
    seg = encode_mask(mask)
    expected = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert seg["counts"] == expected["counts"].decode()


def test_encode_instances_boxes_scores_threshold_and_order():
    masks = np.zeros((3, 10, 20), bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 0:10, 0:1] = True
    masks[2, 1:2, 1:2] = True
    det = Detections(
        boxes=np.array([[3, 2, 9, 5], [0, 0, 1, 10], [1, 1, 2, 2]], np.float32),
        scores=np.array([0.6, 0.9, 0.2], np.float32),
        category_ids=np.array([18, 1, 3]),
        masks=CroppedMasks.from_full(masks),
    )
    out = encode_instances(det, score_threshold=0.5)
    assert [i["category_id"] for i in out] == [1, 18]  # 0.2 dropped, highest score first
    assert out[1]["bbox"] == [3.0, 2.0, 6.0, 3.0]  # x, y, w, h
    assert out[1]["area"] == 18
    assert out[0]["score"] == pytest.approx(0.9)
    assert np.array_equal(decode_mask(out[1]["segmentation"]), masks[0])


def test_empty_detections_encode_to_empty_list():
    assert encode_instances(Detections.empty(4, 5), 0.0) == []


def test_panoptic_png_rebuilt_from_rle_segments_equals_the_id_map():
    from batchseg.rows.encoding import decode_panoptic

    rng = np.random.default_rng(3)
    id_map = rng.integers(0, 6, (37, 53)).astype(np.int32)  # 0 = void, 1..5 segments
    id_map[:5, :5] = 0
    segments = [PanopticSegment(i, cid, i <= 2, 0.9 if i <= 2 else None)
                for i, cid in zip(range(1, 6), [1, 18, 92, 184, 200])]
    cells = encode_panoptic(Panoptic(id_map, segments))
    assert np.array_equal(decode_panoptic(cells, 37, 53), id_map)
    assert [c["id"] for c in cells] == [1, 2, 3, 4, 5]
    assert [c["isthing"] for c in cells] == [True, True, False, False, False]
    assert cells[2]["score"] is None and cells[0]["score"] == 0.9
    assert sum(c["area"] for c in cells) == np.count_nonzero(id_map)
    # the COCO panoptic PNG: id = R + 256 G + 256^2 B
    rgb = np.stack([id_map % 256, id_map // 256 % 256, id_map // 256**2], -1).astype(np.uint8)
    rebuilt = decode_panoptic(cells, 37, 53)
    assert np.array_equal(rgb[..., 0] + 256 * rgb[..., 1].astype(int) + 65536 * rgb[..., 2].astype(int), rebuilt)
    # an allow-list drops other categories: they read as void
    kept = encode_panoptic(Panoptic(id_map, segments), allowed={18})
    assert np.array_equal(decode_panoptic(kept, 37, 53), np.where(id_map == 2, 2, 0))


def test_keypoints_keep_coco_order_and_detectron2_half_pixel_shift():
    from batchseg.rows.encoding import encode_keypoints
    from batchseg.predictors.base import Keypoints

    points = np.zeros((2, 17, 3), np.float32)
    points[0, :, 0] = np.arange(17) + 10.5  # x of keypoint k is 10.5 + k
    points[0, :, 1] = 20.5
    points[0, :, 2] = np.linspace(0.1, 1.7, 17)
    kp = Keypoints(
        boxes=np.array([[0, 0, 40, 50], [1, 1, 2, 2]], np.float32), scores=np.array([0.9, 0.1], np.float32),
        category_ids=np.array([1, 1]), keypoints=points,
    )
    out = encode_keypoints(kp, score_threshold=0.5)
    assert len(out) == 1 and len(out[0]["keypoints"]) == 51
    triples = np.array(out[0]["keypoints"]).reshape(17, 3)
    assert np.allclose(triples[:, 0], np.arange(17) + 10.0)  # order kept, x - 0.5
    assert np.allclose(triples[:, 1], 20.0)
    assert np.allclose(triples[:, 2], np.linspace(0.1, 1.7, 17))  # v carries the score
    assert out[0]["bbox"] == [0.0, 0.0, 40.0, 50.0]


def test_densepose_chart_round_trip_and_same_png_as_detectron2_compression():
    import base64

    from batchseg.rows.encoding import decode_iuv, encode_iuv

    rng = np.random.default_rng(5)
    iuv = np.stack([rng.integers(0, 25, (31, 19)), rng.integers(0, 256, (31, 19)), rng.integers(0, 256, (31, 19))]).astype(np.uint8)
    assert np.array_equal(decode_iuv(encode_iuv(iuv)), iuv)
    masks = np.zeros((1, 60, 40), bool)
    masks[0, 10:41, 5:24] = iuv[0] > 0
    out = encode_densepose(DensePose(np.array([[5, 10, 24, 41]], np.float32), np.array([0.8], np.float32),
                                     np.array([1]), [iuv], CroppedMasks.from_full(masks)), 0.5)
    assert np.array_equal(decode_iuv(out[0]["iuv_png"]), iuv)
    assert np.array_equal(decode_mask(out[0]["segmentation"]), masks[0])
    try:  # detectron2's own compression, where DensePose is installed, gives the same PNG
        import torch
        from densepose.structures import DensePoseChartResultQuantized, compress_quantized_densepose_chart_result
    except ImportError:
        return
    theirs = compress_quantized_densepose_chart_result(DensePoseChartResultQuantized(torch.from_numpy(iuv)))
    assert base64.decodebytes(theirs.labels_uv_str.encode()) == encode_iuv(iuv)


def test_category_allow_list_filters_instances():
    masks = CroppedMasks.from_full(np.ones((2, 3, 3), bool))
    det = Detections(np.zeros((2, 4), np.float32), np.array([0.9, 0.8], np.float32), np.array([1, 3]), masks)
    assert [i["category_id"] for i in encode_instances(det, 0.0, allowed={3})] == [3]


# --- masks cropped to their boxes: byte-identical to pycocotools on the full mask -------------

SIZES = [(1, 1), (1, 7), (7, 1), (2, 2), (13, 17), (31, 2), (2, 31), (101, 63), (64, 64)]


def _random_crop(rng, height, width):
    """A crop as a backend makes one: a float box anywhere, partly or wholly past any border,
    clipped to the image, its content one of empty / one pixel / full / random / a blob."""
    bx0, bx1 = np.sort(rng.uniform(-0.6 * width, 1.6 * width, 2))
    by0, by1 = np.sort(rng.uniform(-0.6 * height, 1.6 * height, 2))
    x0, x1 = int(np.clip(np.floor(bx0), 0, width)), int(np.clip(np.ceil(bx1), 0, width))
    y0, y1 = int(np.clip(np.floor(by0), 0, height)), int(np.clip(np.ceil(by1), 0, height))
    h, w = y1 - y0, x1 - x0
    kind = rng.integers(5)
    crop = np.zeros((h, w), bool)
    if kind == 1 and h and w:
        crop[rng.integers(h), rng.integers(w)] = True
    elif kind == 2:
        crop[:] = True
    elif kind == 3:
        crop = rng.random((h, w)) < rng.uniform(0.05, 0.95)
    elif kind == 4 and h and w:
        yy, xx = np.mgrid[:h, :w]
        crop = ((yy - h / 2) / max(h / 2, 1)) ** 2 + ((xx - w / 2) / max(w / 2, 1)) ** 2 <= rng.uniform(0.3, 1.2)
    order = "F" if rng.random() < 0.7 else "C"  # backends hand over column-major; any order must work
    return np.array(crop, bool, order=order), y0, x0


def _pycocotools(full):
    return mask_util.encode(np.asfortranarray(full.astype(np.uint8)))["counts"].decode()


@pytest.mark.parametrize("height, width", SIZES)
def test_crop_rle_is_byte_identical_to_pycocotools_on_the_full_mask(height, width):
    rng = np.random.default_rng(height * 1000 + width)
    crops, offsets, full = [], [], []
    for _ in range(300):
        crop, y0, x0 = _random_crop(rng, height, width)
        crops.append(crop)
        offsets.append([y0, x0])
        mask = np.zeros((height, width), bool)
        mask[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
        full.append(mask)
    masks = CroppedMasks(height, width, np.array(offsets, np.int64), tuple(crops))
    det = Detections(np.zeros((len(crops), 4), np.float32), np.linspace(1, 0.5, len(crops)).astype(np.float32),
                     np.ones(len(crops), np.int64), masks)
    got = encode_instances(det, 0.0)
    for cell, mask in zip(got, full):  # scores descend, so rows keep the order of the masks
        assert cell["segmentation"]["counts"] == _pycocotools(mask)
        assert cell["segmentation"]["size"] == [height, width]
        assert cell["area"] == mask.sum()
    assert got == reference.encode_instances(det, np.stack(full), 0.0)


@pytest.mark.parametrize("height, width", [(5, 4), (1, 9), (6, 1)])
def test_runs_merge_across_columns_when_the_crop_spans_the_full_height(height, width):
    """A run that ends at the bottom of one column continues at the top of the next."""
    for x0 in range(width):
        for w in range(1, width - x0 + 1):
            for crop in (np.ones((height, w), bool), np.eye(height, w, k=-(height - 1), dtype=bool) | np.eye(height, w, k=1, dtype=bool)):
                full = np.zeros((height, width), bool)
                full[:, x0:x0 + w] = crop
                rle = mask_util.encode(np.asfortranarray(full.astype(np.uint8)))
                counts = crop_counts(np.asfortranarray(crop), 0, x0, height, width)
                assert counts.sum() == height * width
                assert mask_util.frPyObjects({"size": [height, width], "counts": counts}, height, width)["counts"] == rle["counts"]


def test_mask_ending_at_the_last_pixel_has_no_trailing_zero_run():
    crop = np.ones((2, 2), bool, order="F")
    counts = crop_counts(crop, 3, 4, 5, 6)  # bottom-right corner of a 5 x 6 image
    assert counts[-1] != 0 and counts.sum() == 30


def test_cropped_masks_from_full_full_select_and_flat():
    rng = np.random.default_rng(7)
    full = rng.random((4, 9, 11)) < 0.2
    full[1] = False
    full[2, 0, 0] = True
    masks = CroppedMasks.from_full(full)
    assert all(np.array_equal(masks.full(i), full[i]) for i in range(4))
    assert masks.crops[1].shape == (0, 0) and masks.areas().tolist() == full.sum((1, 2)).tolist()
    picked = masks.select(np.array([False, True, False, True]))
    assert len(picked) == 2 and np.array_equal(picked.full(1), full[3])
    assert all(c.flags.f_contiguous for c in masks.crops)
    regions = np.array([[*masks.offsets[i], *masks.crops[i].shape] for i in range(4)])
    flat = np.concatenate([c.T.reshape(-1) for c in masks.crops])  # column-major, as backends send
    again = CroppedMasks.from_flat(flat, regions, 9, 11)
    assert all(np.array_equal(again.full(i), full[i]) for i in range(4))
    assert again.nbytes == masks.nbytes == sum(c.size for c in masks.crops)
    with pytest.raises(ValueError, match="inside"):
        CroppedMasks(9, 11, np.array([[8, 0]]), (np.ones((2, 2), bool),))
    with pytest.raises(TypeError, match="CroppedMasks.from_full"):  # a backend written for full masks
        Detections(np.zeros((4, 4), np.float32), np.ones(4, np.float32), np.ones(4, np.int64), full)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32])
@pytest.mark.parametrize("seed", range(6))
def test_panoptic_in_one_pass_equals_the_full_image_reference(dtype, seed):
    rng = np.random.default_rng(seed)
    height, width = rng.integers(1, 60, 2)
    n = int(rng.integers(1, 12))
    coarse = rng.integers(0, n + 1, (height // 4 + 1, width // 4 + 1))  # blobs, plus noise below
    id_map = np.kron(coarse, np.ones((4, 4), int))[:height, :width]
    noise = rng.random((height, width)) < 0.05
    id_map[noise] = rng.integers(0, n + 1, noise.sum())
    if seed % 2:
        id_map[-1, -1] = n  # a segment that owns the last pixel
    segments = [PanopticSegment(i, 100 + i, i % 3 == 0, 0.5 if i % 3 == 0 else None) for i in range(1, n + 2)]  # n + 1: absent
    pan = Panoptic(np.array(id_map, dtype, order="F" if seed % 2 else "C"), segments[::-1])  # backends: F
    assert encode_panoptic(pan) == reference.encode_panoptic(Panoptic(id_map.astype(np.int32), segments))
    allowed = {100 + i for i in range(1, n + 2, 2)}
    assert encode_panoptic(pan, allowed=allowed) == reference.encode_panoptic(pan, allowed=allowed)


def test_panoptic_single_segment_and_void_maps():
    for id_map in (np.zeros((3, 4), np.uint8), np.ones((3, 4), np.uint8), np.ones((1, 1), np.uint8)):
        pan = Panoptic(id_map, [PanopticSegment(1, 7, False)])
        assert encode_panoptic(pan) == reference.encode_panoptic(pan)


def test_densepose_foreground_from_crops_equals_the_full_mask_encoding():
    rng = np.random.default_rng(11)
    height, width = 47, 33
    iuv, offsets, crops, full = [], [], [], np.zeros((6, height, width), bool)
    for k in range(6):
        crop, y0, x0 = _random_crop(rng, height, width)
        h, w = crop.shape
        chart = np.zeros((3, max(h, 1), max(w, 1)), np.uint8)
        chart[0, :h, :w] = crop * rng.integers(1, 25, (h, w))
        iuv.append(chart)
        offsets.append([y0, x0])
        crops.append(np.asfortranarray(chart[0, :h, :w] > 0))
        full[k, y0:y0 + h, x0:x0 + w] = chart[0, :h, :w] > 0
    dp = DensePose(np.zeros((6, 4), np.float32), np.linspace(1, 0.5, 6).astype(np.float32), np.ones(6, np.int64),
                   iuv, CroppedMasks(height, width, np.array(offsets), tuple(crops)))
    assert encode_densepose(dp, 0.0) == reference.encode_densepose(dp, full, 0.0)


def test_group_by_shape_batches_similar_shapes_and_keeps_every_index_once():
    shapes = [(800, 1333), (1333, 800), (800, 1067), (800, 1333), (1200, 800), (800, 1067), (800, 1200)]
    batches = group_by_shape(shapes, 2)
    assert sorted(i for b in batches for i in b) == list(range(len(shapes)))
    assert all(len(b) <= 2 for b in batches)
    assert batches == [[2, 5], [6, 0], [3, 4], [1]]  # by (h, w): equal heights together, portrait last

    def padded(groups):  # pixels a batched forward computes: each batch pads to its largest image
        return sum(len(b) * max(shapes[i][0] for i in b) * max(shapes[i][1] for i in b) for b in groups)

    assert padded(batches) < padded([[0, 1], [2, 3], [4, 5], [6]])
    assert group_by_shape([], 4) == []
    with pytest.raises(ValueError):
        group_by_shape(shapes, 0)

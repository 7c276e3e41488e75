import numpy as np
import pytest
from pycocotools import mask as mask_util

from batchseg.encoding import decode_mask, encode_instances, encode_mask
from batchseg.predictors.base import Detections


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
        masks=masks,
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
    from batchseg.encoding import decode_panoptic, encode_panoptic
    from batchseg.predictors.base import Panoptic, PanopticSegment

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
    from batchseg.encoding import encode_keypoints
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

    from batchseg.encoding import decode_iuv, encode_densepose, encode_iuv
    from batchseg.predictors.base import DensePose

    rng = np.random.default_rng(5)
    iuv = np.stack([rng.integers(0, 25, (31, 19)), rng.integers(0, 256, (31, 19)), rng.integers(0, 256, (31, 19))]).astype(np.uint8)
    assert np.array_equal(decode_iuv(encode_iuv(iuv)), iuv)
    masks = np.zeros((1, 60, 40), bool)
    masks[0, 10:41, 5:24] = iuv[0] > 0
    out = encode_densepose(DensePose(np.array([[5, 10, 24, 41]], np.float32), np.array([0.8], np.float32),
                                     np.array([1]), [iuv], masks), 0.5)
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
    masks = np.ones((2, 3, 3), bool)
    det = Detections(np.zeros((2, 4), np.float32), np.array([0.9, 0.8], np.float32), np.array([1, 3]), masks)
    assert [i["category_id"] for i in encode_instances(det, 0.0, allowed={3})] == [3]

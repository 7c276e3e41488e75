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

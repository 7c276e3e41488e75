"""Review priority: each signal moves it the way its docstring says, and it reaches the rows."""

import numpy as np
import pytest

from batchseg.rows.encoding import encode_mask
from batchseg.rows.review_priority import priority


def _instance(score, box, category=1, size=(40, 60)):
    mask = np.zeros(size, bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return {"category_id": category, "score": score, "segmentation": encode_mask(mask)}


def _segment(box, category=1, isthing=True, score=0.99):
    return {**_instance(score, box, category), "isthing": isthing, "score": score if isthing else None}


def test_nothing_found_is_nothing_to_review():
    assert priority({"instance": []}, {"instance": 0.5}) == 0.0


def test_low_margins_and_many_borderline_items_rank_higher():
    t = {"instance": 0.5}
    sure = priority({"instance": [_instance(0.99, (0, 0, 10, 10))]}, t)
    one = priority({"instance": [_instance(0.5, (0, 0, 10, 10))]}, t)
    two = priority({"instance": [_instance(0.5, (0, 0, 10, 10)), _instance(0.52, (20, 0, 30, 10))]}, t)
    assert sure < 0.011 and one == pytest.approx(1 / 3) and two == pytest.approx(0.98 / 1.98)


def test_instance_and_panoptic_disagreeing_about_an_object_rank_higher():
    cells = {"instance": [_instance(0.99, (0, 0, 20, 20))]}
    agree = priority({**cells, "panoptic": [_segment((0, 0, 20, 20))]}, {"instance": 0.5, "panoptic": 0.5})
    differ = priority({**cells, "panoptic": [_segment((0, 0, 20, 5))]}, {"instance": 0.5, "panoptic": 0.5})
    assert agree < 0.05 < 0.4 < differ


def test_hidden_keypoints_rank_higher():
    person = {"score": 0.99, "keypoints": [1.0, 1.0, 0.9] * 17}
    hidden = {"score": 0.99, "keypoints": [1.0, 1.0, 0.01] * 17}
    t = {"keypoint": 0.5}
    assert priority({"keypoint": [person]}, t) < 0.05 < 0.45 < priority({"keypoint": [hidden]}, t)


def test_crowded_images_keep_their_order():
    t = {"instance": 0.5}
    crowd = [_instance(0.9, (0, 0, 4, 4)) for _ in range(100)]
    bigger = crowd + [_instance(0.6, (0, 0, 4, 4)) for _ in range(20)]
    assert 0.9 < priority({"instance": crowd}, t) < priority({"instance": bigger}, t) < 0.99

"""How good the labels are, and pictures of them.

- `evaluate`: COCO AP (bbox, segm, keypoints) and panoptic quality against a ground truth.
- `render`: images with their annotations drawn, and the review queue.
- `acceptance`: how good the pre-labels were, against the pulled reviews (kept, edited,
  deleted, added; AP; whether review_priority ranked the edited images first).

May import: batchseg.store, batchseg.rows, batchseg.inputs, batchseg.exports (COCO tables).
"""

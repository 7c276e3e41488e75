"""How good the labels are, and pictures of them.

- `evaluate`: COCO AP (bbox, segm, keypoints) and panoptic quality against a ground truth.
- `render`: images with their annotations drawn, and the review queue.

May import: batchseg.store, batchseg.rows, batchseg.inputs, batchseg.exports (COCO tables).
"""

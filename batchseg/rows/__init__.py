"""The row contract: what one output row per image holds, and how predictions become it.

- `schema`: the Parquet schema of an annotations row (`ROW`), folder names of an output,
  `image_id` (stable for a URI).
- `encoding`: detections → COCO RLE, panoptic segments, keypoints, DensePose IUV, and back.
- `tasks`: the table of tasks (instance, panoptic, keypoint, densepose): columns and encoders.
- `review_priority`: how much an image's predictions need a person's eyes, 0..1.

May import: batchseg.config, batchseg.predictors.base (the shapes encoding reads). Never Ray.
"""

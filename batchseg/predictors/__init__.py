"""Models that turn decoded images into detections, and the weights they load.

- `base`: the backend protocol third-party backends implement (`Backend`, `Detections`,
  `CroppedMasks`, `Keypoints`, `DensePose`, `Panoptic`, `Categories`), `backend_class` (a
  built-in name or `package.module:Class`), batching and autocast helpers.
- `detectron2`, `torchvision`: the built-in backends, imported only when named.
- `device`: moving tensors and crops between the model's device and the host.
- `weights`, `checkpoints`, `densepose_configs`: where weights come from (paths, s3://, URLs,
  cached once per node) and how checkpoint files are read safely.

May import: batchseg.config, batchseg.errors, batchseg.inputs (resizing as the model expects).
Never Ray: a GPU machine without Ray runs these modules as they are.
"""

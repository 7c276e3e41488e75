"""Results out to annotation tools: files (COCO, Label Studio, CVAT, FiftyOne) and live pushes;
and what people corrected there back in, as reviews (store.reviews).

- `coco`, `cvat`, `fiftyone`, `labelstudio`: one writer per format, reading `Results`.
- `labelstudio_push`: idempotent pushes into a live Label Studio project.
- `labelstudio_pull`, `coco_pull`: submitted annotations (Label Studio) and COCO exports (CVAT,
  any tool) written as pulls of the reviews dataset.
- `polygons`: RLE → polygons for tools that want them.

May import: batchseg.store (results, storage), batchseg.rows, batchseg.inputs,
batchseg.run.provenance (model versions).
"""

"""Results out to annotation tools: files (COCO, Label Studio, CVAT, FiftyOne) and live pushes.

- `coco`, `cvat`, `fiftyone`, `labelstudio`: one writer per format, reading `Results`.
- `labelstudio_push`: idempotent pushes into a live Label Studio project.
- `polygons`: RLE → polygons for tools that want them.

May import: batchseg.store (results, storage), batchseg.rows, batchseg.inputs,
batchseg.run.provenance (model versions).
"""

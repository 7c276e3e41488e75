"""Import one of our CVAT archives with datumaro, as CVAT's importer does; print what came in.

Runs inside .venv-datumaro (datumaro's pins clash with the project's), called by
tests/exports/test_exports.py:  python tests/datumaro_import.py ARCHIVE.zip FORMAT
FORMAT: coco_instances | coco_person_keypoints | cvat. Prints one JSON object:
  {"labels": [names], "items": {COCO image id (CVAT: frame number): [annotation, ...]}}
where an annotation is {"type", "label", "group", "score", and "rle" (masks: COCO compressed
RLE of the mask datumaro decoded) or "points" (polygons and keypoints), and "track_id" where
the annotation has one (CVAT tracks; COCO's attributes)}.
"""

import json
import sys
import tempfile
import zipfile

import datumaro as dm
import numpy as np
from pycocotools import mask as mask_util


def main(archive: str, fmt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        dataset = dm.Dataset.import_from(tmp, fmt)
        labels = [c.name for c in dataset.categories()[dm.AnnotationType.label]]
        items = {}
        for item in dataset:
            anns = []
            for ann in item.annotations:
                out = {"type": type(ann).__name__, "label": labels[ann.label] if ann.label is not None else None,
                       "group": ann.group, "score": ann.attributes.get("score"),
                       "track_id": ann.attributes.get("track_id")}
                if isinstance(ann, dm.Mask):
                    mask = np.asfortranarray(ann.image.astype(np.uint8))
                    out["rle"] = mask_util.encode(mask)["counts"].decode("ascii")
                elif isinstance(ann, (dm.Polygon, dm.Points)):
                    out["points"] = [float(v) for v in ann.points]
                    if isinstance(ann, dm.Points):
                        out["visibility"] = [int(v) for v in ann.visibility]
                anns.append(out)
            items[str(item.attributes["id"] if "id" in item.attributes else item.attributes["frame"])] = anns
    print(json.dumps({"labels": labels, "items": items}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

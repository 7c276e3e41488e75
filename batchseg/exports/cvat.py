"""CVAT import archives: "COCO 1.0" (instances with masks) and "COCO Keypoints 1.0" (skeletons).

DEST gets cvat_coco_instances.zip (annotations/instances_default.json) and
cvat_coco_keypoints.zip (annotations/person_keypoints_default.json), the layouts CVAT's
importers read. Masks stay COCO RLE, which CVAT imports as mask shapes, or become polygons
with `polygons=True` (exports.polygons). They hold the dataset form of export_coco: instances
with an empty mask are left out and counted. Image file_names are relative to the run's input
folders: create the CVAT task from the same folder layout.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path
from typing import Any

import fsspec

from batchseg.exports.coco import export_coco
from batchseg.store.results import Results

ARCHIVES = {  # COCO file -> (archive, member path CVAT looks for)
    "instances.json": ("cvat_coco_instances.zip", "annotations/instances_default.json"),
    "person_keypoints.json": ("cvat_coco_keypoints.zip", "annotations/person_keypoints_default.json"),
}


def export_cvat(results: Results, dest: str, storage_options: dict[str, Any] | None = None,
                polygons: bool = False) -> dict[str, Any]:
    """Returns export_coco's summary with the archives as "files" (annotations per archive)."""
    written = {}
    with tempfile.TemporaryDirectory(prefix="batchseg-cvat-") as tmp:
        summary = export_coco(results, tmp, only=set(ARCHIVES), polygons=polygons)
        for coco_name, count in summary["files"].items():
            archive, member = ARCHIVES[coco_name]
            local = Path(tmp) / archive
            with zipfile.ZipFile(local, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.write(Path(tmp) / coco_name, member)
                zf.writestr("images/", "")  # annotations only; datumaro's COCO importer wants the folder
            fs, path = fsspec.core.url_to_fs(f"{dest.rstrip('/')}/{archive}", **(storage_options or {}))
            fs.makedirs(fs._parent(path), exist_ok=True)
            fs.put_file(str(local), path)
            written[archive] = count
    return {**summary, "files": written}

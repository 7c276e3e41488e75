"""Test-only parts that fail on purpose, importable by Ray workers: a backend that kills its
process on one image, a sink whose first write task dies after it committed."""

from __future__ import annotations

import os

from batchseg.predictors.base import ModelInput
from batchseg.store.sink import RunSink
from tests.oracle import ColorKeyBackend


class KillsOnNarrowImages(ColorKeyBackend):
    """The oracle, except that an image options["width"] pixels wide kills the process
    (os._exit, as a segfault would) every time it is predicted."""

    def __init__(self, cfg, weights, device, precision) -> None:
        super().__init__(cfg, weights, device, precision)
        self.width = int(cfg.options["width"])

    def predict(self, images: list[ModelInput]):
        if any(x.width == self.width for x in images):
            os._exit(1)
        return super().predict(images)


class DiesAfterCommit(RunSink):
    """RunSink whose first write task kills its worker right after committing its files, so
    Ray retries a task that already wrote (marker: a file made once, atomically)."""

    def __init__(self, *args, marker: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.marker = marker

    def write(self, blocks, ctx):
        counts = super().write(blocks, ctx)
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return counts
        os._exit(1)

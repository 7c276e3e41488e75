"""`batchseg.results.open_results`, as readers wrote it before the packages: the reader lives in
batchseg.store.results."""

from batchseg.store.results import Results, open_results

__all__ = ["Results", "open_results"]

"""The output folder: how a run writes it exactly once, and how everything else reads it back.

- `storage`: local or s3:// paths, atomic writes (a failed upload leaves nothing visible).
- `sink`: the Ray Data sink a run writes annotations and ledger parts through.
- `ledger`: compact keys of what is done, read to plan the next run.
- `lease`: one writer per output at a time, with a write fence.
- `results`: `open_results(OUTPUT)`, the reader every export, eval and render uses (also
  importable as `batchseg.results.open_results`); `reviews=True` merges in the reviews.
- `reviews`: the reviews dataset (people's labels pulled back): `PullWriter`, `open_reviews`.

May import: batchseg.config, batchseg.errors, batchseg.inputs, batchseg.rows.
"""

"""One annotation run, from a config to a committed output.

- `job`: `run(JobConfig)`: plan (inputs, what is done), start the pipeline, commit, report.
- `pipeline`: the Ray Data graph, top to bottom as the data flows.
- `stages`: each stage as a plain function or class, testable without Ray.
- `report`, `provenance`: run.json, fingerprints, model versions.
- `failures`: error kinds and the failure budget; `inflight`: the journal that turns an image
  that kills its worker into an error row.

May import: everything below it (config, errors, inputs, predictors, rows, store).
"""

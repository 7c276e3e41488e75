"""Entrypoint for `ray job submit`, training on the cluster:

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train-s3.yaml

Takes the same flags as `batchseg train`. Inside a submitted job RAY_ADDRESS points at the
cluster, so the training attaches to it instead of starting a local Ray.
"""

import sys
from pathlib import Path

# `python jobs/train.py` puts jobs/ on sys.path, not the working dir that holds batchseg/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchseg.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

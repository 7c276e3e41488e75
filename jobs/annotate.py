"""Entrypoint for `ray job submit`:

    ray job submit --working-dir . -- python jobs/annotate.py --config jobs/configs/local-demo.yaml

Takes the same flags as `batchseg run`. Inside a submitted job RAY_ADDRESS points at the
cluster, so the run attaches to it instead of starting a local Ray.
"""

import sys
from pathlib import Path

# `python jobs/annotate.py` puts jobs/ on sys.path, not the working dir that holds batchseg/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchseg.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))

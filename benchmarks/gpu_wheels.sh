#!/usr/bin/env bash
# Fill benchmarks/wheels/ (under 20 MiB) with what benchmarks/gpu.py needs beyond a bare GPU
# machine's torch, torchvision, numpy, pillow and pyarrow: batchseg's hot path imports
# pycocotools (RLE; compiled), pydantic + pydantic-core (the job config; compiled), PyYAML,
# fsspec and filelock (the input and weights modules the predictor stage imports), and
# pydantic's own small dependencies. Run it on a machine with a registry; gpu.py installs from
# the folder with `pip install --no-index --no-deps --target benchmarks/wheels/site`.
#
#   benchmarks/gpu_wheels.sh [PYTHON_VERSIONS]     default: "3.10 3.11 3.12 3.13", linux x86_64
#
# Compiled wheels are fetched once per Python version (the GPU machine's is not known here);
# --no-deps keeps numpy (pycocotools depends on it; the bare machine has it) out of the folder.
# The versions are the ones pyproject.toml's ranges resolve to today, pinned so that two GPU
# runs compare like with like.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/wheels"
versions="${1:-3.10 3.11 3.12 3.13}"
pure=(pydantic==2.14.4 annotated-types==0.8.0 typing-extensions==4.16.0 typing-inspection==0.4.5
      fsspec==2026.9.0 filelock==4.3.2)
compiled=(pycocotools==2.0.11 pydantic-core==2.50.5 PyYAML==6.0.4)
mkdir -p "$out"
pip download --quiet --no-deps --only-binary=:all: -d "$out" "${pure[@]}"
for v in $versions; do
  pip download --quiet --no-deps --only-binary=:all: -d "$out" --implementation cp --python-version "$v" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    "${compiled[@]}"
done
size=$(du -sk --exclude=site "$out" | cut -f1)
echo "$out: $(ls "$out"/*.whl | wc -l) wheels, $((size / 1024)) MiB"
if [ "$size" -ge $((20 * 1024)) ]; then
  echo "gpu_wheels.sh: the folder is over 20 MiB" >&2
  exit 1
fi

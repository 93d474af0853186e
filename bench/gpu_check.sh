#!/bin/sh
# The GPU check (bench/gpu_check.py) where only PyTorch, grpcio and numpy are installed, such as
# the lent GPU machine: run from the repository root after `make gpu-check-wheels` here, carrying
# `.whl` (pdserve's small pure-Python dependencies, about 3 MiB) with the working tree. Prints one
# JSON line; exits non-zero when a byte arrived wrong.
set -eu
site=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
PYTHONPATH="$site:$PWD" exec python3 -m pdserve.bench.gpu_check "$@"

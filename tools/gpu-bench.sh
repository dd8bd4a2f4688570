#!/usr/bin/env bash
# On the offline GPU machine (CUDA torch preinstalled): install the carried wheels of the locked
# transformers and its dependencies (`make gpu-wheels`, the folder .whl/) over the image's packages,
# then run `python -m ficoco.gpu_bench` with the arguments given. docs/bench.md, "GPU run (H200)".
#
# Why --target and PYTHONPATH, not a venv: the image's python3 is itself a venv (/opt/torch/.venv), and a
# venv made from it with --system-site-packages sees the base interpreter's packages, not its CUDA torch.
# The project runs from the source tree (PYTHONPATH), so nothing needs building there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/ficoco-site}
if [ ! -f .whl/requirements.txt ]; then
    echo "gpu-bench: no .whl/requirements.txt: run 'make gpu-wheels' on a machine with internet and carry .whl" >&2
    exit 2
fi
# exact pins, each wheel checked against the lock's hashes; --no-deps: the wheels are the whole closure
"$PYTHON" -m pip install --quiet --no-index --find-links .whl --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" --requirement .whl/requirements.txt
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" -m ficoco.gpu_bench "$@"

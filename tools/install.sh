#!/usr/bin/env bash
# Install ficoco from the lock into the Python environment of the interpreter given (default: python3).
# Called by `make` (into .venv) and usable in any environment, e.g. a cluster's conda env:
#   tools/install.sh "$(command -v python)"
# 1. every dependency, pinned with hashes (requirements/lock.txt, pip's hash-checking mode);
# 2. torch by version (requirements/torch.txt): the CPU build on CPU machines, CUDA from PyPI elsewhere;
# 3. the project itself, editable, without touching the pins; then `pip check`.
# pip, not uv: uv does not see the machine's local CPU torch wheel and downloads a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$version" != "3.11" ]; then
  echo "install: $python is Python $version; the lock (requirements/lock.txt) is for Python 3.11" >&2
  exit 2
fi
"$python" -m pip install -q --require-hashes -r requirements/lock.txt
"$python" -m pip install -q -r requirements/torch.txt
"$python" -m pip install -q --no-deps -e .
"$python" -m pip check

#!/usr/bin/env bash
# Drift check for maintainers (`make check-latest`): a throwaway venv with the newest versions that
# pyproject.toml allows -- no lock -- then the adapter and end-to-end tests on it, so a bump is tried
# before it is locked. torch stays at requirements/torch.txt (on CPU machines the only CPU build).
# The transformers guard is overridden so an untested transformers runs its self-check instead of
# stopping. Prints the versions that differ from the lock, then the tests' result.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
venv=.venv-latest
"$python" -m venv --clear "$venv"
"$venv/bin/pip" install -q -r requirements/torch.txt
"$venv/bin/pip" install -q --upgrade --upgrade-strategy eager -c requirements/torch.txt -e ".[test]"
echo "check-latest: versions that differ from requirements/lock.txt:"
"$venv/bin/python" tools/lock.py --diff
FICOCO_ALLOW_UNTESTED_TRANSFORMERS=1 PATH="$PWD/$venv/bin:$PATH" "$venv/bin/python" -m pytest -q \
  tests/test_llava_adapter.py tests/test_selfcheck.py tests/test_ficoco_methods.py tests/test_baselines_llm.py \
  tests/test_prumerge_adaptive.py tests/test_workflow.py

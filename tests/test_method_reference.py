"""Every registered method gives bit-identical outputs (logits, generated tokens, counts, kept
positions) to the reference its code produced before the method/adapter contract was refactored
(tests/method_reference.py says how the reference was made and how to regenerate it)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from method_reference import ENVIRONMENT, REFERENCE, SETTINGS

from ficoco import methods


def test_the_reference_covers_every_registered_method():
    stored = json.loads(REFERENCE.read_text())["methods"]
    assert sorted(stored) == sorted(SETTINGS) == sorted(methods.names())


def test_every_method_reproduces_its_reference_bit_for_bit():
    script = Path(__file__).resolve().parent / "method_reference.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, **ENVIRONMENT})
    assert result.returncode == 0, result.stderr[-3000:]
    now = json.loads(result.stdout)
    reference = json.loads(REFERENCE.read_text())
    changed = {method: [name for name, value in entry["tensors"].items()
                        if now[method]["tensors"].get(name) != value]
               + (["counts"] if now[method]["counts"] != entry["counts"] else [])
               + sorted(set(now[method]["tensors"]) - set(entry["tensors"]))
               for method, entry in reference["methods"].items()}
    changed = {method: names for method, names in changed.items() if names}
    assert not changed, f"outputs differ from the reference of commit {reference['commit']}: {changed}"

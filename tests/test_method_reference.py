"""Every registered method gives bit-identical outputs (logits, generated tokens, counts, kept
positions) to the reference its code produced before the method/adapter contract was refactored
(tests/method_reference.py says how the reference was made and how to regenerate it). On a
processor other than the reference's, the float logits are compared to float32 rounding and
everything else still exactly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from method_reference import ENVIRONMENT, REFERENCE, SETTINGS, decode_floats

from ficoco import methods

FLOAT_TENSORS = ("prefill_logits", "generate_logits")     # digests only on the reference's own platform


def test_the_reference_covers_every_registered_method():
    stored = json.loads(REFERENCE.read_text())["methods"]
    assert sorted(stored) == sorted(SETTINGS) == sorted(methods.names())


def test_every_method_reproduces_its_reference_bit_for_bit():
    script = Path(__file__).resolve().parent / "method_reference.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, **ENVIRONMENT})
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(result.stdout)
    now, reference = run["methods"], json.loads(REFERENCE.read_text())
    same_platform = run["platform"] == reference["platform"]

    def differs(method: str, name: str, value: str) -> bool:
        if same_platform or name not in FLOAT_TENSORS:
            return now[method]["tensors"].get(name) != value
        key = "prefill_last" if name == "prefill_logits" else name
        return not torch.allclose(decode_floats(now[method]["values"][key]),
                                  decode_floats(reference["methods"][method]["values"][key]), rtol=1e-5, atol=1e-5)

    changed = {method: [name for name, value in entry["tensors"].items() if differs(method, name, value)]
               + (["counts"] if now[method]["counts"] != entry["counts"] else [])
               + sorted(set(now[method]["tensors"]) - set(entry["tensors"]))
               for method, entry in reference["methods"].items()}
    changed = {method: names for method, names in changed.items() if names}
    where = "bit for bit" if same_platform else f"to float32 rounding (reference made on {reference['platform']})"
    assert not changed, f"outputs differ from the reference of commit {reference['commit']}, {where}: {changed}"

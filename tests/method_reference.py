"""Every registered method's outputs on one LLaVA-1.5-shaped tiny model, as digests: the reference
that shows a refactor of the method/adapter contract changes no number (issue 18).

`outputs(method)` runs one method (prefill logits, a short greedy generation with its logits, the
recorded counts and kept positions); `digest(...)` turns them into sha256 hex digests of the raw
tensor bytes (bit-identical or not). `tests/data/method_reference.json` holds the digests the code
at its `commit` produced; regenerate it (only for an intended change of numbers) with

    OMP_NUM_THREADS=1 MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default python tests/method_reference.py --write

The environment pins what could make bit patterns differ between machines: one thread (reduction
order), MKL's conditional numerical reproducibility and ATen's portable CPU kernels (no
AVX2 / AVX-512 dispatch). tests/test_method_reference.py runs the methods in a subprocess with it.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_tiny import images, llava_shaped, n_placeholders, prompt  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "data" / "method_reference.json"
ENVIRONMENT = {"OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default"}
SPARSE = {"layers": [0, 1, 2], "keeps": [300, 100, 20]}
# counts keys recorded since these digests were made, checked against FlopCounterMode elsewhere
# (tests/test_overhead.py, tests/test_flops_crosscheck.py): the references pin the numbers, not them
ADDED_COUNTS = ("overhead_macs", "projector_tokens")
# method -> (budget, overrides) on llava_shaped(vision_layers=5, llm_layers=4, llm_kv_heads=2): LLaVA
# reads vision layer 3 (layers 0..3 run), 4 LLM layers, 576 visual tokens
SETTINGS = {
    "vanilla": (None, {}),
    "ficoco-v": (128, {"start": 1}),
    "ficoco-l": (300, {"start": 1, "window": 2}),
    "ficoco-vl": (300, {"v_start": 1, "l_start": 1, "l_window": 2}),
    "ficoco-v-official": (450, {"start": 1}),
    "ficoco-v-code": (200, {"start": 1}),
    "tome": (128, {}),
    "evit": (64, {"layers": [1, 2, 3]}),
    "downsample": (64, {}),
    "fastv": (300, {}),
    "fastv-keepb": (128, {}),
    "pdrop": (200, {"boundaries": [1, 2, 3]}),
    "pdrop-official": (None, {"boundaries": [1, 2, 3]}),
    "dart": (300, {}),
    "sparsevlm": (128, SPARSE),
    "sparsevlm-matched": (200, SPARSE),
    "visionzip": (64, {}),
    "vispruner": (64, {}),
    "prumerge": (64, {}),
    "prumerge-plus": (64, {}),
    "prumerge-adaptive": (None, {}),
    "prumerge-plus-adaptive": (None, {}),
    "topk-cls": (64, {}),
    "random": (64, {}),
    "pooling": (64, {}),
    "divprune": (64, {}),
    "vscan": (128, {"local_layer": 1}),
}


def model():
    return llava_shaped(vision_layers=5, llm_layers=4, llm_kv_heads=2)


def outputs(shaped, method: str) -> dict:
    """What one method produces on a fixed prompt and image: tensors and the recorded counts."""
    import ficoco

    budget, overrides = SETTINGS[method]
    ids = torch.tensor([prompt(n_placeholders(shaped), [10, 11], [12, 13, 14])])
    mask, pixels = torch.ones_like(ids), images(1, 336, seed=3)
    with ficoco.apply(shaped, method, budget, **overrides) as handle, torch.no_grad():
        logits = shaped(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        counts = handle.last_counts()
        trace = handle.last_trace()
        generated = shaped.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                                    do_sample=False, output_logits=True, return_dict_in_generate=True)
    tensors = {"prefill_logits": logits, "sequences": generated.sequences,
               "generate_logits": torch.stack(generated.logits, 1)}
    tensors.update({f"trace_vision_{layer}": positions for layer, positions in trace["vision"].items()})
    tensors.update({f"trace_llm_{layer}": positions for layer, positions in trace["llm"].items()})
    return {"tensors": tensors, "counts": counts}


def digest(tensor: torch.Tensor) -> str:
    """sha256 of the tensor's dtype, shape and raw bytes."""
    data = tensor.detach().contiguous().cpu()
    header = f"{data.dtype}{tuple(data.shape)}".encode()
    return hashlib.sha256(header + data.numpy().tobytes()).hexdigest()


def digests() -> dict:
    shaped = model()
    result = {}
    for method in SETTINGS:
        out = outputs(shaped, method)
        counts = [{key: value for key, value in row.items() if key not in ADDED_COUNTS} for row in out["counts"]]
        result[method] = {"tensors": {name: digest(tensor) for name, tensor in sorted(out["tensors"].items())},
                          "counts": counts}
    return result


def main(argv: list[str]) -> int:
    result = digests()
    if "--write" in argv:
        from importlib.metadata import version

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
        REFERENCE.write_text(json.dumps({"commit": commit, "torch": version("torch"),
                                         "transformers": version("transformers"), "methods": result},
                                        indent=1, sort_keys=True) + "\n")
    else:
        json.dump(result, sys.stdout, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

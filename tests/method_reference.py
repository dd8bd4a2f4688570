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
That is not enough across processors: on another CPU model the same code gave float logits that
differ in the last bits (2026-12-02, every method, vanilla included). So the reference also keeps
the float outputs themselves (`values`: the last prefill position's logits and every generated
step's, float32 bytes in base64) and the `platform` it was made on: on that platform the test
requires the digests bit for bit; on another one integer outputs (tokens, kept positions) and
counts exactly and the float values to float32 rounding.
"""
from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_tiny import images, llava_shaped, n_placeholders, prompt, text_tower_for  # noqa: E402

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
    "cdpruner": (64, {}),
    "vscan": (128, {"local_layer": 1}),
    "fitprune": (300, {"deletions": [300, 150, 50, 0]}),          # attention sees 576, 276, 126, 76
}


def model():
    return llava_shaped(vision_layers=5, llm_layers=4, llm_kv_heads=2)


def outputs(shaped, method: str) -> dict:
    """What one method produces on a fixed prompt and image: tensors and the recorded counts."""
    import ficoco

    budget, overrides = SETTINGS[method]
    ids = torch.tensor([prompt(n_placeholders(shaped), [10, 11], [12, 13, 14])])
    mask, pixels = torch.ones_like(ids), images(1, 336, seed=3)
    with ficoco.apply(shaped, method, budget, text_tower=text_tower_for(shaped, method), **overrides) as handle, \
            torch.no_grad():
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


def encode_floats(tensor: torch.Tensor) -> str:
    """float32 values as base64 (compact and exact)."""
    return base64.b64encode(tensor.detach().float().contiguous().cpu().numpy().tobytes()).decode()


def decode_floats(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.float32)


def platform() -> str:
    """What decides float bit patterns besides the pinned environment: the processor and torch."""
    from importlib.metadata import version

    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return f"{names[0] if names else 'unknown cpu'}; torch {version('torch')} {torch.backends.cpu.get_cpu_capability()}"


def digests() -> dict:
    shaped = model()
    result = {}
    for method in SETTINGS:
        out = outputs(shaped, method)
        counts = [{key: value for key, value in row.items() if key not in ADDED_COUNTS} for row in out["counts"]]
        tensors = out["tensors"]
        result[method] = {"tensors": {name: digest(tensor) for name, tensor in sorted(tensors.items())},
                          "counts": counts,
                          "values": {"prefill_last": encode_floats(tensors["prefill_logits"][:, -1]),
                                     "generate_logits": encode_floats(tensors["generate_logits"])}}
    return {"platform": platform(), "methods": result}


def main(argv: list[str]) -> int:
    result = digests()
    if "--write" in argv:
        from importlib.metadata import version

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
        REFERENCE.write_text(json.dumps({"commit": commit, "torch": version("torch"),
                                         "transformers": version("transformers"), **result},
                                        indent=1, sort_keys=True) + "\n")
    else:
        json.dump(result, sys.stdout, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

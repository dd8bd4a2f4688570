"""Fake results trees for the report tests: a handful of metrics.json and measure JSON files with
plausible numbers (LLaVA-1.5-7B-like costs, scores in percent)."""
from __future__ import annotations

import json
from pathlib import Path

LLM_LAYERS = 32
VISUAL_FULL = 576
PHASES = {"vanilla": "none", "ficoco-v": "vision", "ficoco-l": "llm", "fastv": "llm"}


def per_layer_tokens(method: str, budget) -> list[float]:
    """A schedule shaped like the method's: constant for vision methods, a drop inside the LLM otherwise."""
    if budget == "full":
        return [float(VISUAL_FULL)] * LLM_LAYERS
    if PHASES[method] == "vision":
        return [float(budget)] * LLM_LAYERS
    start = 2 if method == "fastv" else 4
    kept = (budget * LLM_LAYERS - VISUAL_FULL * start) / (LLM_LAYERS - start)
    return [float(VISUAL_FULL)] * start + [kept] * (LLM_LAYERS - start)


def metrics_json(model: str, benchmark: str, method: str, budget, score, **extra) -> dict:
    per_layer = per_layer_tokens(method, budget)
    average = sum(per_layer) / len(per_layer)
    total_tflops = 0.35 + 0.0148 * (average + 60)
    return {
        "job": {"model": model, "method": method, "phase": PHASES[method], "budget": str(budget),
                "benchmark": benchmark, "shards": 1},
        "metrics": {"score": score, "accuracy": None if score is None else score - 1.5,
                    "per_category": {"adversarial": {"f1": 80.0}, "name": "not a number"}},
        "headline": "score",
        "samples": 200,
        "failures": 0,
        "cost_mean": {"total_flops": total_tflops * 1e12, "prefill_flops": (total_tflops - 0.5) * 1e12,
                      "vision_flops": 0.35e12, "decode_flops": 0.15e12, "overhead_flops": 0.002e12 * (average < 576),
                      "legacy_nominal_tflops": 2 * LLM_LAYERS * (average + 60) * 2.0e8 / 1e12},
        "visual_tokens": {"layer_average": average, "per_layer": per_layer, "delivered": per_layer[0]},
        "latency": {"mean_s_per_sample": 0.05 + average * 1e-4, "total_s": 10.0},
        **extra,
    }


def write_run(root: Path, data: dict) -> Path:
    job = data["job"]
    path = Path(root) / "runs" / job["model"] / job["benchmark"] / job["method"] / f"b{job['budget']}" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_predictions(metrics_path: Path, score: float, samples: int = 200) -> Path:
    """The shard predictions beside a metrics.json: `samples` records whose scores average `score` / 100
    (0/1 scores plus one fractional one), the correct ones spread by a rotation that depends on the score,
    so methods agree on some samples and disagree on others."""
    correct = score / 100.0 * samples
    whole = int(correct)
    offset = int(score * 7) % samples
    scores = [0.0] * samples
    for position in range(whole):
        scores[(offset + position) % samples] = 1.0
    if whole < samples:
        scores[(offset + whole) % samples] = correct - whole
    path = metrics_path.parent / "shard0of1" / "predictions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as stream:
        for row, value in enumerate(scores):
            stream.write(json.dumps({"id": f"q{row:03d}", "row": row, "answers": ["yes"], "error": None,
                                     "prediction": "yes" if value == 1.0 else "no", "score": value}) + "\n")
    return path


def write_measure(root: Path, model: str, method: str, budget, prefill_s: float, end_to_end_s: float,
                  **extra) -> Path:
    """The layout `ficoco measure` writes: medians at the top level, the repeats under "latency"."""
    path = Path(root) / "measure" / model / method / f"b{budget}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    per_token_s = (end_to_end_s - prefill_s) / 16
    path.write_text(json.dumps({
        "job": {"model": model, "method": method, "budget": budget if budget == "full" else int(budget)},
        "prefill_s": prefill_s, "per_token_s": per_token_s, "end_to_end_s": end_to_end_s,
        "latency": {"prefill_s": [prefill_s * f for f in (0.9, 1.0, 1.2)],
                    "per_token_s": [per_token_s] * 3, "end_to_end_s": [end_to_end_s * f for f in (0.95, 1.0, 1.1)]},
        "peak_memory_bytes": int(15.2 * 2**30),
        "throughput": 1.0 / end_to_end_s,
        "throughput_unit": "samples/s (one image per sample)",
        "device_name": "NVIDIA H100 80GB HBM3", "dtype": "float16", "attn_implementation": "sdpa",
        "versions": {"ficoco": "0.1.0", "torch": "2.13.0", "transformers": "5.24.0"},
        **extra,
    }))
    return path


# model -> method -> budget -> benchmark -> score
# "mme" here has percent-like stand-in values (its predictions' scores average them); the report leaves MME out of
# Avg by its registered scale (points), whatever the values.
SCORES = {
    "llava-1.5-7b": {
        "vanilla": {"full": {"scienceqa": 69.9, "textvqa": 58.0, "pope": 86.0, "mme": 75.0}},
        "ficoco-v": {192: {"scienceqa": 68.0, "textvqa": 56.0, "pope": 83.0, "mme": 72.0},
                     64: {"scienceqa": 68.5, "textvqa": 55.0, "pope": 80.0, "mme": 70.0}},
        "ficoco-l": {192: {"scienceqa": 69.0, "textvqa": 56.5, "pope": 84.0, "mme": 71.0},
                     128: {"scienceqa": 69.3, "textvqa": 56.2, "pope": 84.1}},
        "fastv": {192: {"scienceqa": 67.0, "textvqa": 52.0, "pope": 65.0, "mme": 60.0}},
    },
}


def write_results_tree(root: Path, with_measure: bool = True, with_predictions: bool = True) -> Path:
    for model, methods in SCORES.items():
        for method, budgets in methods.items():
            for budget, scores in budgets.items():
                for benchmark, score in scores.items():
                    metrics = write_run(root, metrics_json(model, benchmark, method, budget, score))
                    if with_predictions:
                        write_predictions(metrics, score)
                if with_measure:
                    average = sum(per_layer_tokens(method, budget)) / LLM_LAYERS
                    write_measure(root, model, method, budget, prefill_s=0.02 + average * 1.5e-4,
                                  end_to_end_s=0.35 + average * 1.6e-4)
    return Path(root)

"""`ficoco gpu-bench`: vanilla and every method at 192 / 128 / 64 visual tokens on LLaVA-1.5-7B's exact
shape with random weights, bf16 and SDPA on one GPU: prefill latency, end-to-end throughput at batch 1 and
batch 16 (32 new tokens), peak memory, and each measured speedup beside the one the FLOPs formulas predict
from the token counts the run executed. docs/bench.md, "GPU run (H200)", has the commands and the goals.

The model is built once (`ficoco.measure.build_random_model`; speed does not depend on the weights) and
every configuration is installed on it with `ficoco.apply` and removed afterwards. The prompt is
synthetic (`ficoco.measure.synthetic_inputs`): BOS + 29 text tokens + 576 image placeholders + 30
instruction tokens = 636 tokens, one random image, no padding.

Settings. `--shape llava-7b` runs every method with its defaults and the paper grid's per-budget
parameters (config/paper.yaml `method_params`, e.g. FiCoCo-L at 64 starts at layer 2 with window 2: its
default start 4 cannot average 64). `--shape tiny` (the CPU test) scales the layer settings to its
4-layer stacks as `ficoco bench` does (`ficoco.bench.scaled_overrides`). A budget a method cannot reach is
listed, not run; a method with no budget (adaptive, or a fixed published schedule) runs once at its own.

Attention. Every layer runs SDPA (on an H200 in bf16, PyTorch's FlashAttention or cuDNN kernel). A method
whose scores need attention probabilities gets them from the adapter: FiCoCo-V's reducing CLIP layers
compute their attention explicitly once, LLM-side scores are recomputed from the layer's q/k rows; that
cost is inside the measured times.

Timing, per configuration: `--warmup` untimed runs of each measurement, then the prefill (one forward with
a fresh KV cache and logits for the last position only, what `generate` runs before its first token) at
batch 1, median of `--prefill-repeats`; then a greedy generation of exactly 32 new tokens at batch 1 and
batch 16, median of `--generate-repeats` each, as images per second. `--decode` chooses how it decodes:
`graph` (the default on a GPU) on a static KV cache with each step after the second replayed as one CUDA graph
(`ficoco.models.static_decode`; the capture is inside the timed call), `static` the same without graphs (the
default on a CPU), `generate` HF `generate` with its dynamic cache, eagerly (the first H200 run). The batch-16
rows repeat the batch-1 sample, so an adaptive method keeps the same count in every row (rows without
padding, which a static decode needs) and each row does the counted work. With `graph`, each configuration
first decodes one batch-1 generation both ways, untimed, and the table says whether the replays gave the eager
steps' tokens (`graph_check`). A GPU is synchronised around each
timed call. Peak memory: `torch.cuda.max_memory_allocated` over the batch-16 runs (weights included; reset
before them); on a CPU the process's lifetime peak RSS, an upper bound shared by every row. Vanilla runs
first and last (pooled; the drift between them is printed). `--time-limit` stops starting new
configurations once that many seconds have passed since the start; the two vanilla runs always run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ficoco.bench import append_profile, prefill_macs
from ficoco.measure import DTYPES

# LLaVA-shaped models, 336 px / patch 14: 577 tokens in the tower, 576 image tokens for the LLM
SHAPES = {
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 layers, LLaVA reads layer -2; 16 heads of 64) and Vicuna-7B
    # (32 layers, 32 heads of 128, SwiGLU MLP 11008), vocabulary 32000
    "llava-7b": dict(vision_layers=24, vision_hidden=1024, vision_mlp=4096, vision_heads=16,
                     llm_layers=32, llm_hidden=4096, llm_mlp=11008, llm_heads=32),
    # the CPU test's model: the same token geometry, 4 + 4 narrow layers
    "tiny": dict(vision_layers=4, vision_hidden=64, vision_mlp=256, vision_heads=4,
                 llm_layers=4, llm_hidden=64, llm_mlp=128, llm_heads=4),
}
PAPER_MODEL = "llava-1.5-7b"        # its per-budget parameters in config/paper.yaml apply to the llava-7b shape
BATCH_SIZES = (1, 16)
NEW_TOKENS = 32
PROMPT_TOKENS = 60                  # text tokens around the image, BOS included (config/models.yaml text_tokens)
SEED = 0
GOALS = {"ficoco-v": 2.2, "ficoco-l": 2.0}   # issue 20: batch-16 throughput × at 64 tokens on an H200
GOAL_BUDGET = 64


def shape_config(shape: str):
    """The LlavaConfig of a named shape, as llava-hf/llava-1.5-7b-hf is built (GELU projector, features of
    the second-to-last CLIP layer without CLS), with the image token inside the 32000-word vocabulary."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r}: valid shapes are {list(SHAPES)}")
    size = SHAPES[shape]
    vision = CLIPVisionConfig(hidden_size=size["vision_hidden"], intermediate_size=size["vision_mlp"],
                              num_hidden_layers=size["vision_layers"], num_attention_heads=size["vision_heads"],
                              image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(vocab_size=32000, hidden_size=size["llm_hidden"], intermediate_size=size["llm_mlp"],
                       num_hidden_layers=size["llm_layers"], num_attention_heads=size["llm_heads"],
                       num_key_value_heads=size["llm_heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000 - 1, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu")


def overrides_for(shape: str):
    """`overrides(method, dims, budget, fixed)` of `ficoco.bench.bench_configs`: at the 7B shape the paper
    grid's parameters for LLaVA-1.5-7B (config/models.yaml < config/paper.yaml, per budget), on tiny the
    layer settings scaled to its depth."""
    from ficoco.bench import scaled_overrides
    from ficoco.config import REPO_ROOT, method_overrides, read_yaml_file

    if shape != "llava-7b":
        return scaled_overrides
    grid = read_yaml_file(REPO_ROOT / "config" / "paper.yaml")
    models = read_yaml_file(REPO_ROOT / "config" / "models.yaml")

    def paper_overrides(method, dims, budget, fixed):
        label = "full" if budget is None else str(budget)
        return {**method_overrides(grid, models, PAPER_MODEL, method, label), **(fixed or {})}
    return paper_overrides


def generate_macs(dims, counts: dict) -> float:
    """Everything one sample's `generate` with NEW_TOKENS new tokens computes (prefill and 31 decode steps)."""
    from ficoco.flops import sample_cost

    return sample_cost(dims, counts, generated_tokens=NEW_TOKENS)["total_macs"]


DECODES = ("graph", "static", "generate")
DECODE_WORDS = {"graph": "static KV cache, each step a replayed CUDA graph",
                "static": "static KV cache, eager steps", "generate": "HF generate, dynamic KV cache, eager steps"}


def _timed_decode(model, inputs: dict, decode: str, cuda: bool) -> dict:
    """One greedy generation of NEW_TOKENS tokens, timed as `measure._timed_generate` times `generate`: time to
    the first token, mean seconds per later token, end to end (to the last token); `step_s` every later token's
    own seconds."""
    from ficoco.measure import _StepClock, _timed_generate
    from ficoco.models.static_decode import greedy_decode

    if decode == "generate":
        return _timed_generate(model, inputs, NEW_TOKENS, cuda)
    clock = _StepClock(cuda)
    clock.mark()                                                   # start
    greedy_decode(model, inputs["input_ids"], inputs["pixel_values"], NEW_TOKENS,
                  attention_mask=inputs.get("attention_mask"), graph=decode == "graph", on_token=clock.mark)
    marks = clock.seconds()                                        # [token 1, ..., token G]: G the end
    if len(marks) != NEW_TOKENS:
        raise RuntimeError(f"greedy_decode marked {len(marks)} tokens; expected {NEW_TOKENS}")
    steps = [later - earlier for earlier, later in zip(marks, marks[1:])]
    return {"prefill_s": marks[0], "per_token_s": (marks[-1] - marks[0]) / (NEW_TOKENS - 1),
            "end_to_end_s": marks[-1], "step_s": steps}


def graph_check(model, inputs: dict) -> dict:
    """One generation decoded with CUDA graph replays and one with eager steps, on a static cache both: the
    replays run the kernels the capture recorded, so the tokens and logits are expected to be the same bit for bit.
    Returns whether the tokens are, the largest logit difference, and `passed`: both the same (random weights give
    close top logits, so equal tokens alone would pass a replay that computes slightly other logits)."""
    import torch

    from ficoco.models.static_decode import greedy_decode

    graphed, eager = (greedy_decode(model, inputs["input_ids"], inputs["pixel_values"], NEW_TOKENS,
                                    attention_mask=inputs.get("attention_mask"), graph=graph) for graph in (True, False))
    tokens_equal = bool(torch.equal(graphed.tokens, eager.tokens))
    difference = float((graphed.logits.float() - eager.logits.float()).abs().max())
    return {"tokens_equal": tokens_equal, "max_logit_difference": difference,
            "passed": tokens_equal and difference == 0.0}


def combined_check(checks: list[dict | None]) -> dict | None:
    """The graph checks of several runs of one configuration (vanilla's first and last) as one: passed only if each
    passed, its largest difference."""
    checks = [check for check in checks if check is not None]
    if not checks:
        return None
    return {"tokens_equal": all(check["tokens_equal"] for check in checks),
            "max_logit_difference": max(check["max_logit_difference"] for check in checks),
            "passed": all(check["passed"] for check in checks), "runs": len(checks)}


def _prefill_seconds(model, inputs: dict, synchronize) -> float:
    import torch

    synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model(**inputs, logits_to_keep=1, use_cache=True)
    synchronize()
    return time.perf_counter() - start


def run_config(model, inputs: dict, method: str, budget, overrides: dict, args, cuda: bool, text_tower=None) -> dict:
    """One configuration: warm-up, prefill repeats at batch 1, generate repeats at each batch size.
    inputs: batch size -> model inputs (input_ids (B, 636), pixel_values (B, 3, 336, 336)); text_tower:
    the CLIP text tower of a method that reads the instruction."""
    import torch

    import ficoco
    from ficoco.invariants import checked_counts
    from ficoco.measure import _peak_rss_bytes

    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    with ficoco.apply(model, method, budget, text_tower=text_tower, **overrides) as handle:
        check = graph_check(model, inputs[1]) if args.decode == "graph" else None   # untimed
        for _ in range(args.warmup):
            _prefill_seconds(model, inputs[1], synchronize)
            for batch in BATCH_SIZES:
                _timed_decode(model, inputs[batch], args.decode, cuda)
        prefill = [_prefill_seconds(model, inputs[1], synchronize) for _ in range(args.prefill_repeats)]
        # the batch-1 prefill's sample, what runs per image; the predictions come from it: checked against the plan
        counts = checked_counts(handle, inputs[1])[0]
        generate = {}
        for batch in BATCH_SIZES:
            if cuda:
                torch.cuda.reset_peak_memory_stats()      # the peak below is the largest batch's
            generate[batch] = [_timed_decode(model, inputs[batch], args.decode, cuda)
                               for _ in range(args.generate_repeats)]
        peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
        if args.profile:                                  # after the timed runs: the profiler slows what it sees
            append_profile(args.profile, f"{method} B={budget}",
                           lambda: _prefill_seconds(model, inputs[1], synchronize), cuda)
    return {"method": method, "budget": budget, "overrides": overrides, "prefill_s": prefill,
            "generate": generate, "counts": counts, "peak_memory_bytes": int(peak), "graph_check": check}


def _prefill(run: dict) -> float:
    """Median prefill seconds."""
    return statistics.median(run["prefill_s"])


def _throughput(run: dict, batch: int) -> float:
    """Images per second of `generate` at this batch size (median end-to-end time)."""
    return batch / statistics.median(g["end_to_end_s"] for g in run["generate"][batch])


def _first_token_ms(row: dict, batch: int) -> float:
    """Median time to the first token of a summarised row's `generate` at this batch size (its prefill)."""
    return statistics.median(g["prefill_s"] for g in row["generate_runs"][str(batch)]) * 1e3


def _decode_ms(row: dict, batch: int) -> float:
    """Median milliseconds per decode step of a summarised row's `generate` at this batch size."""
    return statistics.median(g["per_token_s"] for g in row["generate_runs"][str(batch)]) * 1e3


def _median_step_ms(row: dict, batch: int) -> float:
    """Median milliseconds of one decode step of a summarised row at this batch size, over every step of its
    runs (the first, eager one's and the capture's included: the median of 31 steps sits among the replays)."""
    return statistics.median(step for g in row["generate_runs"][str(batch)] for step in g["step_s"]) * 1e3


def summarise(runs: list[dict], dims) -> list[dict]:
    """Rows with medians, speedups against vanilla (its first and last runs pooled) and predictions."""
    vanilla = [run for run in runs if run["method"] == "vanilla"]
    base = {**vanilla[0], "prefill_s": [t for run in vanilla for t in run["prefill_s"]],
              "generate": {batch: [g for run in vanilla for g in run["generate"][batch]] for batch in BATCH_SIZES},
              "peak_memory_bytes": max(run["peak_memory_bytes"] for run in vanilla),
              "graph_check": combined_check([run["graph_check"] for run in vanilla])}
    base_prefill_macs, base_generate_macs = prefill_macs(dims, base["counts"]), generate_macs(dims, base["counts"])
    rows = []
    for run in [base] + [run for run in runs if run["method"] != "vanilla"]:
        llm_visual = run["counts"]["llm_visual"]
        prefill_speedup = _prefill(base) / _prefill(run)
        predicted_prefill = base_prefill_macs / prefill_macs(dims, run["counts"])
        predicted_generate = base_generate_macs / generate_macs(dims, run["counts"])
        speedup = {batch: _throughput(run, batch) / _throughput(base, batch) for batch in BATCH_SIZES}
        largest = BATCH_SIZES[-1]
        # against each vanilla run alone: how far the machine's drift between them moves the ratio
        against_each = [_throughput(run, largest) / _throughput(reference, largest) for reference in vanilla]
        rows.append({
            "method": run["method"], "budget": run["budget"], "overrides": run["overrides"],
            "own_schedule": run["method"] != "vanilla" and run["budget"] is None,
            "visual_average": sum(llm_visual) / len(llm_visual),
            "prefill_ms": _prefill(run) * 1e3, "prefill_ms_runs": [t * 1e3 for t in run["prefill_s"]],
            "prefill_speedup": prefill_speedup, "predicted_prefill_speedup": predicted_prefill,
            "prefill_measured_over_predicted": prefill_speedup / predicted_prefill,
            "throughput": {str(batch): _throughput(run, batch) for batch in BATCH_SIZES},
            "throughput_speedup": {str(batch): speedup[batch] for batch in BATCH_SIZES},
            f"throughput_speedup_b{largest}_range": [min(against_each), max(against_each)],
            "predicted_generate_speedup": predicted_generate,
            "generate_measured_over_predicted": {str(batch): speedup[batch] / predicted_generate
                                                 for batch in BATCH_SIZES},
            "generate_runs": {str(batch): run["generate"][batch] for batch in BATCH_SIZES},
            "peak_memory_bytes": run["peak_memory_bytes"],
            "counts": run["counts"],
            "graph_check": run["graph_check"],
        })
    return rows


def drift(runs: list[dict]) -> dict:
    """Vanilla's first run against its last: median prefill ms and batch-16 throughput."""
    vanilla = [run for run in runs if run["method"] == "vanilla"]
    largest = BATCH_SIZES[-1]
    return {name: {"prefill_ms": _prefill(run) * 1e3, f"throughput_b{largest}": _throughput(run, largest)}
            for name, run in (("first", vanilla[0]), ("last", vanilla[-1]))}


def format_table(result: dict) -> str:
    dims, largest = result["dims"], BATCH_SIZES[-1]
    decode = result.get("decode", "generate")         # the first H200 run's JSON predates the field: generate
    gib = "peak GiB (b16)" if result["device"] == "cuda" else "peak RSS GiB (process lifetime)"
    lines = [
        f"model: {result['shape']} shape, random weights: CLIP {dims['vision_layers']} layers (runs "
        f"{dims['vision_layers'] + 1 + dims['feature_layer']}) d={dims['vision_hidden']} mlp={dims['vision_mlp']}, "
        f"577 tokens; LLM {dims['llm_layers']} layers d={dims['llm_hidden']} mlp={dims['llm_mlp']}, vocab "
        f"{dims['vocab_size']}; prompt {result['prompt_tokens']} tokens (576 image), {NEW_TOKENS} new tokens; "
        f"{result['device_name']}, {result['dtype']}, {result['attn_implementation']}; torch {result['torch']}, "
        f"transformers {result['transformers']}; decode: {DECODE_WORDS[decode]}; per configuration "
        f"{result['warmup']} warm-up, prefill median of "
        f"{result['prefill_repeats']}, generate median of {result['generate_repeats']} per batch size; vanilla "
        f"first and last, pooled; {result['elapsed_s']:.0f} s in all",
        "",
        f"| method | B | overrides | realised avg | prefill ms | prefill × | predicted prefill × | measured / predicted "
        f"| b1 img/s | b1 × | b{largest} img/s | b{largest} × | predicted e2e × | b{largest} measured / predicted | {gib} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        budget = row["budget"] or ("own" if row["own_schedule"] else "full")
        overrides = ", ".join(f"{key}={value}" for key, value in row["overrides"].items()) or "–"
        lines.append(
            f"| {row['method']} | {budget} | {overrides} | {row['visual_average']:.2f} | {row['prefill_ms']:.1f} | "
            f"{row['prefill_speedup']:.2f} | {row['predicted_prefill_speedup']:.2f} | "
            f"{row['prefill_measured_over_predicted']:.2f} | {row['throughput']['1']:.2f} | "
            f"{row['throughput_speedup']['1']:.2f} | {row['throughput'][str(largest)]:.2f} | "
            f"{row['throughput_speedup'][str(largest)]:.2f} | {row['predicted_generate_speedup']:.2f} | "
            f"{row['generate_measured_over_predicted'][str(largest)]:.2f} | {row['peak_memory_bytes'] / 2**30:.2f} |")
    # the same runs split: time to first token at the largest batch (compute-bound on a GPU) against the
    # prefill FLOPs ratio, and decode milliseconds per token (bound by kernel launches in eager decoding)
    # (a static cache's runs time every step: their median, the replays' own time, is shown too)
    base_first_token = _first_token_ms(result["rows"][0], largest)
    stepped = decode != "generate"
    lines += ["", f"| method | B | b{largest} first token ms | b{largest} first token × | predicted prefill × | "
                  f"measured / predicted | decode ms/token b1 | decode ms/token b{largest} |"
                  + (f" median step ms b1 | median step ms b{largest} |" if stepped else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|---|" if stepped else "")]
    for row in result["rows"]:
        budget = row["budget"] or ("own" if row["own_schedule"] else "full")
        first_token = _first_token_ms(row, largest)
        speedup = base_first_token / first_token
        lines.append(
            f"| {row['method']} | {budget} | {first_token:.0f} | {speedup:.2f} | {row['predicted_prefill_speedup']:.2f} | "
            f"{speedup / row['predicted_prefill_speedup']:.2f} | {_decode_ms(row, 1):.1f} | {_decode_ms(row, largest):.1f} |"
            + (f" {_median_step_ms(row, 1):.1f} | {_median_step_ms(row, largest):.1f} |" if stepped else ""))
    first, last = result["vanilla_drift"]["first"], result["vanilla_drift"]["last"]
    lines += ["", f"vanilla drift, first → last run: prefill {first['prefill_ms']:.1f} → {last['prefill_ms']:.1f} ms, "
                  f"batch-{largest} throughput {first[f'throughput_b{largest}']:.2f} → "
                  f"{last[f'throughput_b{largest}']:.2f} img/s"]
    checked = [row for row in result["rows"] if row.get("graph_check")]
    if checked:
        mismatched = [row for row in checked if not row["graph_check"]["passed"]]
        largest_difference = max(row["graph_check"]["max_logit_difference"] for row in checked)
        lines.append(f"graph replays against eager steps (batch 1, {NEW_TOKENS} tokens, before the timed runs): the "
                     f"same tokens and logits bit for bit in {len(checked) - len(mismatched)} of {len(checked)} "
                     f"configurations, largest logit difference {largest_difference:.3g}")
        lines += [f"- MISMATCH: {row['method']} at B={row['budget'] or ('own' if row['own_schedule'] else 'full')}: "
                  f"the replays compute other {'logits' if row['graph_check']['tokens_equal'] else 'tokens'} than the "
                  f"eager steps (largest logit difference {row['graph_check']['max_logit_difference']:.3g})"
                  for row in mismatched]
    goals = [row for row in result["rows"] if row["method"] in GOALS and row["budget"] == GOAL_BUDGET]
    for row in goals:
        measured, goal = row["throughput_speedup"][str(largest)], GOALS[row["method"]]
        low, high = row.get(f"throughput_speedup_b{largest}_range", [measured, measured])
        verdict = "met" if low >= goal else "not met" if high < goal else "within the drift between vanilla's runs"
        lines.append(f"goal (issue 20, H200): {row['method']} at {GOAL_BUDGET} tokens, batch-{largest} throughput "
                     f"×{measured:.2f} (×{low:.2f} to ×{high:.2f} against vanilla's first and last runs alone) "
                     f"against ≥ ×{goal}: {verdict}")
    if result["unreachable"]:
        lines += ["", "Not run (unreachable with these settings):"] + [f"- {line}" for line in result["unreachable"]]
    if result["failed"]:
        lines += ["", "Failed (traceback on stderr):"]
        lines += [f"- {method} at B={'full' if method == 'vanilla' else 'own' if budget is None else budget}: "
                  f"{message}" for method, budget, message in result["failed"]]
    if result["skipped"]:
        lines += ["", f"Skipped (time limit {result['time_limit_s']:.0f} s reached):"]
        lines += [f"- {method} at B={'own' if budget is None else budget}" for method, budget, _ in result["skipped"]]
    return "\n".join(lines)


def run(args, started: float) -> dict:
    import torch
    import transformers

    from ficoco.bench import bench_configs, text_towers
    from ficoco.dims import ModelDims
    from ficoco.measure import build_random_model, synthetic_inputs

    cuda = args.device == "cuda"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    config = shape_config(args.shape)
    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "config.json"
        config.to_json_file(str(config_path))
        model = build_random_model(config_path, dtype, args.device, "sdpa", SEED)
    dims = ModelDims.from_config(model.config)
    weights_bytes = torch.cuda.memory_allocated() if cuda else None
    sample = synthetic_inputs(model, 1, PROMPT_TOKENS, SEED)
    inputs = {batch: {name: value.expand(batch, *value.shape[1:]).contiguous() for name, value in sample.items()}
              for batch in BATCH_SIZES}                         # every row the batch-1 sample
    built_s = time.perf_counter() - started
    print(f"model built in {built_s:.0f} s", file=sys.stderr, flush=True)

    configs, unreachable = bench_configs(args.methods, args.budgets, dims, overrides=overrides_for(args.shape))
    plan = configs + [("vanilla", None, {})]                 # bench_configs puts vanilla first
    text_tower = text_towers(model, plan)
    runs, skipped, failed = [], [], []
    for index, (method, budget, overrides) in enumerate(plan):
        reference = index in (0, len(plan) - 1)           # the vanilla runs always run
        if not reference and time.perf_counter() - started > args.time_limit:
            skipped.append((method, budget, overrides))
            continue
        try:
            runs.append(run_config(model, inputs, method, budget, overrides, args, cuda, text_tower(method)))
        except Exception as error:
            if index == 0:                                # no vanilla to set the others against
                raise
            # one method's failure must not lose the others' timings: listed under the table, exit status 1
            traceback.print_exc(file=sys.stderr)
            failed.append((method, budget, f"{type(error).__name__}: {error}"))
            print(f"[{index + 1}/{len(plan)}] {method} B={budget}: FAILED ({failed[-1][2]})", file=sys.stderr, flush=True)
            continue
        print(f"[{index + 1}/{len(plan)}] {method} B={budget}: prefill {_prefill(runs[-1]) * 1e3:.1f} ms, batch "
              f"{BATCH_SIZES[-1]} {_throughput(runs[-1], BATCH_SIZES[-1]):.2f} img/s ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr, flush=True)
    return {
        "shape": args.shape, "dims": dims.to_dict(), "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu", "dtype": dtype, "attn_implementation": "sdpa",
        "torch": torch.__version__, "transformers": transformers.__version__, "decode": args.decode,
        "prompt_tokens": int(inputs[1]["input_ids"].shape[1]), "new_tokens": NEW_TOKENS,
        "batch_sizes": list(BATCH_SIZES), "warmup": args.warmup, "prefill_repeats": args.prefill_repeats,
        "generate_repeats": args.generate_repeats, "time_limit_s": args.time_limit,
        "weights_bytes": weights_bytes, "build_s": built_s,
        "peak_memory_source": "torch.cuda.max_memory_allocated over the batch-16 runs" if cuda
        else "resource.getrusage(RUSAGE_SELF).ru_maxrss (process lifetime)",
        "rows": summarise(runs, dims), "vanilla_drift": drift(runs), "unreachable": unreachable,
        "skipped": [list(config) for config in skipped],
        "failed": [list(failure) for failure in failed],
        "elapsed_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(prog="ficoco gpu-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llava-7b", choices=list(SHAPES),
                        help="llava-7b: LLaVA-1.5-7B's exact shape (needs a GPU); tiny: the CPU test's model")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="registered methods to run besides vanilla (default: all; `ficoco methods` lists them)")
    parser.add_argument("--budgets", nargs="+", type=int, default=[192, 128, 64], metavar="B",
                        help="average visual tokens per LLM layer, each in 1..575")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="weights and activations (default: bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--decode", default="auto", choices=["auto", *DECODES],
                        help="graph: static KV cache, each decode step a replayed CUDA graph (default on a GPU); "
                             "static: the same without graphs (default on a CPU); generate: HF generate, eager")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each measurement per configuration")
    parser.add_argument("--prefill-repeats", type=int, default=5, help="timed batch-1 prefills per configuration")
    parser.add_argument("--generate-repeats", type=int, default=2,
                        help="timed generate calls per batch size and configuration")
    parser.add_argument("--time-limit", type=float, default=480.0,
                        help="seconds after which no new configuration starts (both vanilla runs always run)")
    parser.add_argument("--profile", metavar="FILE",
                        help="also profile one batch-1 prefill per configuration (torch.profiler, after the timed "
                             "runs) and append its busiest operators to FILE")
    parser.add_argument("--json", help="also write the full result (raw times included) to this file")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.prefill_repeats < 1 or args.generate_repeats < 1 or args.time_limit <= 0:
        parser.error(f"need --warmup >= 0, --prefill-repeats >= 1, --generate-repeats >= 1, --time-limit > 0; got "
                     f"{args.warmup}, {args.prefill_repeats}, {args.generate_repeats}, {args.time_limit}")
    bad = [budget for budget in args.budgets if not 1 <= budget < 576]
    if bad:
        parser.error(f"--budgets {' '.join(map(str, bad))}: valid budgets are 1..575 (visual tokens per LLM layer; "
                     f"576 is the unreduced image, which vanilla runs)")
    from ficoco import methods
    from ficoco.measure import resolve_device

    try:
        args.methods = [methods.get(name).name for name in args.methods or methods.names()]
        args.device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if args.decode == "auto":
        args.decode = "graph" if args.device == "cuda" else "static"
    if args.decode == "graph" and args.device != "cuda":
        parser.error(f"--decode graph replays CUDA graphs; on {args.device} use --decode static or generate")
    if args.shape == "llava-7b" and args.device != "cuda":
        parser.error("--shape llava-7b needs a CUDA GPU (7B parameters take 28 GB in float32 and minutes per "
                     "configuration on a CPU); on a CPU use --shape tiny")
    result = run(args, started)
    print(format_table(result))
    if args.json:
        from ficoco.journal import atomic_write_json

        atomic_write_json(args.json, result)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

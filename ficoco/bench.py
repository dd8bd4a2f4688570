"""`ficoco bench`: prefill speed of vanilla vs every method (default: all registered) at several
budgets, beside the speedup the FLOPs formulas predict from the token counts each run executed.

The model is LLaVA-shaped (336 px / patch 14: 577 vision tokens, 576 image placeholders) with
random weights and moderate widths, so one prefill takes a fraction of a second on a CPU; speed
does not depend on the weights. The methods' layer settings, set for LLaVA-1.5's 24 CLIP and 32
LLM layers, are scaled to the model's depth (`scaled_overrides`); a budget the scaled FiCoCo-L
start cannot reach uses the largest feasible start, which the table shows. A method with its own
fixed schedule (ficoco-v-official, pdrop-official) or an adaptive one runs once, at its own
counts; a budget a method cannot reach on the bench model is listed under the table, not run.

Timing: one prefill = one forward with `logits_to_keep=1` and a fresh KV cache (what `generate`
runs before the first token). Warm-up rounds are not timed. Every configuration is timed once per
round, rounds interleave all configurations (so drift and background load hit them alike), and
the table reports medians over the rounds. Separate instrumented rounds time each reduction step
(`reduce`: scores, filter, correlate, compress; means over a method's reducing layers) against
the layer it runs in, as run (reduced) and as the same layer runs unreduced in vanilla. On a CPU
with one thread those step and layer times are the thread's CPU time (`time.thread_time`): a
step of about a millisecond that another job preempts would otherwise read as several; the
prefill times stay wall-clock. For
FiCoCo-V the head-mean probabilities come with the layer's own attention (computed explicitly,
see ficoco/models/clip.py), so that cost sits in the layer, not the step; the end-to-end
measured speedup includes everything.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import sys
import time

REFERENCE_VISION_LAYERS = 23           # the depths the methods' default layer settings are set for: LLaVA-1.5
REFERENCE_LLM_LAYERS = 32              # runs CLIP layers 0..22 (features of layer 22) and 32 LLM layers
LLM_FRACTION_START = 4 / 32            # FiCoCo-L starts at layer 4 of 32, window 4
LLM_FRACTION_WINDOW = 4 / 32
# the layer parameters of each method, by the stack they index (other parameters keep their defaults)
VISION_LAYER_PARAMS = {"ficoco-v": ("start", "end"), "ficoco-v-official": ("start", "end"),
                       "ficoco-v-code": ("start", "end"), "tome": ("start", "end"), "evit": ("layers",),
                       "ficoco-vl": ("v_start", "v_end"), "vscan": ("local_layer",)}
LLM_LAYER_PARAMS = {"fastv": ("layer",), "fastv-keepb": ("layer",), "dart": ("layer",), "pdrop": ("boundaries",),
                    "pdrop-official": ("boundaries",), "sparsevlm": ("layers",), "sparsevlm-matched": ("layers",)}
LLM_WINDOWS = {"ficoco-l": ("start", "window"), "ficoco-vl": ("l_start", "l_window")}


def bench_config(args):
    """The LlavaConfig of the benchmark model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                              num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_hidden // 64,
                              image_size=336, patch_size=14, projection_dim=args.vision_hidden)
    text = LlamaConfig(vocab_size=32000, hidden_size=args.llm_hidden, intermediate_size=args.llm_mlp,
                       num_hidden_layers=args.llm_layers, num_attention_heads=args.llm_hidden // 64,
                       num_key_value_heads=args.llm_hidden // 64, max_position_embeddings=4096,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000 - 1, image_seq_length=576,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = "sdpa"
    return config


def scaled_layers(value, reference: int, layers: int, lowest: int = 0):
    """A layer index (or an increasing list of them) set for a `reference`-layer stack, scaled to one of
    `layers` layers: rounded, within lowest..layers − 1, a list kept strictly increasing; None stays None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        scaled = []
        for index in value:
            scaled.append(max(lowest, round(index * layers / reference), scaled[-1] + 1 if scaled else lowest))
        for position in range(len(scaled) - 1, -1, -1):   # pushed past the top: shift down, still increasing
            scaled[position] = min(scaled[position], layers - len(scaled) + position)
        return scaled
    return min(layers - 1, max(lowest, round(value * layers / reference)))


def scaled_overrides(method: str, dims, budget: int | None, fixed: dict | None = None) -> dict:
    """A method's layer settings scaled from LLaVA-1.5's depths to this model's (`VISION_LAYER_PARAMS`,
    `LLM_LAYER_PARAMS`), with the `fixed` parameters of a variant; FiCoCo-L's window keeps its
    fraction, and its start is the scaled one or, if that cannot reach `budget` (§2.1), the largest
    feasible one. FastV-style K scores from layer K−1, so K >= 1. InfeasibleBudget when no start
    reaches the budget."""
    from ficoco import methods
    from ficoco.budget import InfeasibleBudget

    defaults = methods.get(method).defaults
    overrides = {name: scaled_layers(defaults[name], REFERENCE_VISION_LAYERS, dims.vision_layers_run)
                 for name in VISION_LAYER_PARAMS.get(method, ())}
    overrides.update({name: scaled_layers(defaults[name], REFERENCE_LLM_LAYERS, dims.llm_layers,
                                          lowest=1 if name == "layer" else 0)
                      for name in LLM_LAYER_PARAMS.get(method, ())})
    fixed = fixed or {}                        # a variant's own parameters win over the scaled ones
    if method not in LLM_WINDOWS:
        return {**overrides, **fixed}
    start_name, window_name = LLM_WINDOWS[method]
    l_start = round(LLM_FRACTION_START * dims.llm_layers)
    l_window = max(1, round(LLM_FRACTION_WINDOW * dims.llm_layers))
    for start in range(l_start, -1, -1):
        candidate = {**overrides, start_name: start, window_name: l_window, **fixed}
        try:
            methods.get(method).check_budget(dims, budget, **candidate)
            return candidate
        except ValueError:                     # infeasible, or a start the variant's placement does not allow
            continue
    raise InfeasibleBudget(f"{method}: budget {budget} is unreachable on this {dims.llm_layers}-layer LLM even from "
                           f"layer 0 with window {l_window}")


def append_profile(path: str, title: str, prefill, cuda: bool) -> None:
    """`prefill()` once under torch.profiler, its busiest operators by host time appended to `path` under
    `title`: where a configuration's time goes beyond its FLOPs (small matrix products, element-wise work,
    kernel launches, host reads of device values)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        prefill()
    events = profiler.key_averages()
    syncs = sum(event.count for event in events if event.key in ("aten::_local_scalar_dense", "cudaStreamSynchronize"))
    launches = sum(event.count for event in events if event.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    with open(path, "a") as file:
        file.write(f"## {title}: {launches} kernel launches, {syncs} host reads of device values\n\n")
        file.write(events.table(sort_by="self_cpu_time_total", row_limit=25) + "\n\n")


def prefill_macs(dims, counts: dict) -> float:
    """What one prefill computes (vision tower, projector, LLM prefill, LM head on one position): the
    exact cost of a sample that generated its first token only."""
    from ficoco.flops import sample_cost

    return sample_cost(dims, counts, generated_tokens=1)["total_macs"]


def bench_configs(names, budgets, dims, variants=(), overrides=scaled_overrides) -> tuple[list[tuple], list[str]]:
    """(method, budget, overrides) to time, vanilla first, and a line for each budget a method cannot
    reach on this model. A method that runs no budget of the list but has a reduced schedule of its own
    (an adaptive method, a fixed published setting) runs once at budget None. `variants` are further
    (method, parameters) pairs, each timed like a method of its own; `overrides(method, dims, budget,
    fixed)` gives a run's parameters (default: the layer settings scaled to this model)."""
    from ficoco import methods

    configs, unreachable = [("vanilla", None, {})], []
    for name, fixed in [(name, {}) for name in names] + list(variants):
        if name == "vanilla":
            continue
        method = methods.get(name)
        runs, missed = [], []
        for budget in budgets if method.budgeted else []:
            try:
                chosen = overrides(name, dims, budget, fixed)
                method.check_budget(dims, budget, **chosen)
            except ValueError as error:
                missed.append(f"{name} at B={budget}: {str(error).rstrip('.')}")
                continue
            runs.append((name, budget, chosen))
        if not runs:
            try:
                chosen = overrides(name, dims, None, fixed)
                own = method.check_budget(dims, None, **chosen)
            except ValueError as error:
                unreachable.append(f"{name} with its own schedule: {str(error).rstrip('.')}")
                continue
            if own.layer_average is None or own.layer_average < dims.visual_tokens:
                runs.append((name, None, chosen))
                missed = []                                 # it runs at its own schedule instead
        if method.calibrated and runs:      # one fitted schedule: timed once, at the smallest budget it meets
            runs = [min(runs, key=lambda run: run[1])]
        configs += runs
        unreachable += missed
    return configs, unreachable


def text_towers(model, configs):
    """`method -> text tower`: one random-weight CLIP text tower (ficoco/models/companion.py) for the
    methods of `configs` that read the instruction (CDPruner), None for the others."""
    from ficoco import methods
    from ficoco.models.companion import random_text_tower

    readers = {method for method, _, _ in configs if methods.get(method).needs_text_tower}
    tower = random_text_tower(model) if readers else None
    return lambda method: tower if method in readers else None


def bench_inputs(model, text_before: int, text_after: int, seed: int = 0):
    """BOS + text + 576 image placeholders + instruction, and one random image."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    image_token = model.config.image_token_id
    before = torch.randint(3, 1000, (text_before,), generator=generator).tolist()
    after = torch.randint(3, 1000, (text_after,), generator=generator).tolist()
    ids = torch.tensor([[1, *before, *([image_token] * 576), *after]])
    pixels = torch.randn(1, 3, 336, 336, generator=generator)
    return ids, torch.ones_like(ids), pixels


def step_clock(device: str, threads: int):
    """(clock, name) for timing reduction steps against their layers: the calling thread's CPU time
    on a CPU with one thread (immune to preemption by other jobs, and with one thread it is all the
    work), wall-clock otherwise (several threads, or a GPU, where the caller synchronises)."""
    if device == "cpu" and threads == 1:
        return time.thread_time, "thread CPU time"
    return time.perf_counter, "wall clock"


class StepTimer:
    """Wraps a step's `reduce` and records its time per layer (wall clock unless `clock` is given)."""

    def __init__(self, reduce, seconds: dict, synchronize, clock=time.perf_counter):
        self.reduce, self.seconds, self.synchronize, self.clock = reduce, seconds, synchronize, clock

    def __call__(self, layer, tokens, scores):
        self.synchronize()
        start = self.clock()
        result = self.reduce(layer, tokens, scores)
        self.synchronize()
        self.seconds.setdefault(layer, []).append(self.clock() - start)
        return result


def timed_method(method, seconds: dict, synchronize, clock=time.perf_counter):
    """The same method whose steps time their `reduce` into `seconds` (keyed by (site, layer))."""
    def build(plan):
        steps = []
        for step in method.steps(plan):
            if not hasattr(step, "reduce"):                  # an input step resizes the image: nothing to time
                steps.append(step)
                continue
            per_site = seconds.setdefault(step.site, {})
            steps.append(dataclasses.replace(step, reduce=StepTimer(step.reduce, per_site, synchronize, clock)))
        return tuple(steps)

    return dataclasses.replace(method, build=build)


def layer_timers(modules: dict, seconds: dict, synchronize, clock=time.perf_counter):
    """Hooks timing whole layers (registered before `apply`, so an LLM layer's time includes the
    reduction pre-hook). modules: (site, layer) -> module."""
    handles = []
    for key, module in modules.items():
        started = {}

        def pre(module, args, key=key, started=started):
            synchronize()
            started["t"] = clock()

        def post(module, args, output, key=key, started=started):
            synchronize()
            seconds.setdefault(key, []).append(clock() - started["t"])

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def run(args) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration

    import ficoco
    from ficoco import methods
    from ficoco.dims import ModelDims
    from ficoco.invariants import checked_counts

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock, clock_name = step_clock(device.type, args.threads)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(bench_config(args)).eval().to(device)
    dims = ModelDims.from_config(model.config)
    ids, mask, pixels = (t.to(device) for t in bench_inputs(model, args.text_before, args.text_after))

    configs, unreachable = bench_configs(args.methods, args.budgets, dims, args.variants)
    text_tower = text_towers(model, configs)

    def prefill():
        synchronize()
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, logits_to_keep=1, use_cache=True)
        synchronize()
        return time.perf_counter() - start

    times = {index: [] for index in range(len(configs))}
    counts = {}
    with torch.inference_mode():
        for round_index in range(args.warmup + args.repeats):
            for index, (method, budget, overrides) in enumerate(configs):
                with ficoco.apply(model, method, budget, text_tower=text_tower(method), **overrides) as handle:
                    seconds = prefill()
                    # the predicted speedups come from these counts: they must be the plan's, for this prompt
                    counts[index] = checked_counts(handle, {"input_ids": ids, "attention_mask": mask})[0]
                if round_index >= args.warmup:
                    times[index].append(seconds)

        if args.profile:                  # after the timed rounds: the profiler slows what it sees
            for method, budget, overrides in configs:
                with ficoco.apply(model, method, budget, text_tower=text_tower(method), **overrides):
                    append_profile(args.profile, f"{method} B={budget} {overrides}", prefill, device.type == "cuda")

        # instrumented rounds: each reduction step vs the layer it runs in (as run, and unreduced)
        all_layers = {("vision", index): layer for index, layer in enumerate(model.model.vision_tower.encoder.layers)}
        all_layers.update({("llm", index): layer for index, layer in enumerate(model.model.language_model.layers)})
        unreduced_seconds: dict = {}
        handles = layer_timers(all_layers, unreduced_seconds, synchronize, clock)
        try:
            for _ in range(args.step_repeats):
                with ficoco.apply(model, "vanilla"):
                    model(input_ids=ids, attention_mask=mask, pixel_values=pixels, logits_to_keep=1, use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
        step_share = {}
        for index, (method, budget, overrides) in enumerate(configs):
            if method == "vanilla":
                continue
            plan = methods.get(method).check_budget(dims, budget, **overrides)
            reducing = [("vision", layer) for layer in (plan.vision.layers if plan.vision else ())]
            reducing += [("llm", layer) for layer in (plan.llm.layers if plan.llm else ())]
            step_seconds, layer_seconds = {}, {}
            handles = layer_timers({key: all_layers[key] for key in reducing}, layer_seconds, synchronize, clock)
            try:
                timed = timed_method(methods.get(method), step_seconds, synchronize, clock)
                for _ in range(args.step_repeats):
                    with ficoco.apply(model, timed, budget, text_tower=text_tower(method), **overrides):
                        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, logits_to_keep=1,
                              use_cache=True)
            finally:
                for handle in handles:
                    handle.remove()
            shares = {}
            for site, layer in reducing:
                if layer not in step_seconds.get(site, {}):      # a planned layer that discards nothing
                    continue
                step = statistics.median(step_seconds[site][layer])
                shares.setdefault(site, []).append(
                    (step * 1e3, step / statistics.median(layer_seconds[(site, layer)]),
                     step / statistics.median(unreduced_seconds[(site, layer)])))
            step_share[index] = {site: [statistics.mean(column) for column in zip(*values)]
                                 for site, values in shares.items()}

    vanilla_ms = statistics.median(times[0]) * 1e3
    vanilla_macs = prefill_macs(dims, counts[0])
    rows = []
    for index, (method, budget, overrides) in enumerate(configs):
        median_ms = statistics.median(times[index]) * 1e3
        macs = prefill_macs(dims, counts[index])
        measured, predicted = vanilla_ms / median_ms, vanilla_macs / macs
        llm_visual = counts[index]["llm_visual"]
        rows.append({
            "method": method, "budget": budget, "overrides": overrides,
            "visual_average": sum(llm_visual) / len(llm_visual),
            "own_schedule": method != "vanilla" and budget is None,
            "prefill_ms_median": median_ms, "prefill_ms": [t * 1e3 for t in times[index]],
            "prefill_gmacs": macs / 1e9, "overhead_gmacs": counts[index]["overhead_macs"] / 1e9,
            "measured_speedup": measured, "predicted_speedup": predicted,
            "measured_over_predicted": measured / predicted,
            "step_share": step_share.get(index, {}),
        })
    llava_scale = llava_scale_steps(args.repeats, synchronize, clock) if args.llava_scale else []
    return {
        "llava_scale": llava_scale, "unreachable": unreachable,
        "device": str(device), "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
        "step_repeats": args.step_repeats, "step_clock": clock_name,
        "torch": torch.__version__, "dims": dims.to_dict(), "prompt_tokens": ids.shape[1], "rows": rows,
    }


def llava_scale_steps(repeats: int, synchronize=lambda: None, clock=time.perf_counter) -> list[dict]:
    """The reduction steps timed against one layer of LLaVA-1.5-7B's real size (random weights).

    FiCoCo-V: a CLIP ViT-L/14-336 layer (577 tokens, d=1024, 16 heads, MLP 4096) and the first
    discard count of B=64 (47); FiCoCo-L: a Vicuna-7B decoder layer (636-token prompt, d=4096,
    MLP 11008) and the first discard count of B=192 (116). Each step gets exactly the inputs the
    adapter gives it; the layer is timed as it runs unreduced.
    """
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from ficoco import methods
    from ficoco.dims import llava_1_5_dims
    from ficoco.contract import LLMTokens, VisionTokens
    from ficoco.models.clip import ClipScores, clip_attention
    from ficoco.models.llama import LlamaScores

    def median_ms(fn):
        fn()
        times = []
        for _ in range(repeats):
            synchronize()
            start = clock()
            fn()
            synchronize()
            times.append(clock() - start)
        return statistics.median(times) * 1e3

    dims = llava_1_5_dims("7b")
    generator = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        # FiCoCo-V in CLIP layer 12 at B = 64
        vision_config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                         image_size=336, patch_size=14)
        vision_config._attn_implementation = "sdpa"
        clip_layer = CLIPEncoderLayer(vision_config).eval()
        hidden = torch.randn(1, 577, 1024, generator=generator)
        (vision_step,) = methods.get("ficoco-v").steps(methods.get("ficoco-v").plan(dims, 64))
        layer = vision_step.layers[0]
        out, q, k, head_mean = clip_attention(clip_layer.self_attn, clip_layer.layer_norm1(hidden), None, True)
        tokens = VisionTokens(hidden + out, torch.arange(576)[None])
        layer_ms = median_ms(lambda: clip_layer(hidden, None))
        step_ms = median_ms(lambda: vision_step.reduce(layer, tokens, ClipScores(q, k, clip_layer.self_attn.scale,
                                                                                 None, head_mean)))
        sdpa_ms = median_ms(lambda: clip_attention(clip_layer.self_attn, hidden, None, False))
        probs_ms = median_ms(lambda: clip_attention(clip_layer.self_attn, hidden, None, True))
        rows.append({"method": "ficoco-v", "layer": f"CLIP-L layer {layer}, 577 tokens", "budget": 64,
                     "discards": vision_step.reduce.discards[layer], "layer_ms": layer_ms, "step_ms": step_ms,
                     "probs_extra_ms": probs_ms - sdpa_ms})
        del clip_layer

        # FiCoCo-L in Vicuna-7B layer 4 at B = 192
        text_config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                  num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000)
        text_config._attn_implementation = "sdpa"
        llama_layer = LlamaDecoderLayer(text_config, layer_idx=4).eval()
        length, image_start = 636, 35
        hidden = torch.randn(1, length, 4096, generator=generator)
        positions = torch.arange(length)[None]
        cos, sin = LlamaRotaryEmbedding(text_config)(hidden, positions)
        (llm_step,) = methods.get("ficoco-l").steps(methods.get("ficoco-l").plan(dims, 192))
        layer = llm_step.layers[0]
        tokens = LLMTokens(hidden, torch.arange(image_start, image_start + 576)[None],
                           torch.arange(image_start + 576, length)[None])
        layer_ms = median_ms(lambda: llama_layer(hidden, attention_mask=None, position_ids=positions,
                                                 position_embeddings=(cos, sin)))
        step_ms = median_ms(lambda: llm_step.reduce(layer, tokens, LlamaScores(llama_layer, hidden, cos, sin, None)))
        rows.append({"method": "ficoco-l", "layer": f"Vicuna-7B layer {layer}, {length} tokens", "budget": 192,
                     "discards": llm_step.reduce.discards[layer], "layer_ms": layer_ms, "step_ms": step_ms,
                     "probs_extra_ms": None})
    return rows


def format_table(result: dict) -> str:
    dims = result["dims"]
    lines = [
        f"model: CLIP {dims['vision_layers']} layers (runs {dims['vision_layers'] + 1 + dims['feature_layer']}) "
        f"d={dims['vision_hidden']} mlp={dims['vision_mlp']}, 577 tokens; LLM {dims['llm_layers']} layers "
        f"d={dims['llm_hidden']} mlp={dims['llm_mlp']}; prompt {result['prompt_tokens']} tokens "
        f"(576 image); {result['device']}, {result['threads']} threads, torch {result['torch']}; "
        f"median of {result['repeats']} interleaved rounds after {result['warmup']} warm-up; steps and their "
        f"layers: median of {result.get('step_repeats', '?')} instrumented rounds, {result.get('step_clock', 'wall clock')}",
        "",
        "| method | B | overrides | realised avg | prefill ms | GMAC | overhead GMAC | measured × | predicted × | "
        "measured / predicted | reduction step: ms, % of its layer as run, % of that layer unreduced |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        overrides = ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "–"
        share = "; ".join(f"{site} {ms:.1f} ms, {as_run * 100:.1f} %, {unreduced * 100:.1f} %"
                          for site, (ms, as_run, unreduced) in row["step_share"].items()) or "–"
        lines.append(
            f"| {row['method']} | {row['budget'] or ('own' if row.get('own_schedule') else 'full')} | {overrides} | {row['visual_average']:.2f} | "
            f"{row['prefill_ms_median']:.1f} | {row['prefill_gmacs']:.2f} | {row['overhead_gmacs']:.3f} | "
            f"{row['measured_speedup']:.2f} | "
            f"{row['predicted_speedup']:.2f} | {row['measured_over_predicted']:.2f} | {share} |")
    if result.get("unreachable"):
        lines += ["", "Not run (unreachable on the bench model with its scaled layer settings):"]
        lines += [f"- {line}" for line in result["unreachable"]]
    if result.get("llava_scale"):
        lines += ["", "Reduction step against one unreduced layer of LLaVA-1.5-7B's size (random weights):", "",
                  "| method | layer | B | discards | layer ms | step ms | step % of layer | extra ms for probabilities "
                  "(explicit attention − SDPA) |", "|---|---|---|---|---|---|---|---|"]
        for row in result["llava_scale"]:
            extra = "–" if row["probs_extra_ms"] is None else f"{row['probs_extra_ms']:.1f}"
            lines.append(f"| {row['method']} | {row['layer']} | {row['budget']} | {row['discards']} | "
                         f"{row['layer_ms']:.1f} | {row['step_ms']:.1f} | {100 * row['step_ms'] / row['layer_ms']:.1f} | "
                         f"{extra} |")
    return "\n".join(lines)


def parse_variant(text: str) -> tuple[str, dict]:
    """'ficoco-l:placement=attention,k=0' -> ("ficoco-l", {"placement": "attention", "k": 0}), checked
    against the method's parameters; ValueError naming the bad part and the valid form."""
    import yaml

    from ficoco import methods

    name, _, assignments = text.partition(":")
    # a comma starts the next PARAM=VALUE; commas inside a value ("deletions=[9, 4, 0]") stay in it
    pairs = [pair.partition("=") for pair in re.split(r",(?=\s*[A-Za-z_]\w*=)", assignments) if pair]
    if not pairs or any(not key or sep != "=" for key, sep, _ in pairs):
        raise ValueError(f"--variant {text!r}: expected METHOD:PARAM=VALUE[,PARAM=VALUE], e.g. "
                         f"ficoco-l:placement=attention")
    method = methods.get(name)
    fixed = {key.strip(): yaml.safe_load(value) for key, _, value in pairs}
    method.resolve(fixed)
    return method.name, fixed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ficoco bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="registered methods to time (default: all; `ficoco methods` lists them)")
    parser.add_argument("--budgets", nargs="+", type=int, default=[192, 128, 64])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported); >= 5")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--step-repeats", type=int, default=3, help="instrumented rounds per configuration")
    parser.add_argument("--vision-layers", type=int, default=8)
    parser.add_argument("--vision-hidden", type=int, default=512, help="CLIP width (heads = width / 64, MLP 4x)")
    parser.add_argument("--llm-layers", type=int, default=8)
    parser.add_argument("--llm-hidden", type=int, default=768, help="LLM width (heads = width / 64)")
    parser.add_argument("--llm-mlp", type=int, default=2048)
    parser.add_argument("--text-before", type=int, default=35, help="text tokens before the image (incl. system)")
    parser.add_argument("--text-after", type=int, default=24, help="instruction tokens after the image")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-llava-scale", dest="llava_scale", action="store_false",
                        help="skip timing the steps against one LLaVA-1.5-7B-sized CLIP and LLM layer")
    parser.add_argument("--variant", action="append", default=[], metavar="METHOD:PARAM=VALUE[,PARAM=VALUE]",
                        help="also time METHOD with these parameters in the same rounds, e.g. "
                             "ficoco-l:placement=attention (repeatable; values are read as YAML scalars)")
    parser.add_argument("--profile", metavar="FILE",
                        help="also profile one prefill per configuration (torch.profiler, after the timed rounds) "
                             "and append its busiest operators to FILE")
    parser.add_argument("--json", help="also write the full result (raw times included) to this file")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error(f"--repeats must be >= 5 for a stable median; got {args.repeats}")
    if args.warmup < 0 or args.step_repeats < 1:
        parser.error(f"need --warmup >= 0 and --step-repeats >= 1; got {args.warmup}, {args.step_repeats}")
    from ficoco import methods

    try:
        args.methods = [methods.get(name).name for name in args.methods or methods.names()]
        args.variants = [parse_variant(text) for text in args.variant]
    except ValueError as error:
        parser.error(str(error))
    result = run(args)
    print(format_table(result))
    if args.json:
        from ficoco.journal import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

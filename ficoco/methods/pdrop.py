"""PyramidDrop / PDrop (methods.md §8.5): staged pruning at LLM stage boundaries during prefill.

At each boundary b_k (k = 1, 2, ...), just before layer b_k runs:
filter    a = softmax(q_last · Kᵀ/√d) of layer b_k (its own input layer norm, q/k and RoPE), averaged
          over heads, q_last = the last instruction token, restricted to the image tokens still
          present; keep the top round(576·λ^k)
correlate K = 0 (pure pruning)
compress  delete the rest from the sequence and the KV cache of layers ≥ b_k; layer b_k runs on the
          kept set

Positions: kept tokens keep their original RoPE positions and decoding continues at
prompt_length + t, like every other in-LLM method here. The official code renumbers positions
contiguously (spec §8.5 describes that as the published method, not as the project rule); the
project keeps one position convention for all in-LLM methods (platform-notes §4.2).

`pdrop` (project rule): boundaries [2, 8, 16], λ = the largest on a 1e-4 grid whose realised
layer average is ≤ B (0.5597 / 0.4194 / 0.1918 for 192 / 128 / 64 on LLaVA-1.5-7B).
`pdrop-official`: boundaries [8, 16, 24], λ = 0.5 (576 → 288 → 144 → 72, layer average 270).
"""
from __future__ import annotations

import math

from ficoco.budget import InfeasibleBudget, layer_average, pdrop_layer_counts, pdrop_stage_counts, solve_pdrop_lambda
from ficoco.contract import LLMLayerStep
from ficoco.methods.base import Method, Param
from ficoco.methods.shared import LLM_NEEDS, LastQueryTopK, increasing_layers, staged_llm_plan


def optional_ratio(value) -> str | None:
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < float(value) <= 1.0
    return None if ok else "must be None (solved from the budget) or a number in (0, 1]"


def _smallest_reachable(n0: int, boundaries: list[int], n_layers: int) -> float:
    """The smallest layer average whose schedule keeps at least one image token at every stage."""
    lam = (0.5 / n0) ** (1.0 / len(boundaries))            # round(n0·λ^n) >= 1 from here on
    lam = math.ceil(lam * 1e4) / 1e4
    while min(pdrop_stage_counts(n0, lam, len(boundaries))) < 1:
        lam += 1e-4
    return layer_average(pdrop_layer_counts(n0, lam, boundaries, n_layers))


def make_schedule(name: str):
    def schedule(dims, budget, params) -> dict:
        boundaries, n_layers, n0 = list(params["boundaries"]), dims.llm_layers, dims.visual_tokens
        if boundaries[-1] >= n_layers:
            raise ValueError(f"{name}: boundaries={boundaries}: every boundary must be in [0, {n_layers - 1}] "
                             f"(the {n_layers} LLM layers)")
        lam = params["lam"]
        if lam is None:
            if budget is None:
                return staged_llm_plan(dims, {})
            lam = solve_pdrop_lambda(budget, boundaries, n_layers, n0, method=name)
        counts = pdrop_stage_counts(n0, lam, len(boundaries))
        if min(counts) < 1:
            smallest = _smallest_reachable(n0, boundaries, n_layers)
            raise InfeasibleBudget(
                f"{name}: budget B={budget} with boundaries {boundaries} gives λ={lam:.4f} and stage counts {counts}: "
                f"a stage would keep no image token. The smallest reachable budget that keeps one token per stage "
                f"is {math.ceil(smallest)} (layer average {smallest:.2f}); raise B or move the first boundary.")
        plan = staged_llm_plan(dims, dict(zip(boundaries, counts)))
        if params["lam"] is not None and budget is not None and plan["layer_average"] > budget:
            raise InfeasibleBudget(
                f"{name}: budget B={budget} is below the realised layer average {plan['layer_average']:.2f} of the "
                f"fixed schedule (boundaries {boundaries}, λ={lam}, image tokens {[n0] + counts}); the smallest "
                f"reachable budget is {math.ceil(plan['layer_average'])}. Use budget None (the fixed schedule), a "
                f"budget >= {math.ceil(plan['layer_average'])}, or lam=None to solve λ for B.")
        plan["llm"]["lam"] = lam
        return plan
    return schedule


def build(plan: dict) -> tuple:
    llm = plan.llm
    if llm is None:
        return ()
    keep = dict(zip(llm.layers, llm.visual_out))
    reduce = LastQueryTopK(keep=keep)
    return (LLMLayerStep(layers=tuple(llm.layers), reduce=reduce, tokens_out=keep, overhead=reduce.overhead),)


STAGES = {
    "filter": "at each stage boundary b: layer b's head-mean attention (own q/k, RoPE) from the last instruction "
              "token to each image token; keep the top round(576·λ^stage)",
    "correlate": "K = 0 (pure pruning)",
    "compress": "delete the other image tokens from the sequence and the KV cache of layers >= b (kept tokens keep "
                "their RoPE positions)",
}
NEEDS = ("one attention row (the last instruction token) at each boundary layer, recomputed from that layer's own "
         "q/k (the layer keeps SDPA)")


def _params(boundaries: tuple[int, ...], lam: float | None) -> dict:
    return {
        "boundaries": Param(boundaries, "stage boundaries b_1 < b_2 < ... (0-based LLM layers); layer b_k runs on "
                                        "round(576·λ^k) image tokens", increasing_layers),
        "lam": Param(lam, "λ, the geometric keep ratio per stage; None = the largest λ (1e-4 grid) whose layer "
                          "average is <= B", optional_ratio),
    }


METHOD = Method(
    name="pdrop",
    summary="PDrop (project rule): boundaries [2, 8, 16], keep round(576·λ^k) image tokens after boundary k, "
            "λ solved so the layer average is <= B",
    phase="llm",
    acts_on=("llm",),
    needs=LLM_NEEDS,
    needs_attention=NEEDS,
    stages=STAGES,
    params=_params((2, 8, 16), None),
    schedule=make_schedule("pdrop"),
    build=build,
)

OFFICIAL = Method(
    name="pdrop-official",
    summary="PDrop's official setting: boundaries [8, 16, 24], λ = 0.5 (576 -> 288 -> 144 -> 72, layer average "
            "270 on LLaVA-1.5-7B); run with budget None (or any B >= its layer average)",
    phase="llm",
    acts_on=("llm",),
    needs=LLM_NEEDS,
    needs_attention=NEEDS,
    stages=STAGES,
    params=_params((8, 16, 24), 0.5),
    schedule=make_schedule("pdrop-official"),
    build=build,
)

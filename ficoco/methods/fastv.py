"""FastV (methods.md §8.3): drop image tokens once, at the input of LLM layer K, during prefill.

filter    importance of image token v = A_{K−1}[last prompt position, v], the head-mean attention
          of layer K−1 on its own input (one query row, recomputed from that layer's q/k so the
          layer keeps SDPA); keep the top k
correlate K = 0 (pure pruning)
compress  delete the rest from the sequence and from the KV cache of layers ≥ K; kept tokens keep
          their original RoPE positions; layers 0..K−1 keep the full cache; decoding never prunes

Budgets: `fastv` keeps k(B) = ⌊(L·B − 576·K)/(L − K)⌋ so that the layer average is ≤ B
(166 / 98 / 29 at 192 / 128 / 64 with K = 2 on LLaVA-1.5-7B). `fastv-keepb` is the common
"keep B after layer K" setting; its realised average (216 / 156 / 96) is larger than the label.

`LastQueryTopK` is shared with PDrop, which ranks by the same row at its own layers.
"""
from __future__ import annotations

from ficoco.methods.base import Method, Param, positive_int
from ficoco.methods.shared import (LLM_NEEDS, LastQueryTopK, check_prune_layer, one_shot_schedule, one_shot_step,
                                   staged_llm_plan)


schedule = one_shot_schedule("fastv")


def schedule_keep_budget(dims, budget, params) -> dict:
    check_prune_layer("fastv-keepb", params["layer"], dims)
    if budget is None:
        return staged_llm_plan(dims, {})
    return staged_llm_plan(dims, {params["layer"]: budget})


def build(plan: dict) -> tuple:
    return one_shot_step(plan, lambda keep: LastQueryTopK(keep={plan.llm.layers[0]: keep}))


PARAMS = {"layer": Param(2, "K: image tokens are dropped at the input of LLM layer K (0-based), ranked by layer "
                            "K−1's attention from the last prompt token; layers 0..K−1 run on every token",
                         positive_int)}
STAGES = {
    "filter": "importance = layer K−1's head-mean attention from the last prompt token to each image token; "
              "keep the top k",
    "correlate": "K = 0 (pure pruning)",
    "compress": "delete the other image tokens from the sequence and the KV cache of layers >= K (kept tokens "
                "keep their RoPE positions); once, at prefill",
}
NEEDS = ("one attention row (the last prompt token) of LLM layer K−1 on its own input, recomputed from that "
         "layer's q/k (the layer keeps SDPA)")

METHOD = Method(
    name="fastv",
    summary="FastV: drop image tokens at the input of LLM layer 2 by layer 1's attention from the last prompt "
            "token; keeps k(B) = ⌊(L·B − 576·K)/(L − K)⌋ so the layer average is ≤ B",
    phase="llm",
    acts_on=("llm",),
    needs=LLM_NEEDS,
    needs_attention=NEEDS,
    stages=STAGES,
    params=PARAMS,
    schedule=schedule,
    build=build,
)

KEEP_BUDGET = Method(
    name="fastv-keepb",
    summary="FastV keeping B image tokens after layer K (the literature's 'FastV at B'); the realised layer "
            "average is larger than B and is reported",
    phase="llm",
    acts_on=("llm",),
    needs=LLM_NEEDS,
    needs_attention=NEEDS,
    stages=STAGES,
    params=PARAMS,
    schedule=schedule_keep_budget,
    build=build,
)

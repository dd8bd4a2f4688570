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

from dataclasses import dataclass

from ficoco.budget import keep_for_budget
from ficoco.methods.base import LLMKept, LLMLayerStep, LLMScores, LLMTokens, Method, Param, positive_int, \
    staged_llm_plan
from ficoco.paradigm.filter import top_k_positions


@dataclass(frozen=True)
class LastQueryTopK:
    """Keep the `keep[layer]` visual tokens that the last prompt token attends to most (K = 0 pruning)."""

    keep: dict[int, int]

    def __call__(self, layer: int, tokens: LLMTokens, scores: LLMScores) -> LLMKept:
        last = tokens.instruction[:, -1:]                                       # (B, 1) the last prompt token
        importance = scores.rows(last, keys=tokens.visual)[:, 0]                 # (B, N)
        kept = tokens.visual.gather(1, top_k_positions(importance, self.keep[layer]))
        return LLMKept(hidden=tokens.hidden, visual=kept)


def check_prune_layer(method: str, layer: int, dims) -> None:
    """K must leave a previous layer to score from and a layer to prune: 1 <= K <= L − 1."""
    if not 1 <= layer <= dims.llm_layers - 1:
        raise ValueError(f"{method}: layer={layer}: need 1 <= layer <= {dims.llm_layers - 1} (K scores from layer "
                         f"K−1's attention and prunes at the input of layer K of the {dims.llm_layers} LLM layers)")


def one_shot_step(plan: dict, reduce_for, needs_instruction: bool = True) -> tuple:
    """The single previous-layer-scored step of a one-shot plan (none when unreduced).

    `reduce_for(keep)` builds the step's reduce from the kept count at the pruning layer.
    """
    llm = plan["llm"]
    if llm is None:
        return ()
    layer, keep = llm["layers"][0], llm["visual_out"][0]
    return (LLMLayerStep(layers=(layer,), reduce=reduce_for(keep), tokens_out={layer: keep},
                         scores_from="previous", needs_instruction=needs_instruction),)


def one_shot_schedule(method: str):
    """The schedule of a method that prunes once at the input of LLM layer `params["layer"]`, keeping
    k(B) image tokens so that the layer average is <= B (FastV, DART)."""
    def schedule(dims, budget, params) -> dict:
        check_prune_layer(method, params["layer"], dims)
        if budget is None:
            return staged_llm_plan(dims, {})
        keep = keep_for_budget(budget, params["layer"], dims.llm_layers, dims.visual_tokens, method=method)
        return staged_llm_plan(dims, {params["layer"]: keep})
    return schedule


schedule = one_shot_schedule("fastv")


def schedule_keep_budget(dims, budget, params) -> dict:
    check_prune_layer("fastv-keepb", params["layer"], dims)
    if budget is None:
        return staged_llm_plan(dims, {})
    return staged_llm_plan(dims, {params["layer"]: budget})


def build(plan: dict) -> tuple:
    return one_shot_step(plan, lambda keep: LastQueryTopK(keep={plan["llm"]["layers"][0]: keep}))


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
    needs_attention=NEEDS,
    stages=STAGES,
    params=PARAMS,
    schedule=schedule_keep_budget,
    build=build,
)

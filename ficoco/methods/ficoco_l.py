"""FiCoCo-L (methods.md §4): filter -> correlate -> compress at the input of LLM decoder layers.

At each layer of the window s..s+w−1, during prefill, on the layer's own causal attention:
filter   s_i = β·(attention visual token i receives from the other visual tokens)
               − (1−β)·(attention it receives from the instruction tokens); highest = sources
correlate C_ij = γ·A[max(i,j), min(i,j)] + (1−γ)·(1/M)Σ_k A[k,i]·A[k,j]; ε-quantile targets
compress self-preserving merge into the residual stream, then the sources leave the sequence
         (and the KV cache of this and later layers); kept tokens keep their RoPE positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ficoco.budget import progressive_llm_schedule
from ficoco.methods.base import (
    LLMKept,
    LLMLayerStep,
    LLMScores,
    LLMTokens,
    Method,
    Param,
    fold_sources,
    merge_weights,
    non_negative_int,
    optional_non_negative_int,
    positive_int,
    unit_interval,
    vision_layer_counts,
)
from ficoco.paradigm.correlate import ficoco_l_correlation
from ficoco.paradigm.filter import ficoco_l_scores, split_by_score


@dataclass(frozen=True)
class FicocoLanguageReduce:
    """One FiCoCo-L reduction step; `discards[layer]` visual tokens leave at each reducing layer."""

    discards: dict[int, int]
    beta: float
    gamma: float
    eps: float
    k: int | None

    def __call__(self, layer: int, tokens: LLMTokens, scores: LLMScores) -> LLMKept:
        visual, n_visual = tokens.visual, tokens.visual.shape[1]
        rows = scores.rows(torch.cat([visual, tokens.instruction], dim=1), keys=visual)   # (B, N+M, N)
        attn_vv, attn_qv = rows[:, :n_visual], rows[:, n_visual:]                       # (B, N, N), (B, M, N)
        redundancy = ficoco_l_scores(attn_vv, attn_qv, self.beta)                       # (B, N)
        sources, targets = split_by_score(redundancy, self.discards[layer])             # into the visual axis
        weights = None if self.k == 0 else merge_weights(
            ficoco_l_correlation(attn_vv, attn_qv, sources, targets, self.gamma), self.eps, self.k)
        hidden = tokens.hidden
        visual_hidden = hidden.gather(1, visual.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))   # (B, N, D)
        merged = fold_sources(visual_hidden, sources, targets, weights, self.k)                   # (B, T, D)
        kept = visual.gather(1, targets)                                                           # (B, T)
        hidden = hidden.scatter(1, kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), merged)
        return LLMKept(hidden=hidden, visual=kept)


LANGUAGE_PARAMS = {
    "beta": Param(0.6, "β, weight of the visual-redundancy term against the instruction-attention term",
                  unit_interval),
    "gamma": Param(0.6, "γ, weight of the direct correlation against the indirect (through instruction) one",
                   unit_interval),
    "eps": Param(0.998, "ε, quantile of each source's correlations that selects its targets", unit_interval),
    "k": Param(None, "targets per source: None = token-adaptive ε-quantile, 0 = prune, k >= 1 = fixed k",
               optional_non_negative_int),
}


def llm_plan(method: str, dims, n0: int, budget: int | None, start: int, window: int) -> dict:
    """Plan entries of the §2.2 progressive schedule from n0 visual tokens (n0 for every layer if budget is None)."""
    if not 0 <= start <= dims.llm_layers - window:
        raise ValueError(f"{method}: start={start}, window={window}: need 0 <= start <= "
                         f"{dims.llm_layers - window} so the window fits in the {dims.llm_layers} LLM layers")
    if budget is None:
        return {"llm": None, "llm_visual": [n0] * dims.llm_layers, "layer_average": float(n0)}
    schedule = progressive_llm_schedule(n0, budget, dims.llm_layers, start, window, method=method)
    layers = list(schedule.layers)
    return {
        "llm": {"layers": layers, "discards": list(schedule.discards), "n0": n0, "final": schedule.final,
                "visual_out": list(schedule.visual_counts[start:start + window])},
        "llm_visual": list(schedule.visual_counts),
        "layer_average": schedule.average,
    }


def language_step(llm_plan_entry: dict, params: dict) -> LLMLayerStep | None:
    """The FiCoCo-L step of a plan's "llm" entry (None when nothing is discarded)."""
    pairs = [(layer, n) for layer, n in zip(llm_plan_entry["layers"], llm_plan_entry["discards"]) if n > 0]
    if not pairs:
        return None
    visual_out = dict(zip(llm_plan_entry["layers"], llm_plan_entry["visual_out"]))
    reduce = FicocoLanguageReduce(discards=dict(pairs), beta=params["beta"], gamma=params["gamma"],
                                  eps=params["eps"], k=params["k"])
    return LLMLayerStep(layers=tuple(layer for layer, _ in pairs), reduce=reduce,
                        tokens_out={layer: visual_out[layer] for layer, _ in pairs})


def schedule(dims, budget, params) -> dict:
    delivered = dims.visual_tokens
    return {"vision": None, "vision_counts": vision_layer_counts(dims, {}), "delivered": delivered,
            **llm_plan("ficoco-l", dims, delivered, budget, params["start"], params["window"])}


def build(plan: dict) -> tuple:
    step = language_step(plan["llm"], plan["params"]) if plan["llm"] else None
    return () if step is None else (step,)


STAGES = {
    "filter": "β·(attention received from other visual tokens) − (1−β)·(attention from the instruction); "
              "highest = sources",
    "correlate": "γ·direct causal attention + (1−γ)·indirect attention through the instruction; ε-quantile targets",
    "compress": "self-preserving weighted merge into the residual stream, then drop the sources from the "
                "sequence and KV cache (kept tokens keep their RoPE positions)",
}

METHOD = Method(
    name="ficoco-l",
    summary="FiCoCo-L: filter-correlate-compress at the input of LLM layers 4..7 during prefill",
    phase="llm",
    acts_on=("llm",),
    needs_attention="causal attention rows of the visual and instruction tokens, visual columns, at each reducing "
                    "LLM layer (computed from the layer's own q/k; the layer keeps SDPA)",
    stages=STAGES,
    params={**LANGUAGE_PARAMS,
            "start": Param(4, "first reducing LLM decoder layer s (0-based)", non_negative_int),
            "window": Param(4, "number of consecutive reducing LLM layers w", positive_int)},
    schedule=schedule,
    build=build,
)

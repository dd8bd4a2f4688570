"""FiCoCo-V (methods.md §3): filter -> correlate -> compress inside the vision encoder.

In each CLIP layer of the range, between the attention residual and the MLP:
filter   s_i = λ·(attention patch i receives from the other patches) − (1−λ)·A[CLS, i], with the
         2×2 local penalty; the n_l highest scores are the sources S, the rest the targets T
correlate C = A[S, T]; targets J_i by the ε-quantile of each row (token-adaptive K)
compress self-preserving merge of S into T, then delete S; CLS is kept and never a target.

Also `ficoco-v-official`: the author's setting of 42 discards per layer from layer 12 (issue #4),
which on LLaVA-1.5 (features of layer 22) delivers 576 − 11·42 = 114 tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ficoco.budget import encoder_discards
from ficoco.methods.base import (
    Method,
    Param,
    VisionLayerStep,
    VisionScores,
    VisionTokens,
    encoder_plan,
    fold_sources,
    merge_weights,
    non_negative_int,
    optional_non_negative_int,
    planned_vision_layers,
    positive_int,
    positive_number,
    patches_for,
    unit_interval,
    vision_layers,
)
from ficoco.paradigm.correlate import take
from ficoco.paradigm.filter import ficoco_v_scores, local_penalty, split_by_score


@dataclass(frozen=True)
class FicocoVisionReduce:
    """One FiCoCo-V reduction step; `discards[layer]` patches leave at each reducing layer."""

    discards: dict[int, int]
    grid_hw: tuple[int, int]
    lam: float
    coef: float
    penalty_window: int
    eps: float
    k: int | None

    def __call__(self, layer: int, tokens: VisionTokens, scores: VisionScores) -> VisionTokens:
        attn = scores.probs()                                                   # (B, 1+N, 1+N)
        redundancy = ficoco_v_scores(attn, self.lam)                            # (B, N)
        redundancy = local_penalty(redundancy, tokens.positions, self.grid_hw, self.penalty_window, self.coef)
        sources, targets = split_by_score(redundancy, self.discards[layer])     # (B, S), (B, T) into patches
        weights = None if self.k == 0 else merge_weights(take(attn, sources + 1, targets + 1), self.eps, self.k)
        patches = fold_sources(tokens.hidden[:, 1:], sources, targets, weights, self.k)   # (B, T, D)
        key_bias = tokens.key_bias
        if key_bias is not None:
            key_bias = torch.cat([key_bias[:, :1], key_bias[:, 1:].gather(1, targets)], dim=1)
        return VisionTokens(
            hidden=torch.cat([tokens.hidden[:, :1], patches], dim=1),           # (B, 1+T, D), CLS first
            positions=tokens.positions.gather(1, targets),                      # (B, T), still ascending
            key_bias=key_bias,
        )


VISION_PARAMS = {
    "lam": Param(0.35, "λ, weight of the patch-redundancy term against the CLS term", unit_interval),
    "coef": Param(2.0, "local-penalty coefficient applied to each window's maximum score", positive_number),
    "penalty_window": Param(2, "side of the non-overlapping local-penalty windows on the patch grid", positive_int),
    "eps": Param(0.998, "ε, quantile of each source's correlations that selects its targets", unit_interval),
    "k": Param(None, "targets per source: None = token-adaptive ε-quantile, 0 = prune, k >= 1 = fixed k",
               optional_non_negative_int),
}
RANGE_PARAMS = {
    "start": Param(12, "first reducing vision encoder layer (0-based)", non_negative_int),
    "end": Param(None, "last reducing vision layer, inclusive; None = the last layer LLaVA reads (22)",
                 optional_non_negative_int),
}


def schedule(dims, budget, params) -> dict:
    layers = vision_layers("ficoco-v", dims, params["start"], params["end"])
    discards = {} if budget is None else encoder_discards(dims.num_patches, patches_for(dims, budget), layers)
    return encoder_plan(dims, discards)


def schedule_official(dims, budget, params) -> dict:
    layers = vision_layers("ficoco-v-official", dims, params["start"], params["end"])
    total = params["r"] * len(layers)
    if total >= dims.num_patches:
        raise ValueError(f"ficoco-v-official: r={params['r']} over {len(layers)} layers discards {total} of "
                         f"{dims.num_patches} patches; at most {(dims.num_patches - 1) // len(layers)} per layer")
    plan = encoder_plan(dims, {layer: params["r"] for layer in layers})
    if budget is not None and budget != plan["delivered"]:
        raise ValueError(f"ficoco-v-official has a fixed schedule (r={params['r']} per layer over layers "
                         f"{layers[0]}..{layers[-1]}) that delivers {plan['delivered']} tokens: run it with "
                         f"budget None or {plan['delivered']}; got {budget}")
    return plan


def vision_step(vision_plan_entry: dict, params: dict) -> VisionLayerStep:
    """The FiCoCo-V step of a plan's "vision" entry."""
    layers = tuple(vision_plan_entry["layers"])
    discards = dict(zip(layers, vision_plan_entry["discards"]))
    reduce = FicocoVisionReduce(discards=discards, grid_hw=tuple(vision_plan_entry["grid_hw"]), lam=params["lam"],
                                coef=params["coef"], penalty_window=params["penalty_window"], eps=params["eps"],
                                k=params["k"])
    return VisionLayerStep(layers=layers, reduce=reduce,
                           tokens_out=dict(zip(layers, vision_plan_entry["patches_out"])))


def build(plan: dict) -> tuple:
    return (vision_step(plan["vision"], plan["params"]),) if planned_vision_layers(plan) else ()


STAGES = {
    "filter": "λ·(attention received from other patches) − (1−λ)·CLS attention, 2×2 local penalty; highest = sources",
    "correlate": "C = A[sources, targets]; targets J_i by the ε-quantile of each row (token-adaptive K)",
    "compress": "self-preserving weighted merge into the targets, then delete the sources (CLS kept, never a target)",
}

METHOD = Method(
    name="ficoco-v",
    summary="FiCoCo-V: filter-correlate-compress inside CLIP layers 12..22 (between attention and MLP)",
    phase="vision",
    acts_on=("vision",),
    needs_attention="full head-mean attention matrix of each reducing vision layer",
    stages=STAGES,
    params={**VISION_PARAMS, **RANGE_PARAMS},
    schedule=schedule,
    build=build,
)

OFFICIAL = Method(
    name="ficoco-v-official",
    summary="FiCoCo-V with the author's setting: 42 discards per layer from layer 12 (delivers 114 on LLaVA-1.5)",
    phase="vision",
    acts_on=("vision",),
    needs_attention="full head-mean attention matrix of each reducing vision layer",
    stages=STAGES,
    params={**VISION_PARAMS, **RANGE_PARAMS, "r": Param(42, "patches discarded at every reducing layer", positive_int)},
    schedule=schedule_official,
    build=build,
)

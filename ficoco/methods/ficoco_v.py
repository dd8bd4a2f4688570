"""FiCoCo-V (methods.md §3): filter -> correlate -> compress inside the vision encoder.

In each CLIP layer of the range, between the attention residual and the MLP:
filter   s_i = λ·(attention patch i receives from the other patches) − (1−λ)·A[CLS, i], with the
         2×2 local penalty; the n_l highest scores are the sources S, the rest the targets T
correlate C = A[S, T]; targets J_i by the ε-quantile of each row (token-adaptive K)
compress self-preserving merge of S into T, then delete S; CLS is kept and never a target.

On a tower without CLS (Qwen2-VL, Qwen2.5-VL) with semantic="key-mean" (the paper's proxy, v4 App. Table 9):
the candidates are whole 2×2 merge groups, one per LLM visual token, in the blocks of start..end that attend
over the whole image (Qwen2.5-VL: its full-attention blocks); docs/methods.md, "On Qwen2-VL and Qwen2.5-VL".

Also `ficoco-v-official`: the author's setting of 42 discards per layer from layer 12 (issue #4),
which on LLaVA-1.5 (features of layer 22) delivers 576 − 11·42 = 114 tokens.
"""
from __future__ import annotations

from ficoco.budget import encoder_discards
from ficoco.methods.base import Method, Param, non_negative_int, optional_non_negative_int, positive_int
from ficoco.methods.shared import (TOWER_NEEDS, VISION_PARAMS, encoder_plan, patches_for, planned_vision_layers,
                                   semantic_needs, vision_layers, vision_step)


RANGE_PARAMS = {
    "start": Param(12, "first reducing vision encoder layer (0-based)", non_negative_int),
    "end": Param(None, "last reducing vision layer, inclusive; None = the last layer LLaVA reads (22)",
                 optional_non_negative_int),
}


def schedule(dims, budget, params) -> dict:
    layers = vision_layers("ficoco-v", dims, params["start"], params["end"])
    discards = {} if budget is None else encoder_discards(dims.tower_units, patches_for(dims, budget), layers)
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


def build(plan: dict) -> tuple:
    return (vision_step(plan.vision, plan.params),) if planned_vision_layers(plan) else ()


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
    needs=semantic_needs,
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
    needs=TOWER_NEEDS,
    needs_attention="full head-mean attention matrix of each reducing vision layer",
    stages=STAGES,
    params={**VISION_PARAMS, **RANGE_PARAMS, "r": Param(42, "patches discarded at every reducing layer", positive_int)},
    schedule=schedule_official,
    build=build,
)

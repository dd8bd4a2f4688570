"""FiCoCo-VL (methods.md §5): FiCoCo-V in the encoder, then FiCoCo-L in the LLM.

Budget split: FiCoCo-V reduces the patches to F_V = min(vision_factor·B, 576); FiCoCo-L then starts
from those tokens and brings the LLM layer average to B. On LLaVA-NeXT each tower pass is reduced so, at
the pass's share b of B, and FiCoCo-L brings the passes' tokens to p·b (`ficoco.dims.passes_plan`).
"""
from __future__ import annotations

from ficoco.budget import encoder_discards, round_half_up
from ficoco.contract import Needs
from ficoco.methods.base import (Method, Param, non_negative_int, optional_non_negative_int, positive_int,
                                 positive_number)
from ficoco.methods.shared import LLM_NEEDS, patches_for, planned_vision_layers, vision_layers, vision_plan
from ficoco.methods.shared import LANGUAGE_PARAMS, language_step, llm_plan
from ficoco.methods.shared import VISION_PARAMS, vision_step


def schedule(dims, budget, params) -> dict:
    plan = tower_schedule(dims, budget, params)
    return {**plan, **llm_schedule(dims, plan["delivered"], budget, params)}


def tower_schedule(dims, budget, params) -> dict:
    """FiCoCo-V's reduction of the patches to min(vision_factor·B, visual tokens)."""
    layers = vision_layers("ficoco-vl", dims, params["v_start"], params["v_end"], "v_start", "v_end")
    if budget is None:
        return vision_plan(dims, {})
    delivered = min(round_half_up(params["vision_factor"] * budget), dims.visual_tokens)
    return vision_plan(dims, encoder_discards(dims.num_patches, patches_for(dims, delivered), layers))


def llm_schedule(dims, delivered: int, budget: int | None, params) -> dict:
    """FiCoCo-L's progressive schedule from the `delivered` tokens FiCoCo-V left to layer average `budget`."""
    return llm_plan("ficoco-vl", dims, delivered, budget, params["l_start"], params["l_window"], params["placement"])


def build(plan: dict) -> tuple:
    steps = []
    if planned_vision_layers(plan):
        steps.append(vision_step(plan.vision, plan.params))
    language = language_step(plan.llm, plan.params) if plan.llm else None
    if language is not None:
        steps.append(language)
    return tuple(steps)


METHOD = Method(
    name="ficoco-vl",
    summary="FiCoCo-VL: FiCoCo-V to min(2·B, 576) tokens in CLIP, then FiCoCo-L to layer average B in the LLM",
    phase="both",
    acts_on=("vision", "llm"),
    needs=Needs(cls_first=True, positions=LLM_NEEDS.positions),
    needs_attention="those of FiCoCo-V (full matrix per reducing vision layer) and FiCoCo-L (visual and "
                    "instruction rows per reducing LLM layer)",
    stages={
        "filter": "FiCoCo-V's filter in CLIP, then FiCoCo-L's filter in the LLM",
        "correlate": "FiCoCo-V's then FiCoCo-L's correlation; ε-quantile targets in both",
        "compress": "self-preserving weighted merge in both places",
    },
    params={
        "vision_factor": Param(2, "FiCoCo-V delivers min(vision_factor·B, visual tokens) to the LLM", positive_number),
        **VISION_PARAMS,
        "v_start": Param(12, "first reducing vision encoder layer (0-based)", non_negative_int),
        "v_end": Param(None, "last reducing vision layer, inclusive; None = the last layer LLaVA reads (22)",
                       optional_non_negative_int),
        **{name: param for name, param in LANGUAGE_PARAMS.items() if name not in VISION_PARAMS},
        "l_start": Param(4, "first reducing LLM decoder layer s (0-based)", non_negative_int),
        "l_window": Param(4, "number of consecutive reducing LLM layers w", positive_int),
    },
    schedule=schedule,
    build=build,
    tower_schedule=tower_schedule,
    llm_schedule=llm_schedule,
)

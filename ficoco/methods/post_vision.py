"""Pieces shared by the methods that reduce once between the vision layers and the LLM.

VisionZip, PruMerge(+), TopK-CLS, Random and spatial pooling act on the output of the vision
layer LLaVA reads (`VisionOutputStep`); DivPrune acts on the projected tokens (`ProjectorStep`).
Each delivers exactly B tokens per image, so B is also the average over the LLM layers (spec §2.1);
the adaptive PruMerge originals deliver a count of their own per image (`adaptive_feature_plan`).
"""
from __future__ import annotations

from typing import Callable

import torch

from ficoco.methods.base import ImageTokens, VisionOutputStep, VisionTokens, delivered_plan, vision_layer_counts
from ficoco.paradigm.compress import gather_tokens


def feature_plan(dims, budget: int | None, site: str, **details) -> dict:
    """The plan of a one-shot reduction to `budget` tokens per image (None = unreduced).

    `post_vision` records where it acts ("vision_output": the output of vision layer `layer`;
    "projector": the projected tokens) and the method's own split of the B tokens (`details`).
    """
    if budget is None:
        return {**delivered_plan(dims, dims.visual_tokens), "post_vision": None}
    where = {"layer": dims.last_vision_layer} if site == "vision_output" else {}
    return {**delivered_plan(dims, budget), "post_vision": {"site": site, **where, "tokens_out": budget, **details}}


def adaptive_feature_plan(dims, site: str, **details) -> dict:
    """The plan of an adaptive one-shot reduction (a count per image, chosen while it runs).

    Nothing per layer is known before a run, so "delivered", "llm_visual" and "layer_average" are
    None; the realised counts are per sample (`handle.last_counts()`), and costs come from them.
    """
    where = {"layer": dims.last_vision_layer} if site == "vision_output" else {}
    return {"vision": None, "vision_counts": vision_layer_counts(dims, {}), "delivered": None, "llm": None,
            "llm_visual": None, "layer_average": None,
            "post_vision": {"site": site, **where, "tokens_out": None, "adaptive": True, **details}}


def check_patch_count(method: str, dims, count: int, what: str) -> None:
    """`count` patches must exist among the model's patches."""
    if not 0 <= count <= dims.num_patches:
        raise ValueError(f"{method}: {what} = {count} must be in [0, {dims.num_patches}] (the patches of the "
                         f"{dims.grid_side}x{dims.grid_side} grid)")


def output_build(make_reduce: Callable[[dict], Callable]) -> Callable[[dict], tuple]:
    """`build(plan)`: one `VisionOutputStep` with `make_reduce(plan)`, none when the plan is unreduced
    (`tokens_out` None for an adaptive plan)."""
    def build(plan: dict) -> tuple:
        post = plan.get("post_vision")
        if post is None:
            return ()
        return (VisionOutputStep(reduce=make_reduce(plan), tokens_out=post["tokens_out"]),)

    return build


def keep_patches(tokens: VisionTokens, kept: torch.Tensor) -> ImageTokens:
    """The patches at `kept` (B, K) positions into the patch axis, unchanged and in order; CLS dropped."""
    return ImageTokens(hidden=gather_tokens(tokens.hidden[:, 1:], kept), positions=tokens.positions.gather(1, kept))

"""LLaVA-PruMerge and PruMerge+ (methods.md §8.6), budget-matched project rule.

On the output of the feature layer (layer 22), before the projector:
filter    a = CLS row of the *next* layer's (23) q/k projections applied to the features (its layer
          norm first; all heads concatenated, scale 1/sqrt(width), softmax over all tokens), patch
          entries only, not renormalised.
          PruMerge keeps the top B − 1 patches by a. PruMerge+ keeps the top k_imp = round((B − 1)/4)
          plus B − 1 − k_imp evenly spaced positions ⌊i·n/count⌋ among the n other patches.
correlate for every kept patch i, its `knn` (32) most similar other patches by cosine of the next
          layer's keys (full width), kept or not
compress  x_i ← x_i + Σ_{j ∈ kNN(i)} a_j·x_j (pre-merge values), then one extra token Σ_{j pruned} a_j·x_j
Output: the kept patches in positional order, then the extra token (B in all).
The adaptive originals (`prumerge_adaptive`, IQR outliers) give a different count per image and are
not provided yet (the adapter delivers one count per batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ficoco.budget import prumerge_plus_split
from ficoco.methods.base import ImageTokens, Method, Param, VisionOutputScores, VisionTokens, positive_int
from ficoco.methods.post_vision import check_patch_count, feature_plan, output_build
from ficoco.paradigm.compress import prumerge_merge
from ficoco.paradigm.correlate import knn_positions
from ficoco.paradigm.filter import complement_positions, evenly_spaced_positions, top_k_positions


@dataclass(frozen=True)
class PruMergeReduce:
    """Keep `important` patches by CLS attention plus `raster` evenly spaced others; merge by kNN."""

    important: int
    raster: int
    knn: int

    def __call__(self, layer: int, tokens: VisionTokens, scores: VisionOutputScores) -> ImageTokens:
        patches = tokens.hidden[:, 1:]                                           # (B, N, D)
        batch, n = tokens.positions.shape
        attention = scores.next_cls_row()[:, 1:]                                 # (B, N), not renormalised
        kept = top_k_positions(attention, self.important)                       # (B, k_imp)
        if self.raster:
            rest = complement_positions(kept, n)                                 # (B, N - k_imp)
            sample = evenly_spaced_positions(rest.shape[1], self.raster, kept.device).expand(batch, -1)
            kept = torch.cat([kept, rest.gather(1, sample)], dim=1).sort(dim=1).values
        neighbours = knn_positions(scores.next_keys()[:, 1:], kept, self.knn)  # (B, K, knn)
        return ImageTokens(hidden=prumerge_merge(patches, attention, kept, neighbours),
                           positions=tokens.positions.gather(1, kept))


def check_model(name: str, dims, knn: int) -> None:
    """The next layer's projections must exist and kNN must fit the patches."""
    if dims.last_vision_layer + 1 >= dims.vision_layers:
        raise ValueError(f"{name}: needs the q/k projections of the layer after the feature layer "
                         f"({dims.last_vision_layer}), but the vision tower has only {dims.vision_layers} layers")
    if knn > dims.num_patches - 1:
        raise ValueError(f"{name}: knn={knn} must be <= {dims.num_patches - 1} (the other patches)")


def schedule_prumerge(dims, budget, params) -> dict:
    if budget is None:
        return feature_plan(dims, None, "vision_output")
    check_model("prumerge", dims, params["knn"])
    if budget < 2:
        raise ValueError(f"prumerge: budget {budget} must be >= 2 (one kept patch plus the extra token)")
    check_patch_count("prumerge", dims, budget - 1, "kept patches (B - 1)")
    return feature_plan(dims, budget, "vision_output", important=budget - 1, raster=0, extra=1, knn=params["knn"])


def schedule_plus(dims, budget, params) -> dict:
    if budget is None:
        return feature_plan(dims, None, "vision_output")
    check_model("prumerge-plus", dims, params["knn"])
    try:
        important, raster = prumerge_plus_split(budget)
    except ValueError as error:
        raise ValueError(f"prumerge-plus: {error}") from None
    check_patch_count("prumerge-plus", dims, important + raster, "kept patches (B - 1)")
    return feature_plan(dims, budget, "vision_output", important=important, raster=raster, extra=1,
                        knn=params["knn"])


def make_reduce(plan: dict) -> PruMergeReduce:
    post = plan["post_vision"]
    return PruMergeReduce(important=post["important"], raster=post["raster"], knn=post["knn"])


PARAMS = {"knn": Param(32, "neighbours (by key cosine) merged into every kept patch", positive_int)}
NEEDS = ("CLS row from the next layer's (23) q/k projections of the features, computed directly "
         "(fused attention is fine)")
CORRELATE = "the knn (32) most similar patches of every kept patch by the next layer's key cosine"
COMPRESS = "x_i + Σ a_j·x_j over the neighbours (a = CLS attention), then the extra token Σ_{pruned} a_j·x_j"

METHOD = Method(
    name="prumerge",
    summary="LLaVA-PruMerge: top B−1 patches by (layer-23) CLS attention, kNN merge, plus one extra token "
            "(after CLIP)",
    phase="vision",
    acts_on=("vision",),
    needs_attention=NEEDS,
    stages={"filter": "CLS attention from the next layer's q/k; the top B − 1 patches are kept",
            "correlate": CORRELATE, "compress": COMPRESS},
    params=PARAMS,
    schedule=schedule_prumerge,
    build=output_build(make_reduce),
)

PLUS = Method(
    name="prumerge-plus",
    summary="PruMerge+: top round((B−1)/4) by CLS attention + evenly spaced patches, kNN merge, plus one extra "
            "token (after CLIP)",
    phase="vision",
    acts_on=("vision",),
    needs_attention=NEEDS,
    stages={"filter": "CLS attention from the next layer's q/k; the top round((B−1)/4) plus evenly spaced "
                      "others, B − 1 in all",
            "correlate": CORRELATE, "compress": COMPRESS},
    params=PARAMS,
    schedule=schedule_plus,
    build=output_build(make_reduce),
)

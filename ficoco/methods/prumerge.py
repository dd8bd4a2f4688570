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

The adaptive originals, `prumerge-adaptive` and `prumerge-plus-adaptive` (no budget, `budgeted=False`):
filter    PruMerge: the patches whose attention a is above Q3 + 1.5·IQR of that image's patch
          attentions (`paradigm.filter.iqr_outlier_mask`, linear-interpolation quartiles; an image
          with no patch above its fence keeps its top-1). PruMerge+ also keeps the raster positions
          0, s, 2s, … < N − 1 (raster order over the N patches) not already kept, s = ⌊⌊1/ratio⌋/3⌋ with
          ratio = k/N, the image's own share of outliers, as the published code computes it
          (`adaptive_raster_stride`).
correlate, compress as above. Every image gets its own count, kept + 1, which the adapter realises
(placeholder runs of that length) and logs per sample (`handle.last_counts()`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ficoco.budget import prumerge_plus_split
from ficoco.contract import ImageTokens, StepShape, VisionOutputScores, VisionTokens
from ficoco.methods.base import Method, Param, positive_int
from ficoco.methods.shared import (TOWER_NEEDS, adaptive_feature_plan, check_patch_count, cosine_macs, feature_plan,
                                  output_build, vision_rows_macs)
from ficoco.paradigm.compress import prumerge_merge
from ficoco.paradigm.correlate import knn_positions
from ficoco.paradigm.filter import complement_positions, evenly_spaced_positions, iqr_outlier_mask, raster_positions, \
    top_k_positions


def prumerge_macs(dims, shape: StepShape) -> int:
    """The products of one image's PruMerge(+) step keeping K = kept − 1 patches of N = tokens − 1
    (the extra token is the kept count's last one)."""
    width, n, k = dims.vision_hidden, shape.tokens - 1, shape.kept - 1
    projections = shape.tokens * width * width + width * width     # next layer's k_proj of 1+N tokens, q_proj of CLS
    cls_row = vision_rows_macs(dims, 1, shape.tokens)               # CLS query · 1+N keys (all heads as one)
    knn = cosine_macs(k, n, width)                                  # K kept keys against the N patch keys
    extra = (n - k) * width                                         # (1×(N−K))·((N−K)×D) the extra token
    return projections + cls_row + knn + extra                      # the kNN merge itself is elementwise


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

    def overhead(self, dims, shape: StepShape) -> int:
        return prumerge_macs(dims, shape)


@dataclass(frozen=True)
class PruMergeAdaptiveReduce:
    """Keep the IQR outliers of the CLS attention (PruMerge+: plus a raster sample whose stride follows from the
    image's outlier ratio, `adaptive_raster_stride`); merge by kNN.

    A count per image: `ImageTokens.hidden` is padded to the batch's largest count and `counts` gives
    each image's own (kept + 1). Every image is reduced on its own, so a batch equals its images alone.
    """

    raster: bool         # PruMerge+ (outliers and the raster sample); False = PruMerge (outliers only)
    knn: int

    def __call__(self, layer: int, tokens: VisionTokens, scores: VisionOutputScores) -> ImageTokens:
        patches = tokens.hidden[:, 1:]                                           # (B, N, D)
        batch, n = tokens.positions.shape
        attention = scores.next_cls_row()[:, 1:]                                 # (B, N), not renormalised
        keys = scores.next_keys()[:, 1:]                                         # (B, N, D)
        keep = iqr_outlier_mask(attention)                                       # (B, N) bool, >= 1 per row
        merged, positions = [], []
        for row in range(batch):
            if self.raster:                                                      # the image's own stride
                stride = adaptive_raster_stride(int(keep[row].sum()), n)
                keep[row, raster_positions(n - 1, stride, keep.device)] = True   # the published end: n - 1 excluded
            kept = keep[row].nonzero()[:, 0][None]                               # (1, K_b) ascending
            if self.raster and kept.shape[1] + 1 > n:
                raise ValueError(f"prumerge-plus-adaptive: this image's outliers give raster stride {stride}, which "
                                 f"keeps {kept.shape[1]} of its {n} patches: with the extra token more than the {n} "
                                 f"tokens it has")
            neighbours = knn_positions(keys[row:row + 1], kept, self.knn)        # (1, K_b, knn)
            merged.append(prumerge_merge(patches[row:row + 1], attention[row:row + 1], kept, neighbours)[0])
            positions.append(tokens.positions[row].gather(0, kept[0]))
        counts = torch.tensor([tokens_b.shape[0] for tokens_b in merged], device=patches.device)
        return ImageTokens(hidden=torch.nn.utils.rnn.pad_sequence(merged, batch_first=True),
                           positions=torch.nn.utils.rnn.pad_sequence(positions, batch_first=True, padding_value=-1),
                           counts=counts)

    def overhead(self, dims, shape: StepShape) -> int:
        return prumerge_macs(dims, shape)                               # shape.kept is this image's own count


def adaptive_raster_stride(outliers: int, n: int) -> int:
    """PruMerge+'s raster stride ⌊⌊1/ratio⌋/3⌋ (§8.6), with the image's own outlier ratio k/n, in the float
    arithmetic of the published code (42Shawn/LLaVA-PruMerge, `token_prune_merge_advanced_plus`, if_adaptive:
    `int(int(1 / reduction_ratio) / 3)`). At least 1: k <= n/4 outliers above Q3 (`most_outliers`)."""
    return max(1, int(int(1 / (outliers / n)) / 3))


def most_outliers(n: int) -> int:
    """The most patches strictly above Q3 of n (at least the top-1 is kept)."""
    return max(1, n - 1 - math.floor(0.75 * (n - 1)))


def kept_bounds(n: int, raster: bool) -> tuple[int, int]:
    """The fewest and the most patches an adaptive PruMerge(+) can keep of n, over every outlier count k: the k
    outliers, and for PruMerge+ the raster positions of k's stride (which the outliers may overlap)."""
    if not raster:
        return 1, most_outliers(n)
    sizes = [(k, len(range(0, n - 1, adaptive_raster_stride(k, n)))) for k in range(1, most_outliers(n) + 1)]
    return min(max(k, r) for k, r in sizes), min(n, max(k + r for k, r in sizes))


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


def schedule_adaptive(name: str, dims, raster: bool, params) -> dict:
    """The adaptive plan (no budget: `Method.plan` refuses one): the rule, and the bounds of the realised count
    (kept + the extra token, at most an image's tokens), which ficoco.invariants checks per sample."""
    check_model(name, dims, params["knn"])
    fewest, most = kept_bounds(dims.num_patches, raster)
    stride = {"raster_stride": "per image: ⌊⌊n/k⌋/3⌋, k its outliers"} if raster else {}
    return adaptive_feature_plan(dims, "vision_output", rule="iqr", **stride, extra=1, knn=params["knn"],
                                 tokens_min=fewest + 1, tokens_max=min(most + 1, dims.visual_tokens))


def make_adaptive_reduce(plan: dict) -> PruMergeAdaptiveReduce:
    post = plan.post_vision.details
    return PruMergeAdaptiveReduce(raster="raster_stride" in post, knn=post["knn"])


def make_reduce(plan: dict) -> PruMergeReduce:
    post = plan.post_vision.details
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
    needs=TOWER_NEEDS,
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
    needs=TOWER_NEEDS,
    needs_attention=NEEDS,
    stages={"filter": "CLS attention from the next layer's q/k; the top round((B−1)/4) plus evenly spaced "
                      "others, B − 1 in all",
            "correlate": CORRELATE, "compress": COMPRESS},
    params=PARAMS,
    schedule=schedule_plus,
    build=output_build(make_reduce),
)

ADAPTIVE_FILTER = "CLS attention from the next layer's q/k; the patches above Q3 + 1.5·IQR of the image's patch " \
                  "attentions are kept (at least the top-1): a count per image"

ADAPTIVE = Method(
    name="prumerge-adaptive",
    summary="LLaVA-PruMerge as published: the IQR outliers of (layer-23) CLS attention, kNN merge, plus one extra "
            "token; a count per image (≈ 32 on LLaVA-1.5), no budget, realised counts logged (after CLIP)",
    phase="vision",
    acts_on=("vision",),
    needs=TOWER_NEEDS,
    needs_attention=NEEDS,
    stages={"filter": ADAPTIVE_FILTER, "correlate": CORRELATE, "compress": COMPRESS},
    params=PARAMS,
    schedule=lambda dims, budget, params: schedule_adaptive("prumerge-adaptive", dims, False, params),
    build=output_build(make_adaptive_reduce),
    budgeted=False,
)

PLUS_ADAPTIVE = Method(
    name="prumerge-plus-adaptive",
    summary="PruMerge+ as published: the IQR outliers of (layer-23) CLS attention plus every s-th raster "
            "patch (s = ⌊⌊1/ratio⌋/3⌋, ratio the image's outlier share), kNN merge, plus one extra token; a count "
            "per image (≈ 144 on LLaVA-1.5), no budget, realised counts logged (after CLIP)",
    phase="vision",
    acts_on=("vision",),
    needs=TOWER_NEEDS,
    needs_attention=NEEDS,
    stages={"filter": ADAPTIVE_FILTER + "; plus the raster positions 0, s, 2s, … < n − 1 not already kept, "
                                        "s = ⌊⌊n/k⌋/3⌋ for the image's k outliers of n patches",
            "correlate": CORRELATE, "compress": COMPRESS},
    params=PARAMS,
    schedule=lambda dims, budget, params: schedule_adaptive("prumerge-plus-adaptive", dims, True, params),
    build=output_build(make_adaptive_reduce),
    budgeted=False,
)

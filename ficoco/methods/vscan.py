"""VScan (Zhang et al., TMLR 2026, arXiv 2505.22654; authors' code: `Tencent/SelfEvolvingAgent`, VScan/):
complementary local and global scans in CLIP with the other patches merged in, then pruning at a
middle LLM layer.

Four steps, in the order the tokens meet them:
local scan   CLIP layer `local_layer` (5), between its attention and MLP: the CLS attention row
             (head mean) split into window×window windows of the patch grid (6×6 on 24×24); the
             top ⌊⌊r·V⌋/windows⌋ patches of every window are the local picks. Nothing is removed:
             the picks move to the front of the patch sequence, which is how the next step learns
             them (the later layers are permutation-equivariant, positions come with the tokens)
global scan  the output of the feature layer (22): the V − local patches with the highest CLS
             attention of that layer among the rest; output [V kept ; N − V others], each in
             positional order (the projector runs on all N, as in the authors' code)
merge        the projector output: every other token joins its most cosine-similar kept token, and
             each kept token becomes the mean of itself and its joiners; V tokens reach the LLM
prune        the input of LLM layer K (None = the middle layer, 16 of 32): layer K's head-mean
             attention (own q/k, RoPE) from the last instruction token; keep the top k (PDrop's rule)

Budgets: the tower delivers V = min(round(vision_factor·B), N) tokens (96 for B = 64 with factor 1.5,
the authors' README setting) and layer K keeps k = ⌊(L·B − V·K)/(L − K)⌋, so the LLM layer average
is ≤ B (96 → 32 at layer 16 averages 64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ficoco.budget import InfeasibleBudget, keep_for_budget, layer_average, round_half_up, step_counts
from ficoco.contract import (ImageTokens, LLMLayerStep, Needs, Plan, ProjectorStep, StepShape, VisionLayerStep,
                             VisionOutputScores, VisionOutputStep, VisionScores, VisionTokens)
from ficoco.methods.base import (Method, Param, non_negative_int, optional_non_negative_int, positive_int,
                                 positive_number, unit_interval)
from ficoco.methods.shared import (LLM_NEEDS, LastQueryTopK, cosine_macs, unreduced_llm_plan, vision_layer_counts,
                                   vision_rows_macs)
from ficoco.paradigm.compress import average_into_targets, gather_tokens
from ficoco.paradigm.correlate import cosine_argmax
from ficoco.paradigm.filter import complement_positions, top_k_positions, window_top_k


@dataclass(frozen=True)
class LocalScan:
    """The local scan at one CLIP layer: `per_window` picks per window lead the patch sequence."""

    per_window: int
    window: int
    grid_hw: tuple[int, int]

    def __call__(self, layer: int, tokens: VisionTokens, scores: VisionScores) -> VisionTokens:
        patches = tokens.hidden[:, 1:]                                          # (B, N, D)
        batch, n = tokens.positions.shape
        cls = torch.zeros(batch, 1, dtype=torch.long, device=patches.device)
        # no step ran before this one, so the patches are still in raster order
        attention = scores.rows(cls)[:, 0, 1:]                                  # (B, N) CLS -> patch
        picks = window_top_k(attention, self.grid_hw, self.window, self.per_window)   # (B, local) ascending
        order = torch.cat([picks, complement_positions(picks, n)], dim=1)       # (B, N) the picks first
        return VisionTokens(hidden=torch.cat([tokens.hidden[:, :1], gather_tokens(patches, order)], dim=1),
                            positions=tokens.positions.gather(1, order))

    def overhead(self, dims, shape: StepShape) -> int:
        return vision_rows_macs(dims, 1, shape.tokens)                          # the CLS row over 1+N keys


@dataclass(frozen=True)
class GlobalScan:
    """The global scan at the feature layer: the first `local_count` patches are the local picks; the
    `global_count` most CLS-attended others join them. Output: the kept patches, then the others."""

    local_count: int
    global_count: int

    def __call__(self, layer: int, tokens: VisionTokens, scores: VisionOutputScores) -> ImageTokens:
        positions = tokens.positions                                            # (B, N) raster positions, picks first
        n = positions.shape[1]
        index_of = positions.argsort(dim=1)                                     # (B, N) current index of raster cell p
        attention = scores.cls_row()[:, 1:].gather(1, index_of)                 # (B, N) in raster order
        is_local = index_of < self.local_count                                  # (B, N) in raster order
        picks = top_k_positions(attention.masked_fill(is_local, float("-inf")), self.global_count)
        kept = torch.cat([positions[:, :self.local_count], picks], dim=1).sort(dim=1).values   # (B, V)
        order = torch.cat([kept, complement_positions(kept, n)], dim=1)         # (B, N) raster, kept first
        return ImageTokens(hidden=gather_tokens(tokens.hidden[:, 1:], index_of.gather(1, order)), positions=order)

    def overhead(self, dims, shape: StepShape) -> int:
        return vision_rows_macs(dims, 1, shape.tokens)                          # the CLS row over 1+N keys


@dataclass(frozen=True)
class MergeProjected:
    """The merge after the projector: the first `kept` tokens absorb the others (nearest by cosine, mean)."""

    kept: int

    def __call__(self, layer: int, tokens: ImageTokens, scores: None) -> ImageTokens:
        targets, sources = tokens.hidden[:, :self.kept], tokens.hidden[:, self.kept:]   # (B, V, D), (B, N−V, D)
        nearest = cosine_argmax(sources, targets)                               # (B, N−V) into the targets
        # the kept raster positions are the first V of the vision-output trace; these tokens are merged
        return ImageTokens(hidden=average_into_targets(targets, sources, nearest), positions=None)

    def overhead(self, dims, shape: StepShape) -> int:
        return cosine_macs(shape.tokens - shape.kept, shape.kept, dims.llm_hidden)


def split(delivered: int, local_ratio: float, windows: int) -> tuple[int, int]:
    """(picks per window, global picks): ⌊⌊r·V⌋/windows⌋ per window as the authors' code divides it;
    the global scan takes the rest of V (the authors' takes V − ⌊r·V⌋ and delivers fewer than V
    when ⌊r·V⌋ is no multiple of the window count)."""
    per_window = math.floor(delivered * local_ratio) // windows
    return per_window, delivered - per_window * windows


def prune_layer(dims, layer: int | None) -> int:
    """K: the given LLM layer, or the middle one (⌊L/2⌋) for None."""
    layer = dims.llm_layers // 2 if layer is None else layer
    if not 0 <= layer <= dims.llm_layers - 1:
        raise ValueError(f"vscan: layer={layer}: need 0 <= layer <= {dims.llm_layers - 1} (the {dims.llm_layers} "
                         f"LLM layers), or None for the middle layer")
    return layer


def schedule(dims, budget, params) -> dict:
    tower = tower_schedule(dims, budget, params)
    return {**tower, **llm_schedule(dims, tower["delivered"], budget, params)}


def tower_schedule(dims, budget, params) -> dict:
    """The two scans and the merge: V = min(round(vision_factor·B), patches) tokens from the tower."""
    grid, last, window = dims.grid_side, dims.last_vision_layer, params["window"]
    if params["local_layer"] >= last:
        raise ValueError(f"vscan: local_layer={params['local_layer']}: need 0 <= local_layer <= {last - 1} (a CLIP "
                         f"layer before the feature layer {last}, whose CLS attention the global scan reads)")
    if grid % window:
        divisors = [side for side in range(1, grid + 1) if grid % side == 0]
        raise ValueError(f"vscan: window={window} must divide the side of the {grid}x{grid} patch grid; "
                         f"valid: {divisors}")
    if budget is None:
        return {"vision": None, "vision_counts": vision_layer_counts(dims, {}), "delivered": dims.visual_tokens,
                "post_vision": None}
    delivered = min(round_half_up(params["vision_factor"] * budget), dims.num_patches)
    if delivered < 1:
        raise ValueError(f"vscan: vision_factor={params['vision_factor']} x budget {budget} rounds to {delivered} "
                         f"tokens from the tower; need >= 1")
    per_window, global_count = split(delivered, params["local_ratio"], (grid // window) ** 2)
    return {
        "vision": {"layers": [params["local_layer"]], "grid_hw": [grid, grid], "discards": [0],
                   "patches_out": [dims.num_patches]},
        "vision_counts": vision_layer_counts(dims, {}),
        "delivered": delivered,
        "post_vision": {"site": "vision_output", "layer": last, "tokens_out": delivered,
                        "local": delivered - global_count, "global": global_count, "per_window": per_window},
        "projector_tokens": dims.num_patches,              # the merge follows the projector, which runs on all
    }


def llm_schedule(dims, delivered: int, budget: int | None, params) -> dict:
    """The prune at LLM layer K: keep k = ⌊(L·B − V·K)/(L − K)⌋ of the V `delivered` tokens."""
    layer = prune_layer(dims, params["layer"])
    if budget is None:
        return unreduced_llm_plan(dims, {"delivered": delivered})
    try:
        keep = keep_for_budget(budget, layer, dims.llm_layers, delivered, method="vscan")
    except InfeasibleBudget as error:
        raise InfeasibleBudget(f"{str(error).rstrip('.')} (the LLM starts from the V={delivered} tokens the tower "
                               f"delivers, vision_factor={params['vision_factor']})") from None
    counts = step_counts(delivered, dims.llm_layers, {layer: keep})
    return {"llm": {"layers": [layer], "discards": [delivered - keep], "n0": delivered, "final": keep,
                    "visual_out": [keep]},
            "llm_visual": counts, "layer_average": layer_average(counts)}


def build(plan: Plan) -> tuple:
    if plan.post_vision is None:
        return ()
    vision, post, llm = plan.vision, plan.post_vision.details, plan.llm
    # per image (per tower pass on LLaVA-NeXT, where plan.delivered counts every pass's tokens)
    patches, delivered = vision.patches_out[0], plan.post_vision.tokens_out
    local = LocalScan(per_window=post["per_window"], window=plan.params["window"], grid_hw=tuple(vision.grid_hw))
    scan = GlobalScan(local_count=post["local"], global_count=post["global"])
    merge = MergeProjected(kept=delivered)
    layer, keep = llm.layers[0], llm.visual_out[0]
    prune = LastQueryTopK(keep={layer: keep})
    return (VisionLayerStep(layers=tuple(vision.layers), reduce=local, tokens_out={vision.layers[0]: patches},
                            overhead=local.overhead, attention="rows"),
            VisionOutputStep(reduce=scan, tokens_out=patches, overhead=scan.overhead),
            ProjectorStep(reduce=merge, tokens_out=delivered, overhead=merge.overhead),
            LLMLayerStep(layers=(layer,), reduce=prune, tokens_out={layer: keep}, overhead=prune.overhead))


METHOD = Method(
    name="vscan",
    summary="VScan: local scan (per-window CLS attention of CLIP layer 5) and global scan (CLS attention of the "
            "feature layer) keep V = 1.5·B patches, the others merged into them after the projector; the middle "
            "LLM layer keeps the k most attended by the last instruction token, so the layer average is <= B",
    phase="both",
    acts_on=("vision", "projector", "llm"),
    needs=Needs(cls_first=True, positions=LLM_NEEDS.positions),
    needs_attention="the CLS rows of CLIP layer 5 (next to its fused attention) and of the feature layer 22 (from "
                    "its recorded q/k); one row (the last instruction token) of the pruning LLM layer on its own "
                    "input, recomputed from its q/k (the layer keeps SDPA)",
    stages={
        "filter": "local: the top ⌊⌊r·V⌋/16⌋ patches by layer-5 CLS attention in each 6×6 window; global: the "
                  "V − local others with the highest feature-layer CLS attention; in the LLM layer K (middle): "
                  "keep the top k by its attention from the last instruction token",
        "correlate": "every other patch's most cosine-similar kept token (projected features, K = 1); K = 0 in "
                     "the LLM",
        "compress": "each kept token becomes the mean of itself and its merged tokens, in positional order; the "
                    "LLM deletes the rest from the sequence and the KV cache of layers >= K (RoPE positions kept)",
    },
    params={
        "vision_factor": Param(1.5, "the tower delivers V = min(round(vision_factor·B), patches) tokens (96 for "
                                    "B = 64, the authors' setting)", positive_number),
        "local_ratio": Param(0.5, "r: the local scan picks ⌊⌊r·V⌋/windows⌋ patches per window, the global scan "
                                  "the rest of V", unit_interval),
        "window": Param(6, "side of the local scan's windows in patches (6: 4×4 windows on 24×24); must divide "
                           "the grid side", positive_int),
        "local_layer": Param(5, "CLIP layer (0-based) whose CLS attention the local scan reads; before the "
                                "feature layer", non_negative_int),
        "layer": Param(None, "K: the LLM layer (0-based) at whose input the visual tokens are pruned; None = the "
                             "middle layer ⌊L/2⌋ (16 of 32)", optional_non_negative_int),
    },
    schedule=schedule,
    build=build,
    tower_schedule=tower_schedule,
    llm_schedule=llm_schedule,
)

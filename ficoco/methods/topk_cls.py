"""TopK-CLS (methods.md §8.11, FasterVLM-style): keep the B patches the CLS token attends to most.

filter    importance = the CLS row of the feature layer's attention (layer 22), averaged over heads;
          the top B patches are kept (ties to the lower position), in positional order
correlate K = 0
compress  delete the rest (CLS is not delivered)
The CLS row is recomputed from the layer's own q/k, so the layer keeps its fused attention.
"""
from __future__ import annotations

from dataclasses import dataclass

from ficoco.contract import ImageTokens, StepShape, VisionOutputScores, VisionTokens
from ficoco.methods.base import Method
from ficoco.methods.shared import (TOWER_NEEDS, check_patch_count, feature_plan, keep_patches, output_build,
                                  vision_rows_macs)
from ficoco.paradigm.filter import top_k_positions


@dataclass(frozen=True)
class TopKClsReduce:
    """Keep the `keep` patches with the highest CLS attention."""

    keep: int

    def __call__(self, layer: int, tokens: VisionTokens, scores: VisionOutputScores) -> ImageTokens:
        cls_attention = scores.cls_row()[:, 1:]                                 # (B, N) CLS -> patches
        return keep_patches(tokens, top_k_positions(cls_attention, self.keep))

    def overhead(self, dims, shape: StepShape) -> int:
        return vision_rows_macs(dims, 1, shape.tokens)                          # CLS query · 1+N keys, every head


def schedule(dims, budget, params) -> dict:
    if budget is not None:
        check_patch_count("topk-cls", dims, budget, "budget (patches kept)")
    return feature_plan(dims, budget, "vision_output", kept=budget)


METHOD = Method(
    name="topk-cls",
    summary="TopK-CLS: keep the B patches with the highest CLS attention of the feature layer (after CLIP)",
    phase="vision",
    acts_on=("vision",),
    needs=TOWER_NEEDS,
    needs_attention="CLS row of the feature layer (22), recomputed from its q/k (fused attention is fine)",
    stages={"filter": "CLS attention of the feature layer, head mean; the top B patches are kept",
            "correlate": "K = 0",
            "compress": "delete the other patches; kept patches in positional order"},
    params={},
    schedule=schedule,
    build=output_build(lambda plan: TopKClsReduce(keep=plan.post_vision.tokens_out)),
)

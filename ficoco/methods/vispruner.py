"""VisPruner (Zhang et al., ICCV 2025, arXiv 2412.01818; `Theia-4869/VisPruner@a089bff7`): important
patches by CLS attention, then diverse patches left after removing duplicates.

On the output of the feature layer (layer 22), with that layer's CLS attention and output H:
filter    important = the I = ⌊r·B⌋ patches with the highest CLS attention (head mean); the other
          patches, in descending attention order, lose their most duplicated members in rounds of
          bipartite matching on the cosine of H (A = 1st, 3rd, … of the current order, B = 2nd, 4th,
          …; the ≤ 8 A-patches most similar to a B-patch go) until B − I diverse patches remain
correlate K = 0 (the matching only scores duplication)
compress  delete the rest; CLS is not delivered (LLaVA's "default" strategy); kept patches in positional order
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ficoco.contract import ImageTokens, StepShape, VisionOutputScores, VisionTokens
from ficoco.methods.base import Method, Param, unit_interval
from ficoco.methods.shared import (TOWER_NEEDS, check_patch_count, cosine_macs, feature_plan, keep_patches,
                                  output_build, vision_rows_macs)
from ficoco.paradigm.filter import rank_descending, vispruner_diverse, vispruner_rounds

PER_ROUND = 8      # duplicates dropped per matching round, fixed in the authors' code


@dataclass(frozen=True)
class VisPrunerReduce:
    """`important` patches by CLS attention, then `diverse` patches by duplicate removal, per image."""

    important: int
    diverse: int

    def __call__(self, layer: int, tokens: VisionTokens, scores: VisionOutputScores) -> ImageTokens:
        ranked = rank_descending(scores.cls_row()[:, 1:])                      # (B, N) patches, most attended first
        important = ranked[:, :self.important]                                  # (B, I)
        # the rest stays in descending attention order: that order decides the first A/B split
        diverse = vispruner_diverse(tokens.hidden[:, 1:], ranked[:, self.important:], self.diverse,
                                    PER_ROUND)                                  # (B, diverse)
        return keep_patches(tokens, torch.cat([important, diverse], dim=1).sort(dim=1).values)

    def overhead(self, dims, shape: StepShape) -> int:
        macs = vision_rows_macs(dims, 1, shape.tokens)                          # CLS query · 1+N keys, every head
        # every round: cosine of the ⌈R/2⌉ A-patches against the ⌊R/2⌋ B-patches, hidden states (width D_v)
        for remaining, _ in vispruner_rounds(shape.tokens - 1 - self.important, self.diverse, PER_ROUND):
            macs += cosine_macs((remaining + 1) // 2, remaining // 2, dims.vision_hidden)
        return macs


def split(budget: int, important_ratio: float) -> tuple[int, int]:
    """(important, diverse) for B: I = int(B·r) as the authors' code computes it (the float product,
    floored), diverse = B − I."""
    important = math.floor(budget * important_ratio)
    return important, budget - important


def schedule(dims, budget, params) -> dict:
    if budget is None:
        return feature_plan(dims, None, "vision_output")
    check_patch_count("vispruner", dims, budget, "budget (patches kept)")
    important, diverse = split(budget, params["important_ratio"])
    return feature_plan(dims, budget, "vision_output", important=important, diverse=diverse)


METHOD = Method(
    name="vispruner",
    summary="VisPruner: important patches by CLS attention, plus diverse patches left after removing duplicates "
            "by bipartite hidden-state cosine (after CLIP)",
    phase="vision",
    acts_on=("vision",),
    needs=TOWER_NEEDS,
    needs_attention="CLS row of the feature layer (22), recomputed from its q/k (fused attention is fine); "
                    "the duplicate matching reads the layer's output, not its keys",
    stages={"filter": "important = the top ⌊r·B⌋ patches by CLS attention of the feature layer; the rest, in "
                      "attention order, lose the ≤ 8 most duplicated A-patches per round of bipartite matching "
                      "(alternate A/B, hidden-state cosine) until B − ⌊r·B⌋ diverse patches remain",
            "correlate": "K = 0",
            "compress": "delete the other patches (CLS not delivered); kept patches in positional order"},
    params={"important_ratio": Param(0.5, "r: ⌊r·B⌋ important patches by CLS attention, the other "
                                          "B − ⌊r·B⌋ diverse", unit_interval)},
    schedule=schedule,
    build=output_build(lambda plan: VisPrunerReduce(important=plan.post_vision.details["important"],
                                                    diverse=plan.post_vision.details["diverse"])),
)

"""VisionZip (methods.md §8.7): dominant tokens by CLS attention plus merged contextual tokens.

On the output of the feature layer (layer 22), with that layer's attention and keys:
filter    dominant = CLS + the D − 1 patches with the highest CLS attention (head mean; the spec's
          head sum ranks the same), in positional order
correlate the other patches R: every ⌊|R|/C⌋-th one (the first C) is an anchor; every remaining
          patch joins its most key-similar anchor (head-averaged keys, cosine, K = 1)
compress  contextual_j = H[anchor_j] + mean(H[patches assigned to j]) (or H[anchor_j] alone)
Output: CLS, the D − 1 dominant patches, then the C contextual tokens; D + C = B.
Split: C = round(10·B/64) unless `contextual` is given (54 + 10, 108 + 20, 162 + 30).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ficoco.budget import visionzip_split
from ficoco.contract import ImageTokens, StepShape, VisionOutputScores, VisionTokens
from ficoco.methods.base import Method, Param, optional_non_negative_int
from ficoco.methods.shared import (TOWER_NEEDS, check_patch_count, cosine_macs, feature_plan, output_build,
                                  vision_rows_macs)
from ficoco.paradigm.attention import head_mean_keys
from ficoco.paradigm.compress import contextual_tokens, gather_tokens
from ficoco.paradigm.correlate import cosine_argmax
from ficoco.paradigm.filter import complement_positions, strided_positions, top_k_positions


@dataclass(frozen=True)
class VisionZipReduce:
    """`dominant` tokens (CLS included) and `contextual` merged tokens per image."""

    dominant: int
    contextual: int

    def __call__(self, layer: int, tokens: VisionTokens, scores: VisionOutputScores) -> ImageTokens:
        hidden = tokens.hidden                                                   # (B, 1+N, D)
        patches = hidden[:, 1:]
        batch, n = tokens.positions.shape
        dominant = top_k_positions(scores.cls_row()[:, 1:], self.dominant - 1)  # (B, D-1) into the patches
        parts, built_on = [hidden[:, :1], gather_tokens(patches, dominant)], [dominant]
        if self.contextual:
            remaining = complement_positions(dominant, n)                        # (B, R)
            anchor_index = strided_positions(remaining.shape[1], self.contextual, hidden.device).expand(batch, -1)
            anchors = remaining.gather(1, anchor_index)                           # (B, C)
            members = remaining.gather(1, complement_positions(anchor_index, remaining.shape[1]))   # (B, R-C)
            keys = head_mean_keys(scores.keys())[:, 1:]                          # (B, N, d)
            assignment = cosine_argmax(gather_tokens(keys, members), gather_tokens(keys, anchors))  # (B, R-C)
            parts.append(contextual_tokens(gather_tokens(patches, anchors), gather_tokens(patches, members),
                                           assignment))
            built_on.append(anchors)
        kept = torch.cat(built_on, dim=1).sort(dim=1).values
        return ImageTokens(hidden=torch.cat(parts, dim=1), positions=tokens.positions.gather(1, kept))

    def overhead(self, dims, shape: StepShape) -> int:
        cls_row = vision_rows_macs(dims, 1, shape.tokens)                       # CLS query · 1+N keys, every head
        if not self.contextual:
            return cls_row
        # the R − C members (1+N − kept) against the C anchors, cosine of head-mean keys (width d);
        # the contextual merge is a scatter-add mean, no product
        members = shape.tokens - shape.kept
        return cls_row + cosine_macs(members, self.contextual, dims.vision_hidden // dims.vision_heads)


def split(dims, budget: int, contextual: int | None) -> tuple[int, int]:
    """(dominant incl. CLS, contextual) for B: the spec's rule, or B − C and C with C given."""
    if contextual is None:
        try:
            dominant, contextual = visionzip_split(budget)
        except ValueError as error:
            raise ValueError(f"visionzip: {error}") from None
    else:
        dominant = budget - contextual
        if dominant < 1:
            raise ValueError(f"visionzip: contextual={contextual} leaves {dominant} dominant tokens for budget "
                             f"{budget}; need contextual <= {budget - 1} (CLS is always a dominant token)")
    check_patch_count("visionzip", dims, dominant - 1 + contextual, "dominant patches + contextual tokens")
    return dominant, contextual


def schedule(dims, budget, params) -> dict:
    if budget is None:
        return feature_plan(dims, None, "vision_output")
    dominant, contextual = split(dims, budget, params["contextual"])
    return feature_plan(dims, budget, "vision_output", dominant=dominant, contextual=contextual)


METHOD = Method(
    name="visionzip",
    summary="VisionZip: CLS + dominant patches by CLS attention, plus contextual tokens merged by key cosine "
            "(after CLIP)",
    phase="vision",
    acts_on=("vision",),
    needs=TOWER_NEEDS,
    needs_attention="CLS row and keys of the feature layer (22), recomputed from its q/k (fused attention is fine)",
    stages={"filter": "dominant = CLS + the top D−1 patches by CLS attention of the feature layer",
            "correlate": "every ⌊|R|/C⌋-th remaining patch is an anchor; the others join the nearest anchor "
                         "by head-averaged key cosine (K = 1)",
            "compress": "contextual token = anchor + mean of its members; output dominant then contextual"},
    params={"contextual": Param(None, "contextual tokens C (None = round(10·B/64): 10 / 20 / 30 at 64 / 128 / 192); "
                                      "dominant = B − C, CLS included", optional_non_negative_int)},
    schedule=schedule,
    build=output_build(lambda plan: VisionZipReduce(dominant=plan.post_vision.details["dominant"],
                                                    contextual=plan.post_vision.details["contextual"])),
)

"""EViT with the fused inattentive token (methods.md §8.2), at three CLIP layers.

In each reducing layer, between the attention residual and the MLP:
filter    importance = the CLS attention row A[0, i] (head mean); candidates are all non-CLS tokens,
          an earlier fused token included; the n_k − 1 most attended are kept, the rest are sources
correlate convergent: every source goes to one new token
compress  fused = Σ_{i∈S} A[0, i]·x_i (a weighted sum, not normalised), appended after the kept tokens.

Schedule: after stage k the tokens (fused token included, CLS not) number n_k = round(576·ρ^k) with
ρ = (B/576)^(1/stages), so the last stage delivers B (`budget.evit_stage_counts`).
The fused token has no patch position: it is recorded as -1 in `positions` / `last_trace()`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ficoco.budget import evit_stage_counts
from ficoco.contract import StepShape, VisionScores, VisionTokens
from ficoco.methods.base import Method, Param
from ficoco.methods.shared import TOWER_NEEDS, encoder_plan, patches_for, vision_layer_build, vision_rows_macs
from ficoco.paradigm.compress import fused_token, gather_tokens
from ficoco.paradigm.filter import complement_positions, top_k_positions

FUSED_POSITION = -1          # `positions` entry of a fused token (it covers no single patch)


def increasing_layers(value) -> str | None:
    ok = (isinstance(value, (list, tuple)) and len(value) >= 1
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
          and all(a < b for a, b in zip(value, value[1:])))
    return None if ok else "must be a non-empty list of strictly increasing layer indices >= 0"


@dataclass(frozen=True)
class EvitReduce:
    """One EViT stage; `keep[layer]` candidates (n_k − 1) stay at each reducing layer, plus the fused token."""

    keep: dict[int, int]

    def __call__(self, layer: int, tokens: VisionTokens, scores: VisionScores) -> VisionTokens:
        batch, n_candidates = tokens.positions.shape
        cls = torch.zeros(batch, 1, dtype=torch.long, device=tokens.hidden.device)
        importance = scores.rows(cls)[:, 0, 1:]                                # (B, N) A[0, i], float32
        kept = top_k_positions(importance, self.keep[layer])                   # (B, n_k − 1) into candidates
        sources = complement_positions(kept, n_candidates)                     # (B, N − n_k + 1)
        candidates = tokens.hidden[:, 1:]                                      # (B, N, D)
        fused = fused_token(gather_tokens(candidates, sources), importance.gather(1, sources))   # (B, 1, D)
        hidden = torch.cat([tokens.hidden[:, :1], gather_tokens(candidates, kept), fused], dim=1)
        positions = torch.cat([tokens.positions.gather(1, kept),
                               torch.full((batch, 1), FUSED_POSITION, dtype=kept.dtype, device=kept.device)], dim=1)
        key_bias = tokens.key_bias
        if key_bias is not None:                                               # a neutral bias for the new token
            key_bias = torch.cat([key_bias[:, :1], key_bias[:, 1:].gather(1, kept), key_bias.new_zeros(batch, 1)], 1)
        return VisionTokens(hidden=hidden, positions=positions, key_bias=key_bias)

    def overhead(self, dims, shape: StepShape) -> int:
        # kept = CLS + (n_k − 1) candidates + the fused token; the other N − (n_k − 1) are the sources
        sources = shape.tokens - shape.kept + 1
        cls_row = vision_rows_macs(dims, 1, shape.tokens)                      # the CLS row q·k over 1+N keys
        return cls_row + sources * dims.vision_hidden                          # fused token (1×S)·(S×D)


def schedule(dims, budget, params) -> dict:
    layers = list(params["layers"])
    last = dims.last_vision_layer
    if layers[-1] > last:
        raise ValueError(f"evit: layers={layers} must lie in 0..{last}, the vision layers that produce LLaVA's "
                         f"features; rescale them for this model (LLaVA-1.5: [7, 13, 19])")
    discards = {}
    if budget is not None:
        totals = evit_stage_counts(dims.num_patches, patches_for(dims, budget), len(layers))
        before = [dims.num_patches, *totals[:-1]]
        discards = {layer: start - end for layer, start, end in zip(layers, before, totals)}
    return encoder_plan(dims, discards)


# EViT keeps n − 1 attentive patches plus the fused token at each stage
build = vision_layer_build(lambda layers, vision: EvitReduce(
    {layer: total - 1 for layer, total in zip(layers, vision.patches_out)}), attention="rows")


METHOD = Method(
    name="evit",
    summary="EViT: keep the most CLS-attended tokens at CLIP layers 7, 13, 19 and fuse the rest into one token",
    phase="vision",
    acts_on=("vision",),
    needs=TOWER_NEEDS,
    needs_attention="the CLS attention row of each reducing CLIP layer (computed next to fused attention)",
    stages={
        "filter": "importance = CLS attention A[0, i] over all non-CLS tokens (earlier fused token included); "
                  "outside the top n_k − 1 = sources",
        "correlate": "convergent: every source goes to one new token",
        "compress": "fused token Σ A[0, i]·x_i over the sources (unnormalised), appended after the kept tokens",
    },
    params={
        "layers": Param((7, 13, 19), "reducing vision layers (0-based), one EViT stage each; LLaVA-1.5: EViT's "
                        "4th/7th/10th of 12 rescaled to 24", increasing_layers),
    },
    schedule=schedule,
    build=build,
)

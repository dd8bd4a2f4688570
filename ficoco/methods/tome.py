"""ToMe, token merging (methods.md §8.1), inside every executed CLIP layer.

In each layer, between the attention residual and the MLP:
filter    bipartite split of the current tokens by alternating order (A = even, B = odd positions);
          each A-token scores its best cosine with a B-token on the layer's keys (head mean,
          L2-normalised); CLS is protected; the r_l highest-scoring A-tokens are the sources
correlate K = 1: each source's target is its most similar B-token
compress  size-weighted average x_b ← (m_b x_b + Σ m_a x_a)/(m_b + Σ m_a); sizes add; sources deleted.
Later layers use proportional attention: log(size) is added to every attention logit as a key
bias (`VisionTokens.key_bias`), which is also how the sizes travel from one layer to the next.

Order (`order`, spec §8.1): "authors" (default) hands each layer's merge output to the next layer as
the authors' `tome/merge.py` returns it, `[unmerged A ; B]` (CLS first), so the next even/odd split
runs over that order; after the last merging layer the tokens return to positional order for the
projector. "positional" restores positional order after every layer (the earlier project rule).
One layer of either order is the authors' merge; over several layers only "authors" is.

Schedule: r_l = spread(576 − B, n_layers) over layers 0..22 (all executed layers by default), capped
at ⌊(#tokens − 1)/2⌋ (`budget.tome_merges`). A budget the cap keeps out of reach is infeasible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ficoco.budget import InfeasibleBudget, tome_merges
from ficoco.contract import StepShape, VisionScores, VisionTokens
from ficoco.methods.base import Method, Param, non_negative_int, one_of, optional_non_negative_int
from ficoco.methods.shared import (TOWER_NEEDS, cosine_macs, encoder_plan, patches_for, vision_layer_build,
                                  vision_layers)
from ficoco.paradigm.attention import head_mean_keys, proportional_attention_bias, require
from ficoco.paradigm.compress import size_weighted_merge
from ficoco.paradigm.filter import bipartite_max_similarity, complement_positions, top_k_positions


def token_sizes(tokens: VisionTokens) -> torch.Tensor:
    """(B, 1+N) float32 number of original tokens in each token, read back from the key bias log(size).

    Sizes are whole numbers, so rounding exp(log m) recovers them exactly; no bias yet = all ones.
    """
    if tokens.key_bias is None:
        return torch.ones(tokens.hidden.shape[:2], device=tokens.hidden.device)
    return tokens.key_bias.float().exp().round()


ORDERS = ("authors", "positional")


def hand_on_order(kept: torch.Tensor, raster: torch.Tensor, authors: bool) -> torch.Tensor:
    """(B, 1+M) the tokens that stay after a merge, in the order the next layer gets them.

    kept: (B, 1+M) their current indices, ascending, CLS (0) first; raster: (B, N) the raster position
    of every current token but CLS. authors: [unmerged A ; B] as the authors' merge returns it (A = even
    current index, so CLS stays first); else raster order.
    """
    if authors:
        return kept.gather(1, (kept % 2).argsort(dim=1, stable=True))     # A-tokens first, each side in order
    by_raster = raster.gather(1, kept[:, 1:] - 1).argsort(dim=1, stable=True)
    return torch.cat([kept[:, :1], kept[:, 1:].gather(1, by_raster)], dim=1)


@dataclass(frozen=True)
class TomeReduce:
    """One ToMe merge; `merges[layer]` A-tokens merge into B-tokens at each reducing layer, handed on
    in the authors' order (`authors`) until the last merging layer, else in positional order."""

    merges: dict[int, int]
    authors: bool

    def __call__(self, layer: int, tokens: VisionTokens, scores: VisionScores) -> VisionTokens:
        r = self.merges[layer]
        metric = head_mean_keys(scores.keys())                                 # (B, 1+N, d)
        similarity, partners = bipartite_max_similarity(metric, protect_first=True)   # (B, 1+N) each
        sources = top_k_positions(similarity, r)                               # (B, r) A-tokens, full axis
        require(similarity.gather(1, sources).isfinite().all(),
                f"tome: layer {layer} merges r={r} of {tokens.hidden.shape[1]} tokens, more than the "
                f"{(tokens.hidden.shape[1] - 1) // 2} A-tokens that may merge (CLS is protected)")
        destinations = partners.gather(1, sources)                             # (B, r) B-tokens, K = 1
        kept = hand_on_order(complement_positions(sources, tokens.hidden.shape[1]), tokens.positions,
                             self.authors and layer != max(self.merges))       # (B, 1+N-r), CLS first
        hidden, sizes, kept = size_weighted_merge(tokens.hidden, token_sizes(tokens), sources, destinations, kept)
        return VisionTokens(
            hidden=hidden,                                                     # (B, 1+N-r, D)
            positions=tokens.positions.gather(1, kept[:, 1:] - 1),             # a merged token keeps its
            key_bias=proportional_attention_bias(sizes)[:, 0, 0, :],           # destination's position
        )

    def overhead(self, dims, shape: StepShape) -> int:
        # the A (even) × B (odd) cosine of the head-mean keys, one head wide; the merge is a scatter-add
        a_tokens, b_tokens = (shape.tokens + 1) // 2, shape.tokens // 2
        return cosine_macs(a_tokens, b_tokens, dims.vision_hidden // dims.vision_heads)


def _smallest_reachable(n_patches: int, layers: list[int]) -> int:
    """The smallest budget whose spread schedule the ⌊(#tokens − 1)/2⌋ cap does not cut."""
    return next(budget for budget in range(1, n_patches + 1)
                if sum(tome_merges(n_patches, budget, layers).values()) == n_patches - budget)


def schedule(dims, budget, params) -> dict:
    layers = vision_layers("tome", dims, params["start"], params["end"])
    merges = {}
    if budget is not None:
        patches = patches_for(dims, budget)
        merges = tome_merges(dims.num_patches, patches, layers)
        if sum(merges.values()) != dims.num_patches - patches:
            smallest = _smallest_reachable(dims.num_patches, layers)
            hint = ("an earlier start adds merging layers, which reach lower budgets" if layers[0] > 0 else
                    "every executed vision layer already merges")
            raise InfeasibleBudget(
                f"tome: budget B={budget} is infeasible with {len(layers)} merging layers "
                f"({layers[0]}..{layers[-1]}): spreading {dims.num_patches - patches} merges evenly, the cap "
                f"r_l <= floor((#tokens - 1)/2) leaves {dims.num_patches - sum(merges.values())} patches. The "
                f"smallest reachable budget is {smallest - (dims.num_patches - dims.visual_tokens)}; {hint}")
    return encoder_plan(dims, merges)


def build(plan: dict) -> tuple:
    authors = plan.params["order"] == "authors"
    return vision_layer_build(lambda layers, vision: TomeReduce(dict(zip(layers, vision.discards)), authors),
                              attention="keys")(plan)


METHOD = Method(
    name="tome",
    summary="ToMe: bipartite key-similarity merging in every executed CLIP layer, proportional attention",
    phase="vision",
    acts_on=("vision",),
    needs=TOWER_NEEDS,
    needs_attention="none: the keys of each CLIP layer (plus a log-size key bias); fused attention is kept",
    stages={
        "filter": "bipartite A (even) / B (odd) split; A-tokens scored by max key cosine to B; CLS protected; "
                  "top r_l = sources",
        "correlate": "K = 1: each source's most similar B-token (head-mean keys, cosine)",
        "compress": "size-weighted average into the B-token, sizes add; log(size) added to later attention logits; "
                    "handed on as [unmerged A ; B] (the authors' order), positional for the projector",
    },
    params={
        "start": Param(0, "first merging vision layer (0-based)", non_negative_int),
        "end": Param(None, "last merging vision layer, inclusive; None = the last layer LLaVA reads (22)",
                     optional_non_negative_int),
        "order": Param("authors", "token order between merging layers: 'authors' ([unmerged A ; B] as the "
                                  "authors' merge returns it; positional again for the projector) or 'positional' "
                                  "(after every layer)", one_of(ORDERS)),
    },
    schedule=schedule,
    build=build,
)

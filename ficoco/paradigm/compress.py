"""Compress: fold the sources into the targets (or into new tokens), then keep only the targets.

Arithmetic runs in float32 and the result is cast back to the input dtype, so bf16/fp16 models
lose no precision to accumulation. In `self_preserving_merge` a target that receives no weight
comes back bit-identical.

Shapes: B = batch, N = tokens, S = sources, T = targets, D = width.
Index tensors are int64 positions into the token axis.
"""
from __future__ import annotations

import torch

from ficoco.paradigm.attention import _float32, on_host, require
from ficoco.paradigm.filter import complement_positions


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The tokens x[b, index[b]] of every sample, in the order of index.

    x: (B, N, D); index: (B, K) -> (B, K, D).
    """
    if x.shape[0] == 1 and index.shape[0] == 1:
        # whole-row copies (index_select) are several times cheaper than an element-wise gather
        return x.index_select(1, index[0])
    if x.device.type == "cpu":
        rows = [x[b].index_select(0, index[b]) for b in range(index.shape[0])]
        if len(rows) == 1:
            return rows[0].unsqueeze(0)
        if rows:
            return torch.stack(rows)
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def self_preserving_merge(x_targets: torch.Tensor, x_sources: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """FiCoCo's merge x_j ← (x_j + Σ_i α_ij x_i) / (1 + Σ_i α_ij) (methods.md §3 step 8).

    x_targets: (B, T, D); x_sources: (B, S, D); weights α: (B, S, T) -> (B, T, D) in x_targets'
    dtype. The target keeps weight 1, so it is never swamped by its sources; every source
    contributes its pre-merge value.

    On the CPU Σ_i α_ij x_i is summed over the nonzero α only (a source has a handful of targets,
    so the dense (T×S)·(S×D) product is almost all zeros); each target adds its sources in
    ascending source order. Elsewhere the dense product, which a GPU does in a few microseconds
    and without atomics.
    """
    weights = _float32(weights)
    if on_host(weights):
        incoming = _sparse_incoming(weights, _float32(x_sources))  # (B, T, D): Σ_i α_ij x_i
    else:
        incoming = weights.transpose(1, 2) @ x_sources.float()  # (B, T, D): Σ_i α_ij x_i
    incoming_weight = weights.sum(dim=1).unsqueeze(-1)  # (B, T, 1): Σ_i α_ij
    merged = (_float32(x_targets) + incoming) / (1.0 + incoming_weight)
    return merged if merged.dtype == x_targets.dtype else merged.to(x_targets.dtype)


def _sparse_incoming(weights: torch.Tensor, x_sources: torch.Tensor) -> torch.Tensor:
    """Σ_i α_ij x_i from the nonzero entries of α only. weights (B, S, T), x_sources (B, S, D) float32
    -> (B, T, D) float32; a target that no source chose gets exact zeros."""
    batch, n_sources, n_targets = weights.shape
    width = x_sources.shape[-1]
    rows = weights.reshape(batch * n_sources, n_targets)
    # (nnz, 2) [b·S + i, j], ascending: by sample, then source, then target
    sample_source, target = rows.nonzero().t().contiguous()
    flat = sample_source * n_targets + target  # position in weights.reshape(-1)
    if batch > 1:
        target = target + sample_source // n_sources * n_targets  # b·T + j
    contributions = x_sources.reshape(batch * n_sources, width).index_select(0, sample_source)  # (nnz, D)
    contributions = contributions * rows.reshape(-1).index_select(0, flat).unsqueeze(-1)  # α_ij x_i
    incoming = x_sources.new_zeros(batch * n_targets, width)
    return incoming.index_add_(0, target, contributions).view(batch, n_targets, width)


# ------------------------------------------------------------------------------------------------
# Baseline compressions (methods.md §8)

def size_weighted_merge(
    x: torch.Tensor, sizes: torch.Tensor, sources: torch.Tensor, destinations: torch.Tensor,
    kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's merge x_b ← (m_b x_b + Σ_a m_a x_a)/(m_b + Σ_a m_a); sizes add; sources deleted (§8.1).

    x: (B, N, D); sizes: (B, N) tokens already merged into each token (1 = original);
    sources: (B, S) positions; destinations: (B, S) position each source merges into (never a
    source); kept: (B, N−S) the other positions in the order to return them (default ascending).
    Returns (x_kept (B, N−S, D), sizes_kept (B, N−S), kept (B, N−S) positions), in `kept`'s order;
    a merged token sits at its destination's position.
    """
    n, width = x.shape[1], x.shape[2]
    is_source = torch.zeros(sizes.shape, dtype=torch.bool, device=x.device).scatter_(1, sources, True)
    require(~is_source.gather(1, destinations).any(),
            "destinations must not be sources: a source cannot receive another source")
    if kept is None:
        kept = complement_positions(sources, n)  # (B, N−S)
    sizes = sizes.float()
    weighted = x.float() * sizes.unsqueeze(-1)  # (B, N, D): m·x, so merging is a plain sum; a new tensor
    moved = gather_tokens(weighted, sources)  # (B, S, D), read before the sum below writes into weighted
    weighted.scatter_add_(1, destinations.unsqueeze(-1).expand(-1, -1, width), moved)
    merged_sizes = sizes.scatter_add(1, destinations, sizes.gather(1, sources))  # (B, N)
    kept_sizes = merged_sizes.gather(1, kept)
    x_kept = gather_tokens(weighted, kept).div_(kept_sizes.unsqueeze(-1))
    return x_kept.to(x.dtype), kept_sizes, kept


def fused_token(x_sources: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One new token Σ_i w_i x_i (a weighted *sum*, not normalised): EViT's fused token, PruMerge's extra token.

    x_sources: (B, S, D); weights: (B, S) -> (B, 1, D) in x_sources' dtype.
    """
    fused = weights.float().unsqueeze(1) @ x_sources.float()  # (B, 1, D)
    return fused.to(x_sources.dtype)


def group_means(x: torch.Tensor, groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the tokens of every group (cluster means of SparseVLM; VisionZip's assigned tokens).

    x: (B, N, D); groups: (B, N) int64 in [0, n_groups) -> (means (B, G, D) float32, zero for an
    empty group; counts (B, G) float32).
    """
    batch, _, width = x.shape
    sums = x.new_zeros(batch, n_groups, width, dtype=torch.float32)
    sums = sums.scatter_add(1, groups.unsqueeze(-1).expand(-1, -1, width), x.float())  # (B, G, D)
    counts = torch.zeros(batch, n_groups, device=x.device).scatter_add(1, groups, torch.ones(groups.shape, device=x.device))
    return sums / counts.clamp(min=1).unsqueeze(-1), counts


def contextual_tokens(x_anchors: torch.Tensor, x_members: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """VisionZip's contextual tokens: anchor + mean of the tokens assigned to it (§8.7).

    An anchor with no assigned token stays itself. x_anchors: (B, C, D); x_members: (B, R, D);
    assignment: (B, R) anchor index of every member -> (B, C, D) in x_anchors' dtype.
    """
    member_means, _ = group_means(x_members, assignment, x_anchors.shape[1])  # (B, C, D)
    return (x_anchors.float() + member_means).to(x_anchors.dtype)


def average_into_targets(x_targets: torch.Tensor, x_sources: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """VScan's merge: every target becomes the mean of itself and the sources assigned to it,
    x_j ← (x_j + Σ_{i: a_i = j} x_i) / (1 + #{i: a_i = j}); a target without sources is unchanged.

    x_targets: (B, T, D); x_sources: (B, S, D); assignment: (B, S) int64 target index of every
    source -> (B, T, D) in x_targets' dtype, summed in float32.
    """
    batch, n_targets, _ = x_targets.shape
    own = torch.arange(n_targets, device=assignment.device).expand(batch, -1)   # every target in its own group
    means, _ = group_means(torch.cat([x_targets, x_sources], dim=1), torch.cat([own, assignment], dim=1), n_targets)
    return means.to(x_targets.dtype)


def prumerge_merge(x: torch.Tensor, weights: torch.Tensor, kept: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """PruMerge's compress: x_i ← x_i + Σ_{j∈NN(i)} a_j x_j for every kept i, then one extra token
    Σ_{j pruned} a_j x_j appended (§8.6). The weights a are CLS attention, not normalised, and every
    neighbour contributes its pre-merge value.

    x: (B, N, D); weights: (B, N); kept: (B, K) sorted positions; neighbours: (B, K, k) positions
    (from `correlate.knn_positions`) -> (B, K + 1, D) in x's dtype.
    """
    batch, n_kept, n_neighbours = neighbours.shape
    flat = neighbours.reshape(batch, n_kept * n_neighbours)  # (B, K·k)
    neighbour_x = gather_tokens(x.float(), flat).reshape(batch, n_kept, n_neighbours, -1)  # (B, K, k, D)
    neighbour_w = weights.float().gather(1, flat).reshape(batch, n_kept, n_neighbours, 1)  # (B, K, k, 1)
    x_kept = gather_tokens(x.float(), kept) + (neighbour_w * neighbour_x).sum(dim=2)  # (B, K, D)
    pruned = complement_positions(kept, x.shape[1])  # (B, N−K)
    extra = fused_token(gather_tokens(x.float(), pruned), weights.float().gather(1, pruned))  # (B, 1, D)
    return torch.cat([x_kept, extra], dim=1).to(x.dtype)


def pool_grid(x: torch.Tensor, grid_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling of raster-ordered grid tokens to an h×w grid (spatial pooling, §8.12).

    x: (B, H·W, D) -> (B, h·w, D) raster order, in x's dtype. Every cell is the mean of its members.
    """
    (height, width), (out_height, out_width) = grid_hw, out_hw
    batch, n, dim = x.shape
    if n != height * width:
        raise ValueError(f"x has {n} tokens but grid {height}x{width} holds {height * width}")
    grid = x.float().reshape(batch, height, width, dim).permute(0, 3, 1, 2)  # (B, D, H, W)
    pooled = torch.nn.functional.adaptive_avg_pool2d(grid, (out_height, out_width))  # (B, D, h, w)
    return pooled.permute(0, 2, 3, 1).reshape(batch, out_height * out_width, dim).to(x.dtype)

"""Correlate: how strongly each source relates to each target, and which targets J_i it merges into.

A correlation is a (B, S, T) matrix C (row = source, column = target). A weight function turns C
into merge weights α of the same shape: zero outside J_i, every row summing to 1 (or all zero
for pure pruning, K = 0).

Shapes: B = batch, S = sources, T = targets, M = instruction tokens, N = tokens, D = width.
Index tensors are int64 positions into the token axis they refer to.
"""
from __future__ import annotations

import functools

import torch

from ficoco.paradigm.attention import _float32, on_host, pairwise_cosine
from ficoco.paradigm.filter import argmax_lowest, rank_descending


def take(attn: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The sub-matrix attn[b, rows[b]][:, cols[b]] of every sample.

    attn: (B, R, C); rows: (B, r); cols: (B, c) -> (B, r, c).
    """
    batch, _, n_cols = attn.shape
    if attn.device.type == "cpu" or rows.shape[0] == 1:
        # two row copies per sample (index_select) are several times cheaper than two element-wise gathers
        picked = [attn[b].index_select(0, rows[b]).index_select(1, cols[b]) for b in range(rows.shape[0])]
        if len(picked) == 1:
            return picked[0].unsqueeze(0)
        if picked:
            return torch.stack(picked)
    picked_rows = attn.gather(1, rows.unsqueeze(-1).expand(batch, rows.shape[1], n_cols))  # (B, r, C)
    return picked_rows.gather(2, cols.unsqueeze(1).expand(batch, rows.shape[1], cols.shape[1]))  # (B, r, c)


def ficoco_l_correlation(
    attn_vv: torch.Tensor,
    attn_qv: torch.Tensor,
    sources: torch.Tensor,
    targets: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """FiCoCo-L correlation C_ij = γ·A[max(i,j), min(i,j)] + (1−γ)·(1/M)Σ_k A[k,i]·A[k,j] (methods.md §4).

    attn_vv: (B, N, N) visual→visual causal attention, positions in sequence order;
    attn_qv: (B, M, N) instruction→visual; sources: (B, S), targets: (B, T) positions into N.
    Returns (B, S, T) float32.
    """
    if attn_qv.shape[1] == 0:
        raise ValueError("FiCoCo-L needs at least one instruction token (M = 0 given)")
    attn_vv = attn_vv.float()
    # direct: the later token is the query, the only direction the causal mask leaves visible
    source_queries = take(attn_vv, sources, targets)  # (B, S, T): A[i, j]
    target_queries = take(attn_vv, targets, sources).transpose(1, 2)  # (B, S, T): A[j, i]
    source_is_later = sources.unsqueeze(2) > targets.unsqueeze(1)  # (B, S, T)
    direct = torch.where(source_is_later, source_queries, target_queries)
    # indirect: both tokens are attended by the same instruction tokens
    attn_qv = attn_qv.float()
    n_instruction = attn_qv.shape[1]
    qs = attn_qv.gather(2, sources.unsqueeze(1).expand(-1, n_instruction, -1))  # (B, M, S)
    qt = attn_qv.gather(2, targets.unsqueeze(1).expand(-1, n_instruction, -1))  # (B, M, T)
    indirect = qs.transpose(1, 2) @ qt / n_instruction  # (B, S, T)
    return gamma * direct + (1.0 - gamma) * indirect


def _normalise_over(corr: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """α_ij = C_ij / Σ_{j'∈J_i} C_ij' on the chosen entries, 1/|J_i| where that sum underflows to 0.

    corr: (B, S, T) float; chosen: (B, S, T) bool, J_i per row -> (B, S, T) float32.
    """
    corr = _float32(corr)
    chosen_corr = torch.where(chosen, corr, 0.0)
    row_sum = chosen_corr.sum(dim=-1, keepdim=True)  # (B, S, 1)
    underflow = row_sum == 0
    if on_host(corr) and not bool(underflow.any()):
        return chosen_corr / row_sum  # the usual case; the same values as below without the uniform rows
    uniform = chosen.float() / chosen.sum(dim=-1, keepdim=True).clamp(min=1)
    return torch.where(underflow, uniform, chosen_corr / row_sum.masked_fill(underflow, 1.0))


def adaptive_quantile_weights(corr: torch.Tensor, eps: float) -> torch.Tensor:
    """FiCoCo's token-adaptive targets: J_i = {j : C_ij ≥ quantile(C_i, ε)}, α normalised over J_i.

    corr: (B, S, T) -> (B, S, T) float32; zero outside J_i, rows sum to 1. The quantile is
    torch.quantile's linear interpolation over the T entries of each row. J_i always holds the
    row maximum (the quantile never exceeds it), so no row is empty.
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1]; got {eps}")
    batch, n_sources, n_targets = corr.shape
    if n_sources == 0 or batch == 0:
        return corr.new_zeros(corr.shape, dtype=torch.float32)
    if n_targets == 0:
        raise ValueError(f"sources need at least one target; got {n_sources} sources and 0 targets")
    corr = _float32(corr)
    threshold = _row_quantile(corr, eps)  # (B, S, 1), bit-identical to torch.quantile
    return _normalise_over(corr, corr >= threshold)


def _row_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(values, q, dim=-1, keepdim=True) with linear interpolation, from a partial top-k
    instead of a full sort of every row; bit-identical to torch.quantile.

    values: (..., n) float with n ≥ 1 -> (..., 1). Linear interpolation reads only the sorted values
    at ranks ⌊r⌋ and ⌈r⌉ with r = q·(n−1), so only the n − ⌊r⌋ largest values of a row matter (3 for
    q = 0.998 and n ≥ 2). r, its fraction and the interpolation are computed as torch.quantile does:
    r in the dtype of `values` (q converted to it first), then lerp(v[⌊r⌋], v[⌈r⌉], r − ⌊r⌋). A row
    holding NaN gives NaN, as in torch.quantile.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1]; got {q}")
    n = values.shape[-1]
    if n == 0:
        raise ValueError("quantile of an empty row")
    below, above, fraction = _quantile_rank(q, n, values.dtype)
    top = values.topk(n - below, dim=-1, largest=True, sorted=True).values  # (..., n − ⌊r⌋), descending
    value_below = top[..., n - 1 - below:n - below]  # ascending rank ⌊r⌋
    value_above = top[..., n - 1 - above:n - above]  # ascending rank ⌈r⌉
    quantile = torch.lerp(value_below, value_above, fraction)
    # torch.quantile sorts NaN last and then reads the last rank of such a row, i.e. NaN. topk, like
    # sort, ranks NaN above every number, so a row holds NaN exactly when its top value is NaN
    # (the only value not equal to itself).
    largest = top[..., :1]
    return torch.where(largest == largest, quantile, largest)


@functools.lru_cache(maxsize=256)
def _quantile_rank(q: float, n: int, dtype: torch.dtype) -> tuple[int, int, float]:
    """⌊r⌋, ⌈r⌉ and r − ⌊r⌋ for r = q·(n−1) computed as torch.quantile does: q converted to `dtype`,
    the product and the fraction in `dtype` (the fraction is returned as the exact Python float)."""
    rank = torch.tensor(q, dtype=dtype) * (n - 1)  # 0-d, on the CPU
    below = int(rank)
    return below, int(torch.ceil(rank)), float(rank - below)


def fixed_k_weights(corr: torch.Tensor, k: int) -> torch.Tensor:
    """Every source merges into its k most correlated targets (ties to the lower target index).

    corr: (B, S, T) -> (B, S, T) float32. k = 0 is pure pruning (all zeros); k ≥ 1 normalises
    the k chosen correlations of each row to sum to 1.
    """
    n_targets = corr.shape[-1]
    if not 0 <= k <= n_targets:
        raise ValueError(f"k must be in [0, {n_targets}] (the number of targets); got {k}")
    if k == 0:
        return torch.zeros_like(corr, dtype=torch.float32)
    top = rank_descending(corr)[..., :k]  # (B, S, k)
    chosen = torch.zeros_like(corr, dtype=torch.bool).scatter_(-1, top, True)
    return _normalise_over(corr, chosen)


# ------------------------------------------------------------------------------------------------
# Baseline correlations (methods.md §8)

def cosine_argmax(x_from: torch.Tensor, x_to: torch.Tensor) -> torch.Tensor:
    """K = 1 by cosine: the index of the most similar row of x_to for every row of x_from.

    ToMe's partner choice and VisionZip's nearest-anchor assignment. Ties to the lower index.
    x_from: (B, n, D); x_to: (B, m, D) -> (B, n) int64 indices into x_to.
    """
    return argmax_lowest(pairwise_cosine(x_from, x_to))


def knn_positions(metric: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """The k most cosine-similar other tokens of every query token (PruMerge's kNN, §8.6).

    metric: (B, N, D), e.g. keys; queries: (B, q) positions into N -> (B, q, k) int64 positions,
    most similar first, ties to the lower position; a token is never its own neighbour.
    """
    n = metric.shape[1]
    if not 0 <= k <= n - 1:
        raise ValueError(f"k must be in [0, {n - 1}] (the other tokens); got {k}")
    query_metric = metric.gather(1, queries.unsqueeze(-1).expand(-1, -1, metric.shape[-1]))  # (B, q, D)
    similarity = pairwise_cosine(query_metric, metric)  # (B, q, N)
    similarity = similarity.scatter(2, queries.unsqueeze(-1), float("-inf"))  # exclude the token itself
    return rank_descending(similarity)[..., :k]


def dpc_knn_clusters(
    x: torch.Tensor, n_clusters: int, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Density-peak clustering with kNN density (SparseVLM's recycling, §8.4).

    density_i = exp(−mean of the squared distances to i's k nearest other tokens), plus a jitter
    in [0, 1e-6) from `generator` that breaks density ties (none without a generator);
    δ_i = distance to the nearest denser token (the largest distance of the row for the densest);
    centres = the n_clusters largest density·δ (ties to the lower position); every token joins its
    nearest centre (ties to the lower centre), a centre its own cluster. Distances are Euclidean
    divided by √D.
    x: (B, N, D) -> (B, N) int64 cluster index in [0, n_clusters), centres numbered by position.
    """
    batch, n, width = x.shape
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}]; got {n_clusters}")
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, {n - 1}] (the other tokens); got {k}")
    x = x.float()
    distance = torch.cdist(x, x) / width**0.5  # (B, N, N)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    nearest = distance.masked_fill(eye, float("inf")).sort(dim=-1).values[..., :k]  # (B, N, k)
    density = torch.exp(-(nearest**2).mean(dim=-1))  # (B, N)
    if generator is not None:
        density = density + torch.rand(density.shape, generator=generator, device=generator.device).to(x.device) * 1e-6
    denser = density.unsqueeze(1) > density.unsqueeze(2)  # (B, N, N): [i, j] = j denser than i
    row_max = distance.amax(dim=-1, keepdim=True)  # (B, N, 1)
    delta = torch.where(denser, distance, row_max).amin(dim=-1)  # (B, N)
    centres = rank_descending(density * delta)[:, :n_clusters].sort(dim=-1).values  # (B, C)
    to_centres = distance.gather(2, centres.unsqueeze(1).expand(batch, n, n_clusters))  # (B, N, C)
    assignment = argmax_lowest(-to_centres)  # (B, N)
    return assignment.scatter(1, centres, torch.arange(n_clusters, device=x.device).expand(batch, n_clusters))

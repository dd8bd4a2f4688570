"""Filter: score the candidate tokens and split them into sources S (discarded) and targets T (kept).

Scores are *redundancy*: the highest scores are discarded. A method that scores importance passes
-importance, or uses `top_k_positions` to keep the most important tokens directly.
Every ranking is deterministic: higher score first, ties to the lower position (methods.md §0),
implemented with a stable sort rather than relying on torch.topk's order.

Shapes: B = batch, N = candidate tokens, M = instruction tokens. Index tensors are int64
positions into the candidate axis, sorted ascending unless a docstring says otherwise.
"""
from __future__ import annotations

import hashlib

import torch

from ficoco.paradigm.attention import pairwise_cosine


# ------------------------------------------------------------------------------------------------
# Ranking and selection (shared by every method)

def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """Positions along the last axis ordered by score, highest first, ties to the lower position.

    scores: (..., N) -> (..., N) int64. The stable sort keeps equal scores in position order.
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def argmax_lowest(scores: torch.Tensor) -> torch.Tensor:
    """Position of the highest score along the last axis, ties to the lower position.

    scores: (..., N) -> (...) int64.
    """
    return rank_descending(scores)[..., 0]


def _check_count(name: str, count: int, n: int) -> None:
    if not 0 <= count <= n:
        raise ValueError(f"{name} must be in [0, {n}] (the number of candidates); got {count}")


def top_k_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring positions (ties to the lower position), sorted ascending.

    scores: (B, N) -> (B, k) int64.
    """
    _check_count("k", k, scores.shape[-1])
    return rank_descending(scores)[..., :k].sort(dim=-1).values


def complement_positions(positions: torch.Tensor, n: int) -> torch.Tensor:
    """The positions in [0, n) that are not in `positions`, sorted ascending.

    positions: (B, k) distinct positions per row -> (B, n - k) int64.
    """
    batch, k = positions.shape
    taken = torch.zeros(batch, n, dtype=torch.bool, device=positions.device)
    taken.scatter_(1, positions, True)
    if int(taken.sum()) != batch * k:
        raise ValueError(f"positions must be distinct and in [0, {n}) in every row; got {positions.tolist()}")
    # nonzero walks rows in order, so every row's free positions come out ascending
    return (~taken).nonzero()[:, 1].reshape(batch, n - k)


def split_by_score(scores: torch.Tensor, n_discard: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split candidates into sources (the n_discard highest scores) and targets (the rest).

    scores: (B, N) redundancy -> sources (B, n_discard), targets (B, N - n_discard), both int64
    and sorted ascending.
    """
    n = scores.shape[-1]
    _check_count("n_discard", n_discard, n)
    order = rank_descending(scores)  # (B, N)
    sources = order[:, :n_discard].sort(dim=-1).values
    targets = order[:, n_discard:].sort(dim=-1).values
    return sources, targets


# ------------------------------------------------------------------------------------------------
# FiCoCo scores (methods.md §3 steps 2-5, §4 step 1)

def received_attention(attn: torch.Tensor) -> torch.Tensor:
    """Mean attention every token receives from the *other* queries: (1/(N-1)) Σ_{j≠i} attn[j, i].

    attn: (B, N, N), row = query, column = key -> (B, N) float32. Entries zeroed by a causal mask
    stay in the mean. With N = 1 there is no other query and the result is 0.
    """
    n = attn.shape[-1]
    attn = attn.float()
    if n < 2:
        return attn.new_zeros(attn.shape[:-1])
    column_sums = attn.sum(dim=-2)  # (B, N): Σ_j attn[j, i]
    self_attention = attn.diagonal(dim1=-2, dim2=-1)  # (B, N): attn[i, i]
    return (column_sums - self_attention) / (n - 1)


def ficoco_v_scores(attn: torch.Tensor, lam: float) -> torch.Tensor:
    """FiCoCo-V redundancy s_i = λ·vr_i − (1−λ)·A[0, i] over the patches (CLS is not a candidate).

    attn: (B, 1+N, 1+N) head-mean probabilities with CLS at position 0 -> (B, N) float32.
    """
    patch_attn = attn[:, 1:, 1:]  # (B, N, N)
    cls_attn = attn[:, 0, 1:].float()  # (B, N): how much CLS attends to each patch
    return lam * received_attention(patch_attn) - (1.0 - lam) * cls_attn


def ficoco_l_scores(attn_vv: torch.Tensor, attn_qv: torch.Tensor, beta: float) -> torch.Tensor:
    """FiCoCo-L redundancy s_i = β·(1/(N−1))Σ_{j≠i} A[j, i] − (1−β)·(1/M)Σ_k A[k, i].

    attn_vv: (B, N, N) visual→visual rows/columns of the causal attention (sequence order);
    attn_qv: (B, M, N) instruction→visual. Returns (B, N) float32.
    """
    if attn_qv.shape[1] == 0:
        raise ValueError("FiCoCo-L needs at least one instruction token (M = 0 given)")
    instruction_attn = attn_qv.float().mean(dim=1)  # (B, N)
    return beta * received_attention(attn_vv) - (1.0 - beta) * instruction_attn


def local_penalty(
    scores: torch.Tensor,
    grid_positions: torch.Tensor,
    grid_hw: tuple[int, int],
    window: int = 2,
    coef: float = 2.0,
) -> torch.Tensor:
    """Multiply the highest score of every window of the patch grid by `coef` (methods.md §3 step 5).

    scores: (B, N); grid_positions: (B, N) int64 original raster positions (row·W + col) of the
    current patches; positions not listed were discarded earlier and leave their window smaller.
    Windows are window×window, anchored at (0, 0), partial at an odd border. Ties inside a window
    go to the lower original position. Returns (B, N) in the dtype of scores.
    """
    height, width = grid_hw
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    n_cells = height * width
    if grid_positions.numel() and not (0 <= int(grid_positions.min()) and int(grid_positions.max()) < n_cells):
        raise ValueError(
            f"grid_positions must lie in [0, {n_cells}) for grid {height}x{width}; "
            f"got min {int(grid_positions.min())}, max {int(grid_positions.max())}"
        )
    batch = scores.shape[0]
    windows_per_row = -(-width // window)
    n_windows = -(-height // window) * windows_per_row
    window_id = (grid_positions // width // window) * windows_per_row + (grid_positions % width) // window  # (B, N)

    window_max = scores.new_full((batch, n_windows), float("-inf"))
    window_max = window_max.scatter_reduce(1, window_id, scores, reduce="amax")  # (B, n_windows)
    is_max = scores == window_max.gather(1, window_id)  # (B, N)
    # among a window's maxima, the one with the lowest original position is penalised
    candidate_position = torch.where(is_max, grid_positions, n_cells)
    first_max = grid_positions.new_full((batch, n_windows), n_cells)
    first_max = first_max.scatter_reduce(1, window_id, candidate_position, reduce="amin")  # (B, n_windows)
    is_penalised = is_max & (grid_positions == first_max.gather(1, window_id))
    return torch.where(is_penalised, scores * coef, scores)

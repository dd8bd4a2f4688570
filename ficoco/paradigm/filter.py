"""Filter: score the candidate tokens and split them into sources S (discarded) and targets T (kept).

Scores are *redundancy*: the highest scores are discarded. A method that scores importance passes
-importance, or uses `top_k_positions` to keep the most important tokens directly.
Every ranking is deterministic: higher score first, ties to the lower position (methods.md §0),
implemented with a stable sort rather than relying on torch.topk's order.

Shapes: B = batch, N = candidate tokens, M = instruction tokens. Index tensors are int64
positions into the candidate axis, sorted ascending unless a docstring says otherwise.
"""
from __future__ import annotations

import functools
import hashlib

import torch

from ficoco.budget import spread
from ficoco.paradigm.attention import _float32, on_host, pairwise_cosine, require


# ------------------------------------------------------------------------------------------------
# Ranking and selection (shared by every method)

def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """Positions along the last axis ordered by score, highest first, ties to the lower position.

    scores: (..., N) -> (..., N) int64. The stable sort keeps equal scores in position order.
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def argmax_lowest(scores: torch.Tensor) -> torch.Tensor:
    """Position of the highest score along the last axis, ties to the lower position.

    scores: (..., N) -> (...) int64. torch.argmax returns the first maximal position (documented),
    which is the tie rule; a full sort would cost N log N per row for the same answer.
    """
    return scores.argmax(dim=-1)


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
    taken = torch.zeros(batch, n, dtype=torch.uint8, device=positions.device)
    taken.scatter_(1, positions, 1)
    require((taken.sum(dim=1) == k).all(), f"complement_positions: positions must be distinct and in [0, {n}) "
                                           f"in every row")
    # a stable sort puts every row's free positions (0) first, in ascending order: no count read on the host
    return torch.argsort(taken, dim=1, stable=True)[:, :n - k]


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
    attn = _float32(attn)
    if n < 2:
        return attn.new_zeros(attn.shape[:-1])
    column_sums = attn.sum(dim=-2)  # (B, N): Σ_j attn[j, i]
    self_attention = attn.diagonal(dim1=-2, dim2=-1)  # (B, N): attn[i, i]
    return (column_sums - self_attention) / (n - 1)


def ficoco_v_scores(attn: torch.Tensor, lam: float, semantic: torch.Tensor | None = None,
                    prefix: int = 1) -> torch.Tensor:
    """FiCoCo-V redundancy s_i = λ·vr_i − (1−λ)·a_i over the patches (CLS is not a candidate).

    attn: (B, P+N, P+N) head-mean probabilities with `prefix` P tokens first (1: CLS at position 0; 0: a
    tower without CLS) -> (B, N) float32.
    semantic: (B, N) the semantic term a_i; None = A[0, i], how much CLS attends to patch i (needs P = 1).
    """
    if semantic is None and prefix != 1:
        raise ValueError(f"ficoco_v_scores: the CLS semantic term reads A[0, i], and prefix={prefix} (no CLS); "
                         f"pass the semantic term (key_mean_semantic)")
    patch_attn = attn[:, prefix:, prefix:]  # (B, N, N)
    semantic = _float32(attn[:, 0, 1:] if semantic is None else semantic)  # (B, N)
    return lam * received_attention(patch_attn) - (1.0 - lam) * semantic


def key_mean_semantic(keys: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """FiCoCo-V's semantic term without CLS (v4 App. Table 9): a_i = −cos(μ, P_i), with P_i patch i's key
    averaged over heads and μ the mean of the P_i: a patch like the average one is deemed redundant.

    keys: (B, H, P+N, d) the layer's keys, `prefix` P tokens (CLS) first -> (B, N) float32.
    """
    patch_keys = keys[:, :, prefix:].float().mean(dim=1)                # (B, N, d): P_i
    mean_key = patch_keys.mean(dim=1, keepdim=True)                     # (B, 1, d): μ
    return -pairwise_cosine(patch_keys, mean_key)[..., 0]                # (B, N)


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
    if not on_host(grid_positions):  # an out-of-range index would be a device-side assert: say why, on the
        torch._assert_async(((grid_positions >= 0) & (grid_positions < n_cells)).all(),   # device (no host read)
                            f"local_penalty: grid_positions must lie in [0, {n_cells}) for grid {height}x{width}")
    batch = scores.shape[0]
    window_of_cell, n_windows = _grid_windows(height, width, window, grid_positions.device)
    try:
        window_id = window_of_cell.index_select(0, grid_positions.reshape(-1)).view(grid_positions.shape)  # (B, N)
    except IndexError:  # on the CPU index_select checks the range itself; say which positions
        _check_on_grid(grid_positions, height, width)
        raise

    window_max = scores.new_full((batch, n_windows), float("-inf"))
    window_max = window_max.scatter_reduce(1, window_id, scores, reduce="amax")  # (B, n_windows)
    is_max = scores == window_max.gather(1, window_id)  # (B, N)
    # among a window's maxima, the one with the lowest original position is penalised
    candidate_position = torch.where(is_max, grid_positions, n_cells)
    first_max = grid_positions.new_full((batch, n_windows), n_cells)
    first_max = first_max.scatter_reduce(1, window_id, candidate_position, reduce="amin")  # (B, n_windows)
    is_penalised = is_max & (grid_positions == first_max.gather(1, window_id))
    return torch.where(is_penalised, scores * coef, scores)


def _check_on_grid(grid_positions: torch.Tensor, height: int, width: int) -> None:
    n_cells = height * width
    if grid_positions.numel():
        low, high = (int(value) for value in torch.aminmax(grid_positions))
        if not (0 <= low and high < n_cells):
            raise ValueError(
                f"grid_positions must lie in [0, {n_cells}) for grid {height}x{width}; got min {low}, max {high}"
            )


@functools.lru_cache(maxsize=32)
def _grid_windows(height: int, width: int, window: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """The window of every grid cell, (row // window)·(windows per row) + col // window, as a (H·W,)
    int64 table (read-only, cached per grid), and the number of windows."""
    windows_per_row = -(-width // window)
    cells = torch.arange(height * width, device=device)
    return (cells // width // window) * windows_per_row + (cells % width) // window, -(-height // window) * windows_per_row


# ------------------------------------------------------------------------------------------------
# Baseline filters (methods.md §8)

def bipartite_max_similarity(metric: torch.Tensor, protect_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite scores: A = even positions, B = odd; each a ∈ A scores max_b cos(m_a, m_b).

    metric: (B, N, D), e.g. head-mean keys. Returns
    - scores (B, N): the A-tokens' best cosine; -inf for B-tokens and (with protect_first) for
      the token at position 0 (CLS), so they are never sources;
    - partners (B, N) int64: the full-axis position of every A-token's most similar B-token
      (ties to the lower position), the K = 1 correlation; B-tokens are their own partner.
    Sources are `top_k_positions(scores, r)` with r ≤ ⌊(N − 1)/2⌋ (see budget.tome_merges).
    """
    batch, n = metric.shape[:2]
    scores = torch.full((batch, n), float("-inf"), device=metric.device)
    partners = torch.arange(n, device=metric.device).repeat(batch, 1)  # (B, N)
    if n < 2:
        return scores, partners  # no B-token to merge into
    a_positions = torch.arange(0, n, 2, device=metric.device)  # (Na,)
    b_positions = torch.arange(1, n, 2, device=metric.device)  # (Nb,)
    similarity = pairwise_cosine(metric[:, a_positions], metric[:, b_positions])  # (B, Na, Nb)
    best_b = argmax_lowest(similarity)  # (B, Na)
    best_score = similarity.gather(2, best_b.unsqueeze(-1)).squeeze(-1)  # (B, Na)
    if protect_first:
        best_score[:, 0] = float("-inf")
    scores[:, a_positions] = best_score
    partners[:, a_positions] = b_positions[best_b]
    return scores, partners


def divprune_select(x: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's greedy max–min diversity selection under the distance 1 − cosine (§8.9).

    First the token whose nearest other token is farthest, then repeatedly the token whose
    minimum distance to the chosen set is largest; ties to the lower position.
    x: (B, N, D) -> (B, k) int64, sorted ascending.
    """
    batch, n, _ = x.shape
    _check_count("k", k, n)
    if k == 0:
        return torch.zeros(batch, 0, dtype=torch.int64, device=x.device)
    distance = 1.0 - pairwise_cosine(x, x)  # (B, N, N)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    nearest = distance.masked_fill(eye, float("inf")).amin(dim=-1)  # (B, N)
    chosen = [argmax_lowest(nearest)]  # each (B,)
    min_to_chosen = distance.gather(1, chosen[0][:, None, None].expand(batch, 1, n)).squeeze(1)  # (B, N)
    taken = torch.zeros(batch, n, dtype=torch.bool, device=x.device)
    for _ in range(k - 1):
        taken.scatter_(1, chosen[-1][:, None], True)
        pick = argmax_lowest(min_to_chosen.masked_fill(taken, float("-inf")))  # (B,)
        chosen.append(pick)
        pick_distance = distance.gather(1, pick[:, None, None].expand(batch, 1, n)).squeeze(1)
        min_to_chosen = torch.minimum(min_to_chosen, pick_distance)
    return torch.stack(chosen, dim=1).sort(dim=-1).values


def dart_select(
    hidden_image: torch.Tensor,
    hidden_text: torch.Tensor,
    key_norm_image: torch.Tensor,
    key_norm_text: torch.Tensor,
    k: int,
    n_pivots: int = 4,
) -> torch.Tensor:
    """DART's duplication-aware selection of k image tokens (§8.8).

    Pivots are the n_pivots image and n_pivots text tokens with the largest key L1 norm
    (`attention.key_l1_norm`). In turn (image pivots, then text pivots, each by descending norm)
    every pivot takes its quota of the not yet taken image tokens least cosine-similar to it.
    Quotas are spread(k − image pivots, pivots): ⌊(k − 4)/8⌋ each, the first pivots take the
    remainder. Retained = image pivots ∪ taken, exactly k tokens.
    hidden_image: (B, Nv, D); hidden_text: (B, Nt, D); key_norm_image: (B, Nv);
    key_norm_text: (B, Nt) -> (B, k) int64 positions into the image tokens, sorted ascending.
    """
    batch, n_image, _ = hidden_image.shape
    _check_count("k", k, n_image)
    n_image_pivots = min(n_pivots, k)
    n_text_pivots = min(n_pivots, hidden_text.shape[1])
    image_pivots = rank_descending(key_norm_image)[:, :n_image_pivots]  # (B, Pi) by descending norm
    text_pivots = rank_descending(key_norm_text)[:, :n_text_pivots]  # (B, Pt)
    pivot_states = torch.cat(
        [
            hidden_image.gather(1, image_pivots.unsqueeze(-1).expand(-1, -1, hidden_image.shape[-1])),
            hidden_text.gather(1, text_pivots.unsqueeze(-1).expand(-1, -1, hidden_text.shape[-1])),
        ],
        dim=1,
    )  # (B, P, D)
    similarity = pairwise_cosine(pivot_states, hidden_image)  # (B, P, Nv)
    n_all_pivots = n_image_pivots + n_text_pivots
    quotas = spread(k - n_image_pivots, n_all_pivots) if n_all_pivots else []

    taken = torch.zeros(batch, n_image, dtype=torch.bool, device=hidden_image.device)
    taken.scatter_(1, image_pivots, True)
    for pivot, quota in enumerate(quotas):
        # least similar first: rank the negated similarity, already-taken tokens last
        dissimilarity = (-similarity[:, pivot]).masked_fill(taken, float("-inf"))  # (B, Nv)
        taken.scatter_(1, rank_descending(dissimilarity)[:, :quota], True)
    # a stable sort puts every row's taken positions first, in ascending order: no count read on the host
    return torch.argsort((~taken).to(torch.uint8), dim=1, stable=True)[:, :k]


def vispruner_rounds(n: int, keep: int, per_round: int = 8) -> list[tuple[int, int]]:
    """VisPruner's duplicate-removal rounds that take n candidates down to `keep`: (candidates at the
    start of the round, candidates it drops), dropping min(per_round, n − keep, ⌈n/2⌉) each round (at
    most the A half). keep = 0 needs no round: every candidate goes without matching.
    """
    _check_count("keep", keep, n)
    if per_round < 1:
        raise ValueError(f"per_round must be >= 1; got {per_round}")
    rounds = []
    while 0 < keep < n:
        dropped = min(per_round, n - keep, (n + 1) // 2)
        rounds.append((n, dropped))
        n -= dropped
    return rounds


def vispruner_diverse(metric: torch.Tensor, order: torch.Tensor, keep: int, per_round: int = 8) -> torch.Tensor:
    """VisPruner's diverse tokens: drop the most duplicated candidates, round by round, until `keep` remain.

    Every round (`vispruner_rounds`) splits the candidates by alternating place in their current order
    into A (1st, 3rd, …) and B (2nd, 4th, …), scores each a ∈ A by max_b cos(m_a, m_b) and drops the
    r highest-scoring A-candidates (ties to the earlier place in A). The next order is [the other
    A-candidates by descending score ; B in its order], as the authors' code concatenates them, so
    the starting order decides every split.
    metric: (B, N, D) similarity features; order: (B, R) distinct positions into N, the starting
    order (VisPruner: descending CLS attention) -> (B, keep) int64 positions into N, sorted ascending.
    """
    width = metric.shape[-1]
    for _, dropped in vispruner_rounds(order.shape[1], keep, per_round):
        a, b = order[:, 0::2], order[:, 1::2]                                   # (B, ⌈R/2⌉), (B, ⌊R/2⌋)
        x_a = metric.gather(1, a.unsqueeze(-1).expand(-1, -1, width))          # (B, ⌈R/2⌉, D)
        x_b = metric.gather(1, b.unsqueeze(-1).expand(-1, -1, width))          # (B, ⌊R/2⌋, D)
        duplication = pairwise_cosine(x_a, x_b).amax(dim=-1)                   # (B, ⌈R/2⌉)
        survivors = rank_descending(duplication)[:, dropped:]                  # (B, ⌈R/2⌉ − r), most duplicated go
        order = torch.cat([a.gather(1, survivors), b], dim=1)                  # (B, R − r)
    return order[:, :keep].sort(dim=-1).values


def window_top_k(scores: torch.Tensor, grid_hw: tuple[int, int], window: int, k: int) -> torch.Tensor:
    """The k highest-scoring cells of every window×window window of a raster-ordered grid (VScan's
    local scan). The windows tile the grid from (0, 0); ties go to the lower position.

    scores: (B, H·W) in raster order -> (B, n_windows·k) int64 raster positions, sorted ascending.
    `window` must divide H and W, and k must be in [0, window²].
    """
    height, width = grid_hw
    if window < 1 or height % window or width % window:
        raise ValueError(f"window={window} must be >= 1 and divide both sides of the {height}x{width} grid")
    _check_count("k", k, window * window)
    # every window's cells as raster positions, row-major inside the window (so lower place = lower position)
    cells = torch.arange(height * width, device=scores.device).view(height // window, window, width // window, window)
    cells = cells.permute(0, 2, 1, 3).reshape(-1, window * window)            # (n_windows, w²)
    best = rank_descending(scores[:, cells])[..., :k]                         # (B, n_windows, k) places in a window
    picked = cells.expand(scores.shape[0], -1, -1).gather(2, best)            # (B, n_windows, k) raster positions
    return picked.reshape(scores.shape[0], -1).sort(dim=-1).values


def sample_seed(global_seed: int, sample_id: str) -> int:
    """A reproducible 63-bit seed from (global seed, sample id); stable across processes,
    unlike Python's salted hash()."""
    digest = hashlib.sha256(f"{global_seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def random_positions(n: int, k: int, generator: torch.Generator, batch: int = 1) -> torch.Tensor:
    """k of n positions drawn uniformly without replacement per row (§8.10), sorted ascending.

    The generator decides the draw, so a seeded generator (see `sample_seed`) reproduces it.
    Returns (batch, k) int64 on the generator's device.
    """
    _check_count("k", k, n)
    rows = [torch.randperm(n, generator=generator, device=generator.device)[:k] for _ in range(batch)]
    return torch.stack(rows).sort(dim=-1).values


def strided_positions(n: int, count: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Every ⌊n/count⌋-th position starting at 0, the first `count` of them (VisionZip anchors, §8.7).

    Returns (count,) int64 positions into a run of n tokens.
    """
    _check_count("count", count, n)
    return torch.arange(count, device=device) * (n // max(count, 1))


def evenly_spaced_positions(n: int, count: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`count` positions spread over the whole run of n tokens: ⌊i·n/count⌋ (PruMerge+ raster sample, §8.6).

    Returns (count,) int64, strictly increasing.
    """
    _check_count("count", count, n)
    return torch.arange(count, device=device) * n // max(count, 1)


def iqr_outlier_mask(scores: torch.Tensor) -> torch.Tensor:
    """PruMerge's adaptive selection (§8.6): the scores above Q3 + 1.5·IQR of their own row.

    Quartiles are `torch.quantile`'s "linear" interpolation (numpy's default percentile), computed in
    float64; a score must be strictly above the fence. At least one position is always kept: a row
    with no score above its fence (e.g. all equal) keeps its top-1 (ties to the lower position), so
    an image never delivers only PruMerge's extra token.

    scores: (B, N) -> (B, N) bool. The count differs per row, hence a mask, not positions.
    """
    values = scores.double()
    probabilities = torch.tensor([0.25, 0.75], dtype=values.dtype, device=values.device)
    q1, q3 = torch.quantile(values, probabilities, dim=-1, interpolation="linear")  # (B,) each
    mask = values > (q3 + 1.5 * (q3 - q1)).unsqueeze(-1)
    empty = ~mask.any(dim=-1)                                                          # (B,)
    if bool(empty.any()):
        top = torch.zeros_like(mask).scatter_(1, argmax_lowest(values)[:, None], True)
        mask = mask | (top & empty[:, None])
    return mask


def raster_positions(n: int, stride: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Every `stride`-th position of a raster-ordered run of n tokens: 0, s, 2s, … < n (PruMerge+'s
    adaptive raster sample, §8.6). Returns (⌈n/s⌉,) int64."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an integer >= 1; got {stride!r}")
    return torch.arange(0, n, stride, device=device)


def rater_mask(visual_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """SparseVLM's text raters (§8.4): relevance_t = mean over visual v of softmax_t(v·t); raters
    are the text tokens with above-mean relevance. Where no token is above the mean (all equal,
    e.g. a single text token) every text token rates.

    visual_embeds: (B, Nv, D); text_embeds: (B, Nt, D) LLM input embeddings -> (B, Nt) bool.
    """
    logits = visual_embeds.float() @ text_embeds.float().transpose(1, 2)  # (B, Nv, Nt)
    relevance = logits.softmax(dim=-1).mean(dim=1)  # (B, Nt)
    raters = relevance > relevance.mean(dim=-1, keepdim=True)
    return raters | ~raters.any(dim=-1, keepdim=True)


def rater_scores(attn_tv: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """SparseVLM's visual-token importance: mean over raters t of A[t, v].

    attn_tv: (B, Nt, Nv) text→visual head-mean attention; raters: (B, Nt) bool -> (B, Nv) float32.
    """
    weights = raters.float()  # (B, Nt)
    total = (weights.unsqueeze(-1) * attn_tv.float()).sum(dim=1)  # (B, Nv)
    return total / weights.sum(dim=-1, keepdim=True).clamp(min=1)


# ------------------------------------------------------------------------------------------------
# Instruction-conditioned diversity (CDPruner, §8.13)

def instruction_relevance(cosines: torch.Tensor) -> torch.Tensor:
    """CDPruner's relevance of each visual token of one image to its instruction, as the authors' code
    computes it: the mean over the instruction's text embeddings of the *negative* CLIP cosine,
    min–max normalised over the image's tokens with 1e-6 added to the numerator (so the least relevant
    token keeps a small nonzero weight). A relevance that is the same for every token conditions
    nothing: every token then weighs 1.

    cosines: (N, M) cosine of each token's CLIP image embedding with each of the M text embeddings
    -> (N,) float32 in (0, 1].
    """
    relevance = (-_float32(cosines)).mean(dim=-1)  # (N,)
    low, high = relevance.min(), relevance.max()
    spread = high - low
    # chosen on the device, no read of `spread` on the host; the clamp only keeps the unchosen branch finite
    normalised = (relevance - low + 1e-6) / spread.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(spread > 0, normalised, torch.ones_like(relevance))


def conditional_kernel(x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """CDPruner's conditional DPP kernel L = diag(r)·S·diag(r), S the cosine similarity of the tokens.

    x: (B, N, D) tokens; relevance: (B, N) -> (B, N, N) float32, symmetric positive semi-definite.
    """
    relevance = _float32(relevance)
    return relevance[:, :, None] * pairwise_cosine(x, x) * relevance[:, None, :]


def dpp_greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP inference of a DPP with kernel L: k items, each adding the most to log det L_S.

    The fast form of Chen, Zhang & Zhou (NeurIPS 2018), as CDPruner's code runs it: an incremental
    Cholesky factor `factors` of the chosen items, and per item its gain d_j² = L_jj − ‖c_j‖² (the
    determinant grows by that factor when j joins), updated once per pick; ties to the lower position.
    Once L's rank is used up every remaining gain is 0, and the rest are taken in position order, as
    the tie rule says (the authors' code divides by the square root of such a gain). In floating point
    ties and exhausted gains are rounding noise, whose order differs between processors, so differences
    at the kernel's rounding level, noise = N · eps · max_j L_jj (numpy's `matrix_rank` tolerance), do
    not count: a gain at or below it is 0, and every gain within it of the largest ties with it.

    kernel: (B, N, N) symmetric PSD -> (B, k) int64, sorted ascending.
    """
    batch, n, _ = kernel.shape
    _check_count("k", k, n)
    kernel = _float32(kernel)
    rows = torch.arange(batch, device=kernel.device)
    factors = kernel.new_zeros(k, batch, n)  # (k, B, N) row i: the i-th chosen item's Cholesky column
    diagonal = torch.diagonal(kernel, dim1=1, dim2=2)  # (B, N) L_jj
    noise = diagonal.amax(dim=1, keepdim=True).clamp_min(0) * n * torch.finfo(kernel.dtype).eps  # (B, 1)

    def above_noise(values: torch.Tensor) -> torch.Tensor:
        return torch.where(values > noise, values, 0.0)

    gains = above_noise(diagonal)  # (B, N) d_j²
    taken = torch.zeros(batch, n, dtype=torch.bool, device=kernel.device)
    chosen = []
    for i in range(k):
        open_gains = gains.masked_fill(taken, float("-inf"))  # (B, N)
        ties = open_gains >= open_gains.amax(dim=1, keepdim=True) - noise  # (B, N) within rounding of the best
        pick = argmax_lowest(ties.to(torch.uint8))  # (B,) the lowest of them
        chosen.append(pick)
        taken[rows, pick] = True
        gain = gains[rows, pick]  # (B,)
        # (B, 1, i) @ (B, i, N): c_pick · c_j for every item j
        projected = torch.bmm(factors[:i, rows, pick].T[:, None], factors[:i].transpose(0, 1))[:, 0]  # (B, N)
        inverse_root = torch.where(gain > 0, gain.clamp_min(torch.finfo(gain.dtype).tiny).rsqrt(), 0.0)  # (B,)
        factors[i] = (kernel[rows, pick] - projected) * inverse_root[:, None]
        gains = above_noise(gains - factors[i].square())
    return torch.stack(chosen, dim=1).sort(dim=-1).values

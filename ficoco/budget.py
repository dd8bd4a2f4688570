"""Budgets and the per-layer schedules that realise them (methods.md §2, §8).

A budget B is the number of visual tokens averaged over all LLM decoder layers during prefill.
Every function here is plain integer arithmetic: no torch, no model. Counts are per LLM layer
unless a name says otherwise; "n0" is the number of visual tokens before any reduction
(576 for LLaVA-1.5).

Rounding: "round" in the specs is taken as round-half-up (`round_half_up`), never Python's
banker's rounding; none of the spec's tables sits on a half.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from ficoco.budget_labels import ImageTokens


class InfeasibleBudget(ValueError):
    """A budget that the method cannot reach with its configured schedule (methods.md §2.1)."""


def round_half_up(value: float) -> int:
    """The nearest integer, halves rounded up."""
    return math.floor(value + 0.5)


def span_budget(budget: int, span: int, nominal: int) -> int:
    """The budget of one image whose LLM span holds `span` visual tokens, for a budget stated on the nominal
    image of `nominal` tokens (LLaVA-NeXT, `ModelDims.visual_tokens`): the same kept fraction,
    budget·span/nominal, rounded half up, at least 1 and at most the span."""
    if not 1 <= budget <= nominal or span < 1:
        raise ValueError(f"span_budget: budget {budget} of a nominal {nominal} tokens on a span of {span}: need "
                         f"1 <= budget <= nominal and span >= 1")
    return min(max(round_half_up(budget * span / nominal), 1), span)


def image_budget(budget, span: int, nominal: int) -> int | None:
    """The budget of one image of `span` visual tokens: a budget stated on the nominal image of `nominal`
    tokens (an int) keeps its fraction (`span_budget`); a per-image count
    (`ficoco.budget_labels.ImageTokens`) is that count, or None (unreduced: the image is kept whole, no
    reduction runs) when the image has no more tokens than that."""
    if isinstance(budget, ImageTokens):
        if span < 1:
            raise ValueError(f"image_budget: a span of {span} tokens; need >= 1")
        return budget.tokens if budget.tokens < span else None
    return span_budget(budget, span, nominal)


def spread(total: int, n: int) -> list[int]:
    """Split `total` discards over n layers as evenly as possible; earlier layers take the remainder."""
    if n < 1:
        raise ValueError(f"n (the number of reducing layers) must be >= 1; got {n}")
    if total < 0:
        raise ValueError(f"total (discards) must be >= 0; got {total}")
    q, r = divmod(total, n)
    return [q + 1] * r + [q] * (n - r)


def layer_average(counts: Sequence[int]) -> float:
    """The average of per-layer visual counts: the realised budget."""
    if not counts:
        raise ValueError("counts must list at least one layer")
    return sum(counts) / len(counts)


def step_counts(n0: int, n_layers: int, changes: dict[int, int]) -> list[int]:
    """Per-layer visual counts when `changes[l]` tokens are present from layer l on.

    Layers before the first change see n0. Used for one-shot and staged pruning
    (FastV, DART, PDrop, SparseVLM).
    """
    bad = [layer for layer in changes if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"change layers must be in [0, {n_layers}); got {bad}")
    counts, current = [], n0
    for layer in range(n_layers):
        current = changes.get(layer, current)
        counts.append(current)
    return counts


# ------------------------------------------------------------------------------------------------
# FiCoCo (methods.md §2.2, §3-5)

def encoder_discards(n_start: int, n_final: int, layers: Iterable[int]) -> dict[int, int]:
    """Discards per encoder layer that take n_start patches down to n_final: spread over `layers`."""
    layers = list(layers)
    if not 1 <= n_final <= n_start:
        raise ValueError(f"n_final must be in [1, {n_start}] (n_start); got {n_final}")
    return dict(zip(layers, spread(n_start - n_final, len(layers))))


@dataclass(frozen=True)
class LLMSchedule:
    """A progressive in-LLM schedule: layers start..start+window-1 reduce n0 to `final`."""

    n0: int                          # visual tokens entering the LLM
    final: int                       # F, visual tokens after the last reducing layer
    start: int                       # s, first reducing layer (0-based)
    window: int                      # w, number of reducing layers
    discards: tuple[int, ...]        # per reducing layer, spread(n0 - F, w)
    visual_counts: tuple[int, ...]   # n_vis(l) for every LLM layer
    average: float                   # realised layer average

    @property
    def layers(self) -> range:
        """The reducing layers R = s..s+w-1."""
        return range(self.start, self.start + self.window)

    def discards_by_layer(self) -> dict[int, int]:
        return dict(zip(self.layers, self.discards))

    def to_dict(self) -> dict:
        """JSON-able summary (for the handle's plan and metrics.json)."""
        return asdict(self)


def _llm_schedule(n0: int, final: int, n_layers: int, start: int, window: int) -> LLMSchedule:
    """The §2.2 schedule for a given final count F."""
    discards = spread(n0 - final, window)
    counts = [n0] * start
    remaining = n0
    for discard in discards:
        remaining -= discard
        counts.append(remaining)
    counts += [final] * (n_layers - start - window)
    return LLMSchedule(n0, final, start, window, tuple(discards), tuple(counts), layer_average(counts))


def _min_average(n0: int, n_layers: int, start: int, window: int) -> float:
    """Smallest layer average a progressive schedule can reach: keep one token (F = 1)."""
    return _llm_schedule(n0, 1, n_layers, start, window).average


def _largest_feasible_start(budget: float, n0: int, n_layers: int, window: int) -> int | None:
    """The latest start layer whose minimum average is within budget (None if none is)."""
    for start in range(n_layers - window, -1, -1):
        if _min_average(n0, n_layers, start, window) <= budget:
            return start
    return None


def progressive_llm_schedule(
    n0: int, budget: float, n_layers: int, start: int, window: int, method: str = ""
) -> LLMSchedule:
    """Solve F, the largest final count ≥ 1 whose schedule averages ≤ budget (methods.md §2.2).

    Raises InfeasibleBudget when even F = 1 exceeds the budget; the message states the method,
    B, s, the minimum achievable average and the largest feasible start layer.
    """
    if n0 < 1:
        raise ValueError(f"n0 (visual tokens) must be >= 1; got {n0}")
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    if not 0 <= start <= n_layers - window:
        raise ValueError(
            f"start must be in [0, {n_layers - window}] so that window {window} fits in {n_layers} layers; got {start}"
        )
    # the average grows with F, so the first F from the top that fits is the largest
    for final in range(n0, 0, -1):
        schedule = _llm_schedule(n0, final, n_layers, start, window)
        if schedule.average <= budget:
            return schedule
    raise InfeasibleBudget(_infeasible_message(method, budget, n0, n_layers, start, window))


def _infeasible_message(method: str, budget: float, n0: int, n_layers: int, start: int, window: int) -> str:
    # §2.1: the floor over all schedules is window 1 (reduce straight to one token at s)
    min_any = _min_average(n0, n_layers, start, 1)
    min_configured = _min_average(n0, n_layers, start, window)
    best_start_any = _largest_feasible_start(budget, n0, n_layers, 1)
    best_start_configured = _largest_feasible_start(budget, n0, n_layers, window)

    def describe(start_layer: int | None) -> str:
        return "none" if start_layer is None else f"s <= {start_layer}"

    name = method or "progressive in-LLM reduction"
    return (
        f"{name}: budget B={budget:g} is infeasible with start layer s={start} (window {window}, "
        f"{n0} visual tokens, {n_layers} LLM layers). The minimum achievable average is "
        f"{min_any:.2f} visual tokens per layer (one token kept from layer {start}; "
        f"{min_configured:.2f} with window {window}). Largest feasible start layer: "
        f"{describe(best_start_any)} ({describe(best_start_configured)} with window {window}). "
        f"Configure an earlier start explicitly or raise the budget."
    )


def budget_from_ratio(ratio: float, visual_tokens: int) -> int:
    """B = round(visual_tokens · (1 − ratio)) for a reduction ratio in [0, 1); halves round up."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"reduction ratio must be in [0, 1); got {ratio}")
    budget = round_half_up(visual_tokens * (1.0 - ratio))
    if budget < 1:
        raise ValueError(f"reduction ratio {ratio} leaves {budget} of {visual_tokens} visual tokens; need >= 1")
    return budget


# ------------------------------------------------------------------------------------------------
# Baselines (methods.md §8): each function maps a label B to the method's own parameters

def _largest_on_grid(realised_average, budget: float, step: float = 1e-4) -> float | None:
    """The largest x = i·step in [0, 1] whose realised_average(x) ≤ budget (None if none is).

    Scans from the top, so it is exact even where the average is not monotone in x.
    """
    n_steps = round(1.0 / step)
    for i in range(n_steps, -1, -1):
        if realised_average(i / n_steps) <= budget:
            return i / n_steps
    return None


def keep_for_budget(budget: float, prune_layer: int, n_layers: int, n0: int, method: str = "") -> int:
    """FastV/DART keep count k(B) = ⌊(L·B − n0·K)/(L − K)⌋ for one-shot pruning at layer K (§8.3).

    Layers 0..K-1 run on n0 tokens and layers K..L-1 on k, so the layer average is ≤ B. Capped
    at n0; InfeasibleBudget if not even one token can be kept.
    """
    if not 0 <= prune_layer < n_layers:
        raise ValueError(f"prune layer K must be in [0, {n_layers}); got {prune_layer}")
    keep = math.floor((n_layers * budget - n0 * prune_layer) / (n_layers - prune_layer))
    if keep < 1:
        min_average = layer_average(step_counts(n0, n_layers, {prune_layer: 1}))
        largest = max((k for k in range(prune_layer) if (n0 * k + n_layers - k) / n_layers <= budget), default=None)
        raise InfeasibleBudget(
            f"{method or 'one-shot pruning'}: budget B={budget:g} is infeasible with pruning at layer K={prune_layer}: "
            f"the minimum achievable average is {min_average:.2f} visual tokens per layer; largest feasible "
            f"pruning layer: {'none' if largest is None else f'K <= {largest}'}."
        )
    return min(keep, n0)


def pdrop_stage_counts(n0: int, lam: float, n_stages: int) -> list[int]:
    """PDrop's geometric image-token counts round(n0·λ^k) after stage boundaries k = 1..n_stages."""
    return [round_half_up(n0 * lam**stage) for stage in range(1, n_stages + 1)]


def pdrop_layer_counts(n0: int, lam: float, boundaries: Sequence[int], n_layers: int) -> list[int]:
    """Per-layer visual counts of PDrop: layer b_k and later run on round(n0·λ^k) tokens."""
    if list(boundaries) != sorted(set(boundaries)):
        raise ValueError(f"boundaries must be strictly increasing; got {list(boundaries)}")
    stage_counts = pdrop_stage_counts(n0, lam, len(boundaries))
    return step_counts(n0, n_layers, dict(zip(boundaries, stage_counts)))


def solve_pdrop_lambda(budget: float, boundaries: Sequence[int], n_layers: int, n0: int, method: str = "") -> float:
    """The largest λ on a 1e-4 grid whose PDrop schedule averages ≤ B (§8.5 project rule)."""
    lam = _largest_on_grid(lambda x: layer_average(pdrop_layer_counts(n0, x, boundaries, n_layers)), budget)
    if lam is None:
        min_average = layer_average(pdrop_layer_counts(n0, 0.0, boundaries, n_layers))
        raise InfeasibleBudget(
            f"{method or 'pdrop'}: budget B={budget:g} is infeasible with stage boundaries {list(boundaries)}: "
            f"the minimum achievable average (λ = 0) is {min_average:.2f} visual tokens per layer; "
            f"the first boundary must be <= {math.floor(budget * n_layers / n0)}."
        )
    return lam


def evit_stage_counts(n0: int, budget: int, n_stages: int = 3) -> list[int]:
    """EViT token totals after each stage, round(n0·ρ^k) with ρ = (B/n0)^(1/n_stages) (§8.2).

    Each total includes the fused token; the last one is B.
    """
    if not 1 <= budget <= n0:
        raise ValueError(f"budget must be in [1, {n0}]; got {budget}")
    ratio = (budget / n0) ** (1.0 / n_stages)
    return [round_half_up(n0 * ratio**stage) for stage in range(1, n_stages + 1)]


def tome_merges(n_patches: int, budget: int, layers: Iterable[int]) -> dict[int, int]:
    """ToMe merges per layer: spread(n_patches − B) over `layers`, capped at ⌊(#tokens − 1)/2⌋ (§8.1).

    #tokens counts CLS (one protected token at position 0, so that is the number of A tokens
    that may merge). If the cap binds, fewer tokens are merged and the final count exceeds B.
    """
    layers = list(layers)
    if not 1 <= budget <= n_patches:
        raise ValueError(f"budget must be in [1, {n_patches}]; got {budget}")
    merges, tokens = {}, n_patches + 1
    for layer, wanted in zip(layers, spread(n_patches - budget, len(layers))):
        merges[layer] = min(wanted, (tokens - 1) // 2)
        tokens -= merges[layer]
    return merges


def pooling_grid(budget: int, grid_hw: tuple[int, int] = (24, 24)) -> tuple[int, int]:
    """The output grid h×w = B (h ≤ w, both within the input grid) closest to square (§8.12)."""
    pairs = [
        (h, budget // h)
        for h in range(1, math.isqrt(budget) + 1)
        if budget % h == 0 and budget // h <= max(grid_hw) and h <= min(grid_hw)
    ]
    if not pairs:
        raise ValueError(
            f"budget {budget} has no factor pair h x w that fits the {grid_hw[0]}x{grid_hw[1]} grid; "
            f"choose a budget with such a factorisation (e.g. 192, 128, 64)"
        )
    return pairs[-1]


def downsample_side(budget: int) -> int:
    """Image downsampling: the largest g with g² ≤ B (§8.13); the image side is 14·g pixels for CLIP-L/14."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1; got {budget}")
    return math.isqrt(budget)


def visionzip_split(budget: int) -> tuple[int, int]:
    """VisionZip (dominant incl. CLS, contextual) with D + C = B: C = round(B·10/64) (§8.7).

    Reproduces the spec's 54 + 10, 108 + 20 and 162 + 30.
    """
    if budget < 2:
        raise ValueError(f"VisionZip needs a budget >= 2 (CLS plus one more token); got {budget}")
    contextual = max(1, round_half_up(budget * 10 / 64))
    return budget - contextual, contextual


def prumerge_plus_split(budget: int) -> tuple[int, int]:
    """PruMerge+ (important, raster-sampled) counts: k_imp = round((B−1)/4), the rest of B−1 raster (§8.6).

    The extra token makes the total B.
    """
    if budget < 2:
        raise ValueError(f"PruMerge+ needs a budget >= 2 (one kept token plus the extra token); got {budget}")
    important = round_half_up((budget - 1) / 4)
    return important, budget - 1 - important


def sparsevlm_recycled_clusters(n_dropped: int) -> int:
    """SparseVLM cluster tokens made from d dropped tokens: ⌊(⌊0.3·d⌋ + 1)/10⌋ + 1 (§8.4)."""
    return (math.floor(0.3 * n_dropped) + 1) // 10 + 1


def sparsevlm_counts(
    schedule: Sequence[int],
    pruning_layers: Sequence[int],
    n_layers: int,
    n0: int,
    recycle: bool = True,
) -> list[int]:
    """Per-layer visual counts SparseVLM realises (§8.4).

    Each pruning layer runs on its full input and keeps k = min(schedule, n_vis − 1) of its
    visual tokens (earlier cluster tokens included); from the next layer on there are k tokens
    plus, with `recycle`, the cluster tokens made from the d = n_vis − k dropped ones.
    """
    if len(schedule) != len(pruning_layers):
        raise ValueError(f"schedule {list(schedule)} and pruning layers {list(pruning_layers)} differ in length")
    changes, n_visual = {}, n0
    for layer, wanted in zip(pruning_layers, schedule):
        keep = min(wanted, n_visual - 1)
        dropped = n_visual - keep
        n_visual = keep + (sparsevlm_recycled_clusters(dropped) if recycle else 0)
        if layer + 1 < n_layers:
            changes[layer + 1] = n_visual
    return step_counts(n0, n_layers, changes)


def sparsevlm_matched_schedule(
    budget: float, schedule: Sequence[int], pruning_layers: Sequence[int], n_layers: int, n0: int, method: str = "",
    recycle: bool = True,
) -> list[int]:
    """`sparsevlm_matched`: the schedule scaled by the largest common factor (1e-4 grid, ≤ 1) whose
    realised average, cluster tokens included (with `recycle`), is ≤ B (§8.4)."""

    def scaled(factor: float) -> list[int]:
        return [round_half_up(factor * keep) for keep in schedule]

    def average(factor: float) -> float:
        return layer_average(sparsevlm_counts(scaled(factor), pruning_layers, n_layers, n0, recycle=recycle))

    factor = _largest_on_grid(average, budget)
    if factor is None:
        min_average = average(0.0)
        raise InfeasibleBudget(
            f"{method or 'sparsevlm_matched'}: budget B={budget:g} is infeasible with pruning layers "
            f"{list(pruning_layers)}: the minimum achievable average is {min_average:.2f} visual tokens per layer."
        )
    return scaled(factor)

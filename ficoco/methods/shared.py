"""Everything methods share: plan pieces, reduction steps and checks that more than one method uses.

A method module imports the contract (ficoco/contract.py), `Method` and `Param` (base.py) and this
module, never another method's module (tests/test_contract.py checks it).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch

from ficoco.budget import InfeasibleBudget, keep_for_budget, layer_average, progressive_llm_schedule, step_counts
from ficoco.contract import (LLM_PLACEMENTS, ImageTokens, LLMKept, LLMLayerStep, LLMSchedule, LLMScores, LLMTokens,
                             Needs, Plan, StepShape, VisionLayerStep, VisionOutputStep, VisionSchedule, VisionScores,
                             VisionTokens)
from ficoco.methods.base import Param, one_of, optional_non_negative_int, positive_int, positive_number, unit_interval
from ficoco.paradigm.compress import gather_tokens, self_preserving_merge
from ficoco.paradigm.correlate import adaptive_quantile_weights, ficoco_l_correlation, fixed_k_weights, take
from ficoco.paradigm.filter import (ficoco_l_scores, ficoco_v_scores, key_mean_semantic, local_penalty,
                                   split_by_score, top_k_positions)


# What the methods' schedules and steps assume of an image (`unmet_needs` refuses a model that lacks it):
# a CLS-first tower (every reduction in or right after the tower, which runs on each crop of a LLaVA-NeXT
# image as on an image of its own); a reduction inside the LLM keeps the kept tokens' positions in either
# scheme (the adapter slices the rotary tables built from them: 1-D RoPE, or Qwen2-VL's 3-D M-RoPE).
TOWER_NEEDS = Needs(cls_first=True)
LLM_NEEDS = Needs(positions=("rope-1d", "mrope-3d"))


# ------------------------------------------------------------------------------------------------
# Selection overhead: the matrix products of the pieces steps are made of, in multiply-accumulates
# (`StepShape`; docs/flops.md, "Selection overhead"). Each reduce class has `overhead(dims, shape)`.

def llm_key_macs(dims, shape: StepShape) -> int:
    """The k projection of the scoring layer on the prompt's `length` tokens (LLMScores.keys, and inside
    rows); none when the keys were read from that layer's KV cache."""
    if shape.keys_cached:
        return 0
    return shape.length * dims.llm_hidden * dims.llm_kv_heads * (dims.llm_hidden // dims.llm_heads)


def llm_rows_macs(dims, rows: int, shape: StepShape) -> int:
    """LLMScores.rows for `rows` queries over the prompt's `length` tokens: q projection of the rows, the
    keys (`llm_key_macs`), and every head's q·k (the layer's own attention runs separately)."""
    return rows * dims.llm_hidden * dims.llm_hidden + llm_key_macs(dims, shape) + rows * shape.length * dims.llm_hidden


def vision_rows_macs(dims, rows: int, tokens: int) -> int:
    """VisionScores.rows / probs / logits for `rows` queries over `tokens` keys: every head's q·k on
    the layer's own q/k (no projection)."""
    return rows * tokens * dims.vision_hidden


def merge_macs(sources: int, targets: int, width: int) -> int:
    """`fold_sources` / `self_preserving_merge`: the (T×S)·(S×D) product Σ_i α_ij x_i, counted dense
    (on the CPU it is summed over the nonzero α only, which costs less)."""
    return sources * targets * width


def cosine_macs(rows: int, cols: int, width: int) -> int:
    """`pairwise_cosine` of `rows` against `cols` vectors of `width`."""
    return rows * cols * width


# ------------------------------------------------------------------------------------------------
# Plan pieces and the correlate -> compress tail

def merge_weights(corr: torch.Tensor, eps: float, k: int | None) -> torch.Tensor:
    """α (B, S, T): the ε-quantile token-adaptive targets when k is None, else the k best targets (0 = prune)."""
    return adaptive_quantile_weights(corr, eps) if k is None else fixed_k_weights(corr, k)


def fold_sources(x: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                 k: int | None) -> torch.Tensor:
    """The targets after the self-preserving merge of the sources into them.

    x: (B, N, D) candidates; sources (B, S), targets (B, T) positions into N; weights (B, S, T).
    Returns (B, T, D) in target order. With k == 0 (pruning) the targets are returned untouched.
    """
    x_targets = gather_tokens(x, targets)                                   # (B, T, D)
    if k == 0 or sources.shape[1] == 0:
        return x_targets
    return self_preserving_merge(x_targets, gather_tokens(x, sources), weights)


def vision_layer_counts(dims, discards: Mapping[int, int]) -> list[list[int]]:
    """Planned [n_attn, n_mlp] per executed vision layer, CLS included, for one image; `discards` in units
    (`dims.tower_units`: patches, or Qwen's merge groups of `patches_per_unit` patches)."""
    tokens = dims.vision_tokens
    counts = []
    for layer in range(dims.vision_layers_run):
        after = tokens - discards.get(layer, 0) * dims.patches_per_unit
        counts.append([tokens, after])
        tokens = after
    return counts


def unreduced_llm(dims, delivered: int) -> list[int]:
    return [delivered] * dims.llm_layers


def unreduced_llm_plan(dims, plan: Mapping) -> dict:
    """`plan` (its vision entries, "delivered" included) completed for a method that does not reduce
    inside the LLM: `plan["delivered"]` visual tokens in every LLM layer."""
    delivered = plan["delivered"]
    return {**plan, "llm": None, "llm_visual": unreduced_llm(dims, delivered), "layer_average": float(delivered)}


def planned_vision_layers(plan: Plan) -> tuple[int, ...]:
    """The reducing vision layers of a plan; () when it has none."""
    return tuple(plan.vision.layers) if plan.vision else ()


def vision_layers(method: str, dims, start: int, end: int | None, start_name="start", end_name="end") -> list[int]:
    """The reducing vision layers: those of start..end, inside the layers that run (0..last feature layer),
    that attend over the whole image (`dims.attends_whole_image`: all of CLIP's; Qwen2.5-VL's full-attention
    blocks, not its windowed ones)."""
    last = dims.last_vision_layer
    end = last if end is None else end
    check_layer_range(method, start_name, start, end_name, end, last + 1,
                      f"the vision layers whose output the LLM reads are 0..{last}")
    layers = [layer for layer in range(start, end + 1) if dims.attends_whole_image(layer)]
    if not layers:
        whole = [layer for layer in range(last + 1) if dims.attends_whole_image(layer)]
        raise ValueError(f"{method}: {start_name}={start}, {end_name}={end}: no layer of that range attends over the "
                         f"whole image (this tower's others attend within windows); valid ranges hold one of {whole}")
    return layers


def vision_plan(dims, discards: dict[int, int]) -> dict:
    """Plan entries of an in-encoder schedule: per-layer discards of units (`dims.tower_units`: patches, or
    Qwen's merge groups) and the tokens delivered to the LLM. A schedule that discards nothing (a budget of every
    token) reduces no layer: the tower runs as unpatched, with no selection work counted."""
    if not any(discards.values()):
        discards = {}
    units, units_out = dims.tower_units, []
    for layer in sorted(discards):
        units -= discards[layer]
        units_out.append(units)
    delivered = dims.visual_tokens - sum(discards.values())
    return {
        "vision": {"layers": sorted(discards), "discards": [discards[layer] for layer in sorted(discards)],
                   "patches_out": units_out, "grid_hw": list(dims.unit_grid)},
        "vision_counts": vision_layer_counts(dims, discards),
        "delivered": delivered,
    }


def encoder_plan(dims, discards: dict[int, int]) -> dict:
    """The whole plan of a method that reduces only inside the vision encoder (`vision_plan`, then
    the delivered tokens in every LLM layer)."""
    return unreduced_llm_plan(dims, vision_plan(dims, discards))


def patches_for(dims, delivered: int) -> int:
    """Units (patches; Qwen's merge groups) that must remain for `delivered` tokens to reach the LLM (CLS is
    delivered under "full")."""
    return delivered - (dims.visual_tokens - dims.tower_units)


def vision_layer_build(make_reduce: Callable[[tuple, VisionSchedule], Callable], attention: str = "probs"
                       ) -> Callable[[Plan], tuple]:
    """`build(plan)` of an in-encoder method: one `VisionLayerStep` over the plan's reducing vision
    layers, with `make_reduce(layers, plan.vision)` (a reduce class with `overhead(dims, shape)`); none
    when the plan reduces no vision layer."""
    def build(plan: Plan) -> tuple:
        layers = planned_vision_layers(plan)
        if not layers:
            return ()
        reduce = make_reduce(layers, plan.vision)
        return (VisionLayerStep(layers=layers, reduce=reduce, tokens_out=dict(zip(layers, plan.vision.patches_out)),
                                overhead=reduce.overhead, attention=attention),)

    return build


def delivered_plan(dims, delivered: int) -> dict:
    """Plan entries of a method that reduces once between the vision layers and the LLM (vision-output
    and projector steps): every executed vision layer and the projector input unreduced, `delivered`
    visual tokens in every LLM layer."""
    return unreduced_llm_plan(dims, {"vision": None, "vision_counts": vision_layer_counts(dims, {}),
                                     "delivered": delivered})


def check_layer_range(method: str, name_first: str, first: int, name_last: str, last: int, n_layers: int,
                      what: str) -> None:
    """first..last (inclusive) must be a non-empty range inside [0, n_layers)."""
    if not 0 <= first <= last < n_layers:
        raise ValueError(f"{method}: {name_first}={first}, {name_last}={last}: need 0 <= {name_first} <= "
                         f"{name_last} <= {n_layers - 1} ({what})")


def staged_llm_plan(dims, visual_after: Mapping[int, int]) -> dict:
    """Plan entries of pruning inside the LLM: from layer l on (l a key of `visual_after`) the
    sequence holds visual_after[l] visual tokens; earlier layers hold all of them (FastV, DART,
    PDrop, SparseVLM). An empty mapping is the unreduced model."""
    n0 = dims.visual_tokens
    counts = step_counts(n0, dims.llm_layers, dict(visual_after))
    layers = sorted(visual_after)
    before = [n0] + [visual_after[layer] for layer in layers[:-1]]
    llm = {"layers": layers, "discards": [n - visual_after[layer] for n, layer in zip(before, layers)], "n0": n0,
           "final": visual_after[layers[-1]], "visual_out": [visual_after[layer] for layer in layers]} if layers else None
    return {"vision": None, "vision_counts": vision_layer_counts(dims, {}), "delivered": n0, "llm": llm,
            "llm_visual": counts, "layer_average": layer_average(counts)}


# ------------------------------------------------------------------------------------------------
# FiCoCo-V's reduction (FiCoCo-V, FiCoCo-VL)

@dataclass(frozen=True)
class FicocoVisionReduce:
    """One FiCoCo-V reduction step; `discards[layer]` patches leave at each reducing layer."""

    discards: dict[int, int]
    grid_hw: tuple[int, int]
    lam: float
    coef: float
    penalty_window: int
    eps: float
    k: int | None
    semantic: str = "cls"

    def __call__(self, layer: int, tokens: VisionTokens, scores: VisionScores) -> VisionTokens:
        prefix = tokens.prefix                                                  # P: 1 with CLS, 0 without
        attn = scores.probs()                                                   # (B, P+N, P+N)
        semantic = key_mean_semantic(scores.keys(), prefix) if self.semantic == "key-mean" else None  # or A[CLS]
        redundancy = ficoco_v_scores(attn, self.lam, semantic, prefix)          # (B, N)
        redundancy = local_penalty(redundancy, tokens.positions, self.grid_hw, self.penalty_window, self.coef)
        sources, targets = split_by_score(redundancy, self.discards[layer])     # (B, S), (B, T) into units
        weights = None if self.k == 0 else merge_weights(take(attn, sources + prefix, targets + prefix), self.eps,
                                                         self.k)
        units = fold_sources(tokens.hidden[:, prefix:], sources, targets, weights, self.k)   # (B, T, D)
        key_bias = tokens.key_bias
        if key_bias is not None:
            key_bias = torch.cat([key_bias[:, :prefix], key_bias[:, prefix:].gather(1, targets)], dim=1)
        return VisionTokens(
            hidden=torch.cat([tokens.hidden[:, :prefix], units], dim=1),        # (B, P+T, D), CLS first
            positions=tokens.positions.gather(1, targets),                      # (B, T), still in order
            key_bias=key_bias,
            prefix=prefix,
        )

    def overhead(self, dims, shape: StepShape) -> int:
        # the probabilities and keys come with the layer's output; what remains is the merge of S sources
        # into T targets (units of patches_per_unit patches side by side), and for the key-mean term each
        # unit's cosine with the mean key
        units = shape.tokens - dims.tower_prefix
        sources, targets = shape.tokens - shape.kept, shape.kept - dims.tower_prefix
        merge = 0 if self.k == 0 else merge_macs(sources, targets, dims.vision_hidden * dims.patches_per_unit)
        semantic = cosine_macs(units, 1, dims.vision_hidden // dims.vision_heads) if self.semantic == "key-mean" else 0
        return merge + semantic


VISION_PARAMS = {
    "lam": Param(0.35, "λ, weight of the patch-redundancy term against the CLS term", unit_interval),
    "coef": Param(2.0, "local-penalty coefficient applied to each window's maximum score", positive_number),
    "penalty_window": Param(2, "side of the non-overlapping local-penalty windows on the patch grid", positive_int),
    "eps": Param(0.998, "ε, quantile of each source's correlations that selects its targets", unit_interval),
    "k": Param(None, "targets per source: None = token-adaptive ε-quantile, 0 = prune, k >= 1 = fixed k",
               optional_non_negative_int),
    "semantic": Param("cls", "the semantic term: cls = CLS attention to the patch; key-mean = −cos(mean patch key, "
                      "patch key), the paper's CLS-free proxy (v4 App. Table 9), the one a tower without CLS "
                      "(Qwen2-VL, Qwen2.5-VL) takes", one_of(("cls", "key-mean"))),
}


def semantic_needs(params: Mapping) -> Needs:
    """What FiCoCo-V's tower step needs with these parameters: a CLS token first for the CLS semantic term;
    nothing of the tower with the key-mean proxy (a tower without CLS, whose units may be merge groups)."""
    if params["semantic"] == "cls":
        return replace(TOWER_NEEDS, remedy="on a tower without CLS run it with semantic='key-mean'")
    return Needs()


def vision_step(vision: VisionSchedule, params: Mapping) -> VisionLayerStep:
    """The FiCoCo-V step of a plan's vision schedule."""
    discards = dict(zip(vision.layers, vision.discards))
    reduce = FicocoVisionReduce(discards=discards, grid_hw=tuple(vision.grid_hw), lam=params["lam"], coef=params["coef"],
                                penalty_window=params["penalty_window"], eps=params["eps"], k=params["k"],
                                semantic=params["semantic"])
    return VisionLayerStep(layers=tuple(vision.layers), reduce=reduce,
                           tokens_out=dict(zip(vision.layers, vision.patches_out)), overhead=reduce.overhead)


# ------------------------------------------------------------------------------------------------
# FiCoCo-L's schedule and reduction (FiCoCo-L, FiCoCo-VL)

@dataclass(frozen=True)
class FicocoLanguageReduce:
    """One FiCoCo-L reduction step; `discards[layer]` visual tokens leave at each reducing layer."""

    discards: dict[int, int]
    beta: float
    gamma: float
    eps: float
    k: int | None
    placement: str = "input"

    def __call__(self, layer: int, tokens: LLMTokens, scores: LLMScores) -> LLMKept:
        visual, n_visual = tokens.visual, tokens.visual.shape[1]
        rows = scores.rows(torch.cat([visual, tokens.instruction], dim=1), keys=visual)   # (B, N+M, N)
        attn_vv, attn_qv = rows[:, :n_visual], rows[:, n_visual:]                       # (B, N, N), (B, M, N)
        redundancy = ficoco_l_scores(attn_vv, attn_qv, self.beta)                       # (B, N)
        sources, targets = split_by_score(redundancy, self.discards[layer])             # into the visual axis
        weights = None if self.k == 0 else merge_weights(
            ficoco_l_correlation(attn_vv, attn_qv, sources, targets, self.gamma), self.eps, self.k)
        hidden = tokens.hidden
        visual_hidden = hidden.gather(1, visual.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))   # (B, N, D)
        merged = fold_sources(visual_hidden, sources, targets, weights, self.k)                   # (B, T, D)
        kept = visual.gather(1, targets)                                                           # (B, T)
        hidden = hidden.scatter(1, kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), merged)
        return LLMKept(hidden=hidden, visual=kept)

    def overhead(self, dims, shape: StepShape) -> int:
        n, m, sources = shape.tokens, shape.instruction, shape.tokens - shape.kept
        # rows of the visual and prompt tokens; after attention they are the layer's own probabilities
        scores = 0 if self.placement == "attention" else llm_rows_macs(dims, n + m, shape)
        if self.k == 0:
            return scores
        indirect = sources * m * shape.kept                                     # (S×M)·(M×T) correlation
        return scores + indirect + merge_macs(sources, shape.kept, dims.llm_hidden)


LANGUAGE_PARAMS = {
    "beta": Param(0.6, "β, weight of the visual-redundancy term against the instruction-attention term",
                  unit_interval),
    "gamma": Param(0.6, "γ, weight of the direct correlation against the indirect (through instruction) one",
                   unit_interval),
    "eps": Param(0.998, "ε, quantile of each source's correlations that selects its targets", unit_interval),
    "k": Param(None, "targets per source: None = token-adaptive ε-quantile, 0 = prune, k >= 1 = fixed k",
               optional_non_negative_int),
    "placement": Param("input", "where a reducing layer reduces: 'input' (methods.md §4, scores from the layer's q/k "
                                "on its input) or 'attention' (the released code: between its attention and MLP, "
                                "scores from the probabilities its attention computed)", one_of(LLM_PLACEMENTS)),
}


def llm_plan(method: str, dims, n0: int, budget: int | None, start: int, window: int,
             placement: str = "input") -> dict:
    """Plan entries of the §2.2 progressive schedule from n0 visual tokens (n0 for every layer if budget is None).

    Placement "attention" reduces after the attention of layers s..s+w−1, so the tokens each layer's
    attention (and KV cache) sees are those of the input schedule from s+1; each reducing layer's MLP
    already runs on its kept tokens (`llm_mlp_visual`).
    """
    after_attention = placement == "attention"
    last_start = dims.llm_layers - window - (1 if after_attention else 0)
    if not 0 <= start <= last_start:
        reason = ("a reduction after the attention of the window's last layer must leave a layer to run on it"
                  if after_attention else "the window must fit")
        raise ValueError(f"{method}: start={start}, window={window}, placement={placement!r}: need 0 <= start <= "
                         f"{last_start} in the {dims.llm_layers} LLM layers ({reason})")
    if budget is None:
        return {"llm": None, "llm_visual": [n0] * dims.llm_layers, "layer_average": float(n0)}
    counted_from = start + 1 if after_attention else start        # the first layer whose attention sees fewer tokens
    try:
        schedule = progressive_llm_schedule(n0, budget, dims.llm_layers, counted_from, window, method=method)
    except InfeasibleBudget as error:
        if not after_attention:
            raise
        raise InfeasibleBudget(f"{error} (placement='attention' reduces after the attention of layer s, which "
                               f"counts as reducing at the input of layer s + 1: subtract 1 from the start layers "
                               f"named here)") from None
    visual_out = list(schedule.visual_counts[counted_from:counted_from + window])
    plan = {
        "llm": {"layers": [layer - counted_from + start for layer in schedule.layers],
                "discards": list(schedule.discards), "n0": n0, "final": schedule.final, "visual_out": visual_out},
        "llm_visual": list(schedule.visual_counts),
        "layer_average": schedule.average,
    }
    if after_attention:
        mlp_visual = list(schedule.visual_counts)
        for layer, kept in zip(plan["llm"]["layers"], visual_out):
            mlp_visual[layer] = kept
        plan["llm_mlp_visual"] = mlp_visual
    return plan


def language_step(llm: LLMSchedule, params: Mapping) -> LLMLayerStep | None:
    """The FiCoCo-L step of a plan's LLM schedule (None when nothing is discarded)."""
    pairs = [(layer, n) for layer, n in zip(llm.layers, llm.discards) if n > 0]
    if not pairs:
        return None
    visual_out = dict(zip(llm.layers, llm.visual_out))
    reduce = FicocoLanguageReduce(discards=dict(pairs), beta=params["beta"], gamma=params["gamma"],
                                  eps=params["eps"], k=params["k"], placement=params["placement"])
    return LLMLayerStep(layers=tuple(layer for layer, _ in pairs), reduce=reduce,
                        tokens_out={layer: visual_out[layer] for layer, _ in pairs}, overhead=reduce.overhead,
                        placement=params["placement"])


# ------------------------------------------------------------------------------------------------
# One-shot pruning inside the LLM (FastV, DART, PDrop's ranking)

@dataclass(frozen=True)
class LastQueryTopK:
    """Keep the `keep[layer]` visual tokens that the last prompt token attends to most (K = 0 pruning)."""

    keep: dict[int, int]

    def __call__(self, layer: int, tokens: LLMTokens, scores: LLMScores) -> LLMKept:
        last = tokens.instruction[:, -1:]                                       # (B, 1) the last prompt token
        importance = scores.rows(last, keys=tokens.visual)[:, 0]                 # (B, N)
        kept = tokens.visual.gather(1, top_k_positions(importance, self.keep[layer]))
        return LLMKept(hidden=tokens.hidden, visual=kept)

    def overhead(self, dims, shape: StepShape) -> int:
        return llm_rows_macs(dims, 1, shape)                                   # one row: the last prompt token


def check_prune_layer(method: str, layer: int, dims) -> None:
    """K must leave a previous layer to score from and a layer to prune: 1 <= K <= L − 1."""
    if not 1 <= layer <= dims.llm_layers - 1:
        raise ValueError(f"{method}: layer={layer}: need 1 <= layer <= {dims.llm_layers - 1} (K scores from layer "
                         f"K−1's attention and prunes at the input of layer K of the {dims.llm_layers} LLM layers)")


def one_shot_step(plan: Plan, reduce_for, needs_instruction: bool = True) -> tuple:
    """The single previous-layer-scored step of a one-shot plan (none when unreduced).

    `reduce_for(keep)` builds the step's reduce (a class with `overhead(dims, shape)`) from the kept count
    at the pruning layer.
    """
    if plan.llm is None:
        return ()
    layer, keep = plan.llm.layers[0], plan.llm.visual_out[0]
    reduce = reduce_for(keep)
    return (LLMLayerStep(layers=(layer,), reduce=reduce, tokens_out={layer: keep}, overhead=reduce.overhead,
                         scores_from="previous", needs_instruction=needs_instruction),)


def one_shot_schedule(method: str):
    """The schedule of a method that prunes once at the input of LLM layer `params["layer"]`, keeping
    k(B) image tokens so that the layer average is <= B (FastV, DART)."""
    def schedule(dims, budget, params) -> dict:
        check_prune_layer(method, params["layer"], dims)
        if budget is None:
            return staged_llm_plan(dims, {})
        keep = keep_for_budget(budget, params["layer"], dims.llm_layers, dims.visual_tokens, method=method)
        return staged_llm_plan(dims, {params["layer"]: keep})
    return schedule


# ------------------------------------------------------------------------------------------------
# Parameter checks of staged LLM schedules (PDrop, SparseVLM)

def increasing_layers(value) -> str | None:
    ok = (isinstance(value, (list, tuple)) and len(value) >= 1
          and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in value)
          and all(a < b for a, b in zip(value, value[1:])))
    return None if ok else "must be a non-empty, strictly increasing list of layer indices >= 0"


# ------------------------------------------------------------------------------------------------
# One reduction between the vision layers and the LLM (VisionZip, PruMerge, TopK-CLS, Random, pooling, DivPrune)

def feature_plan(dims, budget: int | None, site: str, **details) -> dict:
    """The plan of a one-shot reduction to `budget` tokens per image (None = unreduced).

    `post_vision` records where it acts ("vision_output": the output of vision layer `layer`;
    "projector": the projected tokens) and the method's own split of the B tokens (`details`).
    """
    if budget is None:
        return {**delivered_plan(dims, dims.visual_tokens), "post_vision": None}
    where = {"layer": dims.last_vision_layer} if site == "vision_output" else {}
    return {**delivered_plan(dims, budget), "post_vision": {"site": site, **where, "tokens_out": budget, **details}}


def adaptive_feature_plan(dims, site: str, **details) -> dict:
    """The plan of an adaptive one-shot reduction (a count per image, chosen while it runs).

    Nothing per layer is known before a run, so "delivered", "llm_visual" and "layer_average" are
    None; the realised counts are per sample (`handle.last_counts()`), and costs come from them.
    """
    where = {"layer": dims.last_vision_layer} if site == "vision_output" else {}
    return {"vision": None, "vision_counts": vision_layer_counts(dims, {}), "delivered": None, "llm": None,
            "llm_visual": None, "layer_average": None,
            "post_vision": {"site": site, **where, "tokens_out": None, "adaptive": True, **details}}


def check_patch_count(method: str, dims, count: int, what: str) -> None:
    """`count` patches must exist among the model's patches."""
    if not 0 <= count <= dims.num_patches:
        raise ValueError(f"{method}: {what} = {count} must be in [0, {dims.num_patches}] (the patches of the "
                         f"{dims.grid_side}x{dims.grid_side} grid)")


def output_build(make_reduce: Callable[[Plan], Callable]) -> Callable[[Plan], tuple]:
    """`build(plan)`: one `VisionOutputStep` with `make_reduce(plan)` (a reduce class with
    `overhead(dims, shape)`), none when the plan is unreduced
    (`tokens_out` None for an adaptive plan)."""
    def build(plan: Plan) -> tuple:
        if plan.post_vision is None:
            return ()
        reduce = make_reduce(plan)
        return (VisionOutputStep(reduce=reduce, tokens_out=plan.post_vision.tokens_out, overhead=reduce.overhead),)

    return build


def keep_patches(tokens: VisionTokens, kept: torch.Tensor) -> ImageTokens:
    """The patches at `kept` (B, K) positions into the patch axis, unchanged and in order; CLS dropped."""
    return ImageTokens(hidden=gather_tokens(tokens.hidden[:, 1:], kept), positions=tokens.positions.gather(1, kept))

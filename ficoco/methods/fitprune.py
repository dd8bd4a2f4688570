"""FitPrune (Ye et al., "Fit and Prune", AAAI 2025; issue 21): a deletion schedule fitted to the budget
on calibration prompts, then pruning inside the LLM by the attention visual tokens receive.

Scores, at an LLM layer between its attention and its MLP, on the probabilities that attention
computed, reduced over heads by their maximum (A, the "head-max" map; N visual tokens V, M prompt
tokens T after the image):
  self  s_j = Σ_{i ∈ V} A[i, j] / N        cross  c_j = Σ_{t ∈ T} A[t, j] / M        for j ∈ V

filter    at layer l, delete the d_l visual tokens with the lowest s_j · c_j (d_l from the fitted schedule)
correlate K = 0 (pure pruning)
compress  the deleted tokens leave the residual stream before the layer's MLP, and the sequence and KV
          cache of every later layer (kept tokens keep their RoPE positions)

The fit (`ficoco calibrate`, once per model and budget, an artifact of the pipeline; docs/methods.md):
  1. statistics: an unreduced prefill of each calibration prompt; per layer l its self mass
     S_l = Σ_{i,j ∈ V} A[i, j] / N and cross mass C_l = Σ_{t ∈ T, j ∈ V} A[t, j] / M;
  2. for α in [0, 1] (the share of that mass a layer may lose) each prompt runs again; at each layer
     it deletes the tokens in both "low" sets: the most lowest-s tokens whose removal leaves
     Σ s ≥ (1 − α)·S_l, and likewise for c against C_l (`mass_deletions`, `FitReduce`);
  3. the schedule of α is the mean deletion count per layer rounded down, up to the first layer at
     which the layer average already meets the budget (`fitted_schedule`); α is bisected to ε and the
     smallest α whose schedule meets the budget wins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ficoco.budget import InfeasibleBudget, layer_average
from ficoco.contract import LLMKept, LLMLayerStep, LLMScores, LLMTokens, StepShape
from ficoco.methods.base import Method, Param
from ficoco.methods.shared import LLM_NEEDS, staged_llm_plan
from ficoco.paradigm.filter import top_k_positions


def self_cross_scores(tokens: LLMTokens, scores: LLMScores) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) self scores s_j and (B, N) cross scores c_j of the current visual tokens (head-max map)."""
    n_visual = tokens.visual.shape[1]
    rows = scores.rows(torch.cat([tokens.visual, tokens.instruction], dim=1), keys=tokens.visual,
                       heads="max")                                                # (B, N+M, N)
    return rows[:, :n_visual].sum(1) / n_visual, rows[:, n_visual:].sum(1) / tokens.instruction.shape[1]


def mass_deletions(scores: torch.Tensor, mass: float, alpha: float) -> int:
    """How many of the lowest `scores` (N,) may go while the rest keep at least (1 − α)·`mass`: the
    largest count i < N whose removal leaves Σ scores − (sum of the i lowest) ≥ (1 − α)·mass, 0 when
    none does (the authors' loop: one fewer than the first count that falls below)."""
    ascending = scores.double().sort().values                                        # (N,)
    removed = torch.cat([ascending.new_zeros(1), ascending.cumsum(0)[:-1]])         # removed[i] = i lowest
    remaining = ascending.sum() - removed                                            # (N,) non-increasing
    allowed = int((remaining >= (1.0 - alpha) * mass).sum())
    return max(allowed - 1, 0)


def lowest(scores: torch.Tensor, count: int) -> set[int]:
    """Indices of the `count` lowest of `scores` (N,), ties to the lower index."""
    return set(torch.sort(scores, stable=True).indices[:count].tolist())


# ------------------------------------------------------------------------------------------------
# Inference

@dataclass(frozen=True)
class FitPruneReduce:
    """Delete `deletions[layer]` visual tokens, those with the lowest self × cross attention."""

    deletions: dict[int, int]

    def __call__(self, layer: int, tokens: LLMTokens, scores: LLMScores) -> LLMKept:
        received_self, received_cross = self_cross_scores(tokens, scores)             # (B, N), (B, N)
        keep = tokens.visual.shape[1] - self.deletions[layer]
        kept = tokens.visual.gather(1, top_k_positions(received_self * received_cross, keep))
        return LLMKept(hidden=tokens.hidden, visual=kept)

    def overhead(self, dims, shape: StepShape) -> int:
        return 0          # sums over the probabilities the layer's attention computed: no matrix product


def span_deletions(deletions: list[int], nominal: int, span: int, budget: int) -> list[int]:
    """The schedule fitted for the nominal image (`nominal` visual tokens) on an image of `span` tokens, whose
    budget is `budget` (its share of the nominal one): each count scaled by span / nominal and rounded up;
    the latest trimmed while fewer than one token would stay; then, while the layer average is above the
    budget, one more at the earliest layer that deletes. The deleting layers stay those of the fit."""
    scaled = [math.ceil(deleted * span / nominal) for deleted in deletions]
    for layer in reversed(range(len(scaled))):
        scaled[layer] -= min(scaled[layer], max(sum(scaled) - (span - 1), 0))
    deleting = [layer for layer, deleted in enumerate(scaled) if deleted > 0]
    while deleting and sum(scaled) < span - 1 and layer_average(schedule_counts(scaled, span)) > budget:
        scaled[deleting[0]] += 1
    return scaled


def schedule(dims, budget, params) -> dict:
    deletions = params["deletions"]
    if budget is None:
        return staged_llm_plan(dims, {})
    if deletions is None and dims.visual_tokens != dims.nominal_visual_tokens:     # one image's span, its budget share
        raise ValueError(f"fitprune: needs its fitted deletion schedule (parameter `deletions`, one count per LLM "
                         f"layer, fitted for the nominal {dims.nominal_visual_tokens}-token image): fit it with "
                         f"`ficoco calibrate --method fitprune --budget B ...` at the grid's budget B (the pipeline's "
                         f"calibrate rule) and pass the artifact to `ficoco run --calibration FILE`")
    if deletions is None:
        raise ValueError(f"fitprune: budget {budget} needs its fitted deletion schedule (parameter `deletions`, "
                         f"one count per LLM layer): fit it with `ficoco calibrate --method fitprune --budget "
                         f"{budget} ...` (the pipeline's calibrate rule) and pass the artifact to `ficoco run "
                         f"--calibration FILE`")
    n0, n_layers, nominal = dims.visual_tokens, dims.llm_layers, dims.nominal_visual_tokens
    if len(deletions) != n_layers or deletions[-1] != 0 or sum(deletions) >= nominal:
        raise ValueError(f"fitprune: deletions={list(deletions)}: need one count per LLM layer ({n_layers}), 0 at "
                         f"the last layer (nothing runs after it), and fewer than {nominal} in all (one token stays)")
    if n0 != nominal:                     # one image's span (LLaVA-NeXT, Qwen2-VL): the fit is the nominal image's
        deletions = span_deletions(deletions, nominal, n0, budget)
    attention_visual = schedule_counts(deletions, n0)     # each layer's attention (and KV cache) sees these
    mlp_visual = attention_visual[1:] + [attention_visual[-1] - deletions[-1]]   # its MLP and later layers the rest
    average = layer_average(attention_visual)
    if average > budget:
        raise InfeasibleBudget(f"fitprune: the fitted deletions {list(deletions)} realise a layer average of "
                               f"{average:.2f} visual tokens, above the budget {budget}: they were fitted for "
                               f"another budget or model; fit again with `ficoco calibrate`")
    layers = [layer for layer, deleted in enumerate(deletions) if deleted > 0]
    llm = {"layers": layers, "discards": [deletions[layer] for layer in layers], "n0": n0,
           "final": mlp_visual[-1], "visual_out": [mlp_visual[layer] for layer in layers]} if layers else None
    plan = staged_llm_plan(dims, {})
    plan.update(llm=llm, llm_visual=attention_visual, layer_average=average, llm_mlp_visual=mlp_visual)
    return plan


def build(plan) -> tuple:
    llm = plan.llm
    if llm is None:
        return ()
    reduce = FitPruneReduce(deletions=dict(zip(llm.layers, llm.discards)))
    return (LLMLayerStep(layers=tuple(llm.layers), reduce=reduce, tokens_out=dict(zip(llm.layers, llm.visual_out)),
                         overhead=reduce.overhead, placement="attention"),)


# ------------------------------------------------------------------------------------------------
# The fit (run by ficoco/calibrate.py through the adapter, one prompt at a time)

def one_prompt_scores(tokens: LLMTokens, scores: LLMScores) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) self and (N,) cross scores of the one prompt a fitting pass runs (counts differ per prompt)."""
    if tokens.visual.shape[0] != 1:
        raise ValueError(f"the FitPrune fit runs one prompt at a time; got a batch of {tokens.visual.shape[0]}")
    received_self, received_cross = self_cross_scores(tokens, scores)
    return received_self[0], received_cross[0]


@dataclass(frozen=True)
class MassReduce:
    """Statistics pass: record each layer's self and cross mass (S_l, C_l) in `masses`; keep every token."""

    masses: dict[int, tuple[float, float]]

    def __call__(self, layer: int, tokens: LLMTokens, scores: LLMScores) -> LLMKept:
        received_self, received_cross = one_prompt_scores(tokens, scores)
        self.masses[layer] = (float(received_self.double().sum()), float(received_cross.double().sum()))
        return LLMKept(hidden=tokens.hidden, visual=tokens.visual)

    def overhead(self, dims, shape: StepShape) -> int:
        return 0


@dataclass(frozen=True)
class FitReduce:
    """Fitting pass at share α: delete the tokens low by both masses (`mass_deletions`) and record
    the count per layer in `deleted`; `masses` are the prompt's unreduced S_l, C_l."""

    alpha: float
    masses: dict[int, tuple[float, float]]
    deleted: dict[int, int]

    def __call__(self, layer: int, tokens: LLMTokens, scores: LLMScores) -> LLMKept:
        received_self, received_cross = one_prompt_scores(tokens, scores)                 # (N,), (N,)
        mass_self, mass_cross = self.masses[layer]
        both = (lowest(received_self, mass_deletions(received_self, mass_self, self.alpha))
                & lowest(received_cross, mass_deletions(received_cross, mass_cross, self.alpha)))
        n_visual = tokens.visual.shape[1]
        drop = sorted(both)[:n_visual - 1]                         # one visual token always stays
        keep = torch.ones(n_visual, dtype=torch.bool)
        keep[drop] = False
        self.deleted[layer] = len(drop)
        return LLMKept(hidden=tokens.hidden, visual=tokens.visual[:, keep.to(tokens.visual.device)])

    def overhead(self, dims, shape: StepShape) -> int:
        return 0


def fit_step(n_layers: int, reduce) -> LLMLayerStep:
    """A pass of the fit: `reduce` after the attention of every layer but the last (nothing runs after
    it), choosing its own count (the pass runs one prompt at a time)."""
    layers = tuple(range(n_layers - 1))
    return LLMLayerStep(layers=layers, reduce=reduce, tokens_out={layer: None for layer in layers},
                        overhead=reduce.overhead, placement="attention")


def statistics_step(n_layers: int, masses: dict) -> LLMLayerStep:
    return fit_step(n_layers, MassReduce(masses))


def fitting_step(n_layers: int, alpha: float, masses: dict, deleted: dict) -> LLMLayerStep:
    return fit_step(n_layers, FitReduce(alpha, masses, deleted))


def schedule_counts(deletions: list[int], n0: int) -> list[int]:
    """The visual tokens each layer's attention sees under `deletions` (one count per layer, deleted
    after that layer's attention)."""
    return [n0 - sum(deletions[:layer]) for layer in range(len(deletions))]


def mean_deletions(deleted: list[list[float]]) -> list[int]:
    """Each layer's mean count over the prompts (S prompts × L layers; on images of several spans, counts for
    the nominal image), rounded down."""
    return [math.floor(sum(row[layer] for row in deleted) / len(deleted)) for layer in range(len(deleted[0]))]


def fitted_schedule(deleted: list[list[float]], n0: int, budget: int) -> list[int] | None:
    """The schedule of one α from each prompt's deletions per layer (S prompts × L layers), or None when
    it does not meet `budget`.

    The mean count per layer, rounded down; the authors stop deleting at the first layer at which the
    cost so far plus the rest at the current count meets the target: here the layer average of the
    schedule cut there (later layers delete nothing) is <= budget.
    """
    mean, n_layers = mean_deletions(deleted), len(deleted[0])
    for stop in range(n_layers + 1):
        cut = mean[:stop] + [0] * (n_layers - stop)
        if layer_average(schedule_counts(cut, n0)) <= budget:
            return cut
    return None


def _deletions(value) -> str | None:
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                  for n in value)
    return None if ok else "must be None (not fitted) or a list of integers >= 0, one per LLM layer"


def _tolerance(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < float(value) < 1.0
    return None if ok else "must be a number in (0, 1)"


STAGES = {
    "filter": "at each scheduled LLM layer, after its attention: self (from the visual tokens) × cross (from the "
              "prompt after the image) head-max attention each visual token receives; the fitted count with the "
              "lowest product goes",
    "correlate": "K = 0 (pure pruning)",
    "compress": "delete them before the layer's MLP, and from the sequence and KV cache of every later layer "
                "(kept tokens keep their RoPE positions)",
}

METHOD = Method(
    name="fitprune",
    summary="FitPrune: a per-layer deletion schedule fitted on calibration prompts (layer average <= B), then "
            "pruning by self × cross head-max attention between attention and MLP",
    phase="llm",
    acts_on=("llm",),
    needs=LLM_NEEDS,
    needs_attention="the probabilities of every scheduled LLM layer, rows of the visual and prompt tokens, reduced "
                    "by the maximum over heads (those layers run their attention explicitly)",
    stages=STAGES,
    params={
        "deletions": Param(None, "visual tokens deleted after the attention of each LLM layer, one count per layer "
                                 "(fitted by `ficoco calibrate`; None until then)", _deletions),
        "epsilon": Param(0.01, "the fit's bisection tolerance on α, the share of attention mass a layer may lose",
                         _tolerance),
    },
    schedule=schedule,
    build=build,
    calibrated=True,
    fitted_where="LLM layers (between attention and MLP, prefill), each layer its fitted schedule deletes at",
)


def fit_method(step: LLMLayerStep) -> Method:
    """A transient method that installs one of the fit's steps (`statistics_step`, `fitting_step`) on a
    model through the adapter, unreduced as far as its plan goes (the fit reads what it recorded)."""
    def fit_schedule(dims, budget, params) -> dict:
        n0, layers = dims.visual_tokens, list(step.layers)
        plan = staged_llm_plan(dims, {})
        plan["llm"] = {"layers": layers, "discards": [0] * len(layers), "n0": n0, "final": n0,
                       "visual_out": [n0] * len(layers)}
        return plan

    return Method(name="fitprune-fit", summary="FitPrune's fit (one pass over the calibration prompts)",
                  phase="llm", acts_on=("llm",), needs=LLM_NEEDS, needs_attention=METHOD.needs_attention,
                  stages=STAGES, params={}, schedule=fit_schedule, build=lambda plan: (step,))

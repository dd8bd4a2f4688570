"""SparseVLM v1.5 (methods.md §8.4): text-rated pruning with token recycling inside the LLM.

Pruning layers 2, 6, 15 run on their full input; the pruning applies to their output, i.e. at the
input of layers 3, 7, 16 (a step with `scores_from="previous"`).
filter    raters: the instruction tokens whose relevance (mean over image tokens v of softmax over
          the instruction of v·t, on the LLM input embeddings) is above the mean — chosen from the
          input embeddings, so the same set at every pruning layer; importance s_v = mean over the
          raters of the pruning layer's head-mean attention A[t, v]; keep the top
          k = min(schedule, n_vis − 1)
correlate of the d dropped tokens, the ⌊0.3·d⌋ + 1 with the highest s_v are recycled: density-peak
          kNN clustering into ⌊(⌊0.3·d⌋ + 1)/10⌋ + 1 clusters (K = 1 into new tokens); the rest
          of the dropped tokens have K = 0
compress  every cluster becomes one token, the mean of its members; the other dropped tokens leave
          the sequence and the KV cache of the later layers

Positions (a documented deviation): the project keeps original RoPE positions for every in-LLM
method, so a cluster token cannot be inserted "right after the kept tokens" with fresh
contiguous positions as the official code does. It takes the slot (position) of its
lowest-position member instead, and is ordered with the kept tokens by position.
DPC-kNN: k = min(clusters, members − 1) nearest other tokens; the density jitter is drawn from a
generator seeded with `seed` for every prompt separately, so a batch equals its rows run alone.

Budget: label B runs the official v1.5 schedule for B, unchanged (192 → [300, 200, 110],
128 → [303, 110, 36], 64 → [66, 30, 17]); the plan reports the realised layer average with the
cluster tokens (≈ 206.5 / 145.4 / 82.3 on LLaVA-1.5-7B). Other budgets need an explicit `keeps`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ficoco.budget import InfeasibleBudget, sparsevlm_matched_schedule, sparsevlm_recycled_clusters
from ficoco.contract import LLMKept, LLMLayerStep, LLMScores, LLMTokens, StepShape
from ficoco.methods.base import Method, Param, non_negative_int
from ficoco.methods.shared import LLM_NEEDS, increasing_layers, llm_rows_macs, staged_llm_plan
from ficoco.paradigm.compress import gather_tokens, group_means
from ficoco.paradigm.correlate import dpc_knn_clusters
from ficoco.paradigm.filter import complement_positions, rater_mask, rater_scores, top_k_positions

OFFICIAL_SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}


@dataclass(frozen=True)
class SparseVLMReduce:
    """One SparseVLM pruning step; `keep[layer]` tokens are kept before the cluster tokens are added."""

    keep: dict[int, int]
    recycle: bool
    seed: int

    def __call__(self, layer: int, tokens: LLMTokens, scores: LLMScores) -> LLMKept:
        visual, hidden = tokens.visual, tokens.hidden
        raters = rater_mask(tokens.input_visual, tokens.input_instruction)                 # (B, M)
        importance = rater_scores(scores.rows(tokens.instruction, keys=visual), raters)      # (B, N)
        kept = top_k_positions(importance, self.keep[layer])                                 # into the visual axis
        if not self.recycle:
            return LLMKept(hidden=hidden, visual=visual.gather(1, kept))
        dropped = complement_positions(kept, visual.shape[1])                                # (B, d)
        n_dropped = dropped.shape[1]
        recycled = dropped.gather(1, top_k_positions(importance.gather(1, dropped), math.floor(0.3 * n_dropped) + 1))
        n_clusters = sparsevlm_recycled_clusters(n_dropped)
        members = gather_tokens(hidden, visual.gather(1, recycled))                          # (B, R, D)
        groups = self._clusters(members, n_clusters)                                          # (B, R)
        means, _ = group_means(members, groups, n_clusters)                                  # (B, C, D)
        slots = torch.full((visual.shape[0], n_clusters), visual.shape[1], device=visual.device)
        slots = slots.scatter_reduce(1, groups, recycled, reduce="amin")                     # lowest member
        cluster_positions = visual.gather(1, slots)                                          # (B, C)
        hidden = hidden.scatter(1, cluster_positions[..., None].expand(-1, -1, hidden.shape[-1]),
                                means.to(hidden.dtype))
        kept_all = torch.cat([kept, slots], dim=1).sort(dim=1).values
        return LLMKept(hidden=hidden, visual=visual.gather(1, kept_all))

    def overhead(self, dims, shape: StepShape) -> int:
        # the raters are chosen again at every call from the input embeddings of all N0 image tokens: the prompt's
        # own (LLaVA-NeXT, Qwen: per image size), never the model's nominal count
        if shape.delivered < shape.tokens:
            raise ValueError(f"sparsevlm: the prompt's LLM input held {shape.delivered} image tokens, fewer than the "
                             f"{shape.tokens} visual tokens layer {shape.layer} received")
        raters = shape.delivered * dims.llm_hidden * shape.instruction          # (N0×D)·(D×M) relevance logits
        importance = llm_rows_macs(dims, shape.instruction, shape)              # the M prompt tokens' attention rows
        if not self.recycle:
            return raters + importance
        # DPC-kNN's R×R Euclidean distances between the recycled tokens (one product each); the cluster
        # means are scatter-adds
        recycled = math.floor(0.3 * (shape.tokens - self.keep[shape.layer])) + 1
        return raters + importance + recycled * recycled * dims.llm_hidden

    def _clusters(self, members: torch.Tensor, n_clusters: int) -> torch.Tensor:
        """DPC-kNN cluster ids (B, R), one prompt at a time with its own seeded jitter."""
        batch, n_members, _ = members.shape
        if n_members == 1:
            return torch.zeros(batch, 1, dtype=torch.long, device=members.device)
        rows = []
        for row in range(batch):
            generator = torch.Generator(device=members.device).manual_seed(self.seed)
            rows.append(dpc_knn_clusters(members[row:row + 1], n_clusters, min(n_clusters, n_members - 1), generator))
        return torch.cat(rows)


def check_layers(name: str, dims, layers) -> list[int]:
    """Every pruning layer must leave a next layer for its pruned output."""
    layers, n_layers = list(layers), dims.llm_layers
    if layers[-1] >= n_layers - 1:
        raise ValueError(f"{name}: layers={layers}: every pruning layer must be in [0, {n_layers - 2}] (pruning "
                         f"applies to its output, the input of the next of the {n_layers} LLM layers)")
    return layers


def requested_schedule(name: str, budget: int, params) -> tuple:
    """The keep counts asked for: `keeps` when given, else the official v1.5 schedule of B."""
    wanted = params["keeps"]
    if wanted is None:
        if budget not in OFFICIAL_SCHEDULES:
            raise ValueError(f"{name}: budget {budget} has no official v1.5 schedule; valid budgets: "
                             f"{sorted(OFFICIAL_SCHEDULES)}, or pass keeps=[k_1, ...] (one per pruning layer)")
        wanted = OFFICIAL_SCHEDULES[budget]
    if len(wanted) != len(params["layers"]):
        raise ValueError(f"{name}: keeps={list(wanted)} must give one count per pruning layer {list(params['layers'])}")
    return tuple(wanted)


def schedule_plan(dims, layers: list[int], wanted, recycle: bool) -> dict:
    """The plan of pruning at `layers`, keeping min(wanted_l, n_vis − 1) each, plus the recycled cluster
    tokens (shared by `sparsevlm` and `sparsevlm-matched`)."""
    after, keeps, clusters, n_visual = {}, [], [], dims.visual_tokens
    for layer, count in zip(layers, wanted):
        keep = min(count, n_visual - 1)
        added = sparsevlm_recycled_clusters(n_visual - keep) if recycle else 0
        keeps.append(keep)
        clusters.append(added)
        n_visual = after[layer + 1] = keep + added
    plan = staged_llm_plan(dims, after)
    plan["llm"].update(pruning_layers=layers, keep=keeps, clusters=clusters, schedule=list(wanted))
    return plan


def schedule(dims, budget, params) -> dict:
    layers = check_layers("sparsevlm", dims, params["layers"])
    if budget is None:
        return staged_llm_plan(dims, {})
    return schedule_plan(dims, layers, requested_schedule("sparsevlm", budget, params), params["recycle"])


def schedule_matched(dims, budget, params) -> dict:
    """`sparsevlm-matched` (§8.4): the requested schedule scaled by the largest common factor (1e-4 grid,
    ≤ 1) whose realised layer average, cluster tokens included, is ≤ B (`budget.sparsevlm_matched_schedule`)."""
    name = "sparsevlm-matched"
    layers = check_layers(name, dims, params["layers"])
    if budget is None:
        return staged_llm_plan(dims, {})
    wanted = requested_schedule(name, budget, params)
    matched = sparsevlm_matched_schedule(budget, wanted, layers, dims.llm_layers, dims.visual_tokens, method=name,
                                         recycle=params["recycle"])
    if min(matched) < 1:
        raise InfeasibleBudget(f"{name}: budget B={budget} scales the schedule {list(wanted)} to {matched}, which "
                               f"keeps no image token at some pruning layer; use a larger budget or other keeps")
    plan = schedule_plan(dims, layers, matched, params["recycle"])
    plan["llm"]["base_schedule"] = list(wanted)
    return plan


def build(plan: dict) -> tuple:
    llm = plan.llm
    if llm is None:
        return ()
    keep = dict(zip(llm.layers, llm.details["keep"]))
    reduce = SparseVLMReduce(keep=keep, recycle=plan.params["recycle"], seed=plan.params["seed"])
    return (LLMLayerStep(layers=tuple(llm.layers), reduce=reduce,
                         tokens_out=dict(zip(llm.layers, llm.visual_out)), overhead=reduce.overhead,
                         scores_from="previous", needs_inputs=True),)


def positive_counts_or_none(value) -> str | None:
    if value is None:
        return None
    ok = (isinstance(value, (list, tuple)) and len(value) >= 1
          and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in value))
    return None if ok else "must be None (the official v1.5 schedule of B) or a list of integers >= 1"


def boolean(value) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


PARAMS = {
    "layers": Param((2, 6, 15), "pruning layers (0-based); each runs on its full input and prunes its output",
                    increasing_layers),
    "keeps": Param(None, "image tokens kept at each pruning layer; None = the official v1.5 schedule of B "
                         "(192, 128, 64)", positive_counts_or_none),
    "recycle": Param(True, "recycle part of the dropped tokens into cluster tokens", boolean),
    "seed": Param(0, "seed of the DPC density jitter (drawn per prompt)", non_negative_int),
}
NEEDS = ("the raters' attention rows (instruction tokens) on the image tokens at each pruning layer, recomputed from "
         "that layer's q/k (the layer keeps SDPA)")
CORRELATE = ("the ⌊0.3·d⌋ + 1 most important dropped tokens: DPC-kNN clusters (K = 1 into new tokens); the other "
             "dropped tokens K = 0")
COMPRESS = ("cluster means take the slot of their first member; the rest leave the sequence and the KV cache of later "
            "layers (original RoPE positions)")

METHOD = Method(
    name="sparsevlm",
    summary="SparseVLM v1.5: text raters score image tokens at LLM layers 2/6/15, the official keep schedule of B, "
            "dropped tokens partly recycled into cluster tokens; realised average reported (≈ 206.5/145.4/82.3)",
    phase="llm",
    acts_on=("llm",),
    needs=LLM_NEEDS,
    needs_attention=NEEDS,
    stages={
        "filter": "raters = instruction tokens of above-mean relevance to the image (input embeddings); importance = "
                  "mean rater attention at the pruning layer; keep the top min(schedule, n − 1)",
        "correlate": CORRELATE,
        "compress": COMPRESS,
    },
    params=PARAMS,
    schedule=schedule,
    build=build,
)

MATCHED = Method(
    name="sparsevlm-matched",
    summary="SparseVLM v1.5, budget-matched: the official v1.5 schedule of B (or keeps) scaled by one common factor, "
            "the largest on a 1e-4 grid whose realised layer average (cluster tokens included) is <= B",
    phase="llm",
    acts_on=("llm",),
    needs=LLM_NEEDS,
    needs_attention=NEEDS,
    stages={
        "filter": "SparseVLM's raters and importance; keep the top min(factor·schedule, n − 1), one common factor "
                  "solved so the realised layer average is <= B",
        "correlate": CORRELATE,
        "compress": COMPRESS,
    },
    params=PARAMS,
    schedule=schedule_matched,
    build=build,
)

"""What a token-reduction method is, independent of any model family.

A `Method` says *what* happens and *where*; a model adapter (ficoco/models) says *how* to get the
hidden states and attention at that place. The boundary between the two is a small set of
**reduction steps**, one class per site a method can act on:

| step                | site                                                                  | the adapter hands it          |
|---------------------|-----------------------------------------------------------------------|-------------------------------|
| `VisionLayerStep`   | inside vision encoder layers, after the attention residual, before the MLP | `VisionTokens`, `VisionScores` |
| `VisionInputStep`   | the vision tower's input: the image is resized to fewer patches       | the pixel values              |
| `LLMLayerStep`      | at the input of LLM decoder layers, during prefill                    | `LLMTokens`, `LLMScores`      |
| `VisionOutputStep`  | the output of the vision layer LLaVA reads (CLS first), before the projector | `VisionTokens`, `VisionOutputScores` |
| `ProjectorStep`     | the projected visual tokens of each image, before the LLM             | `ImageTokens`                 |

A step's `reduce` is a plain function of tensors (built from ficoco.paradigm); it never sees a
module. Attention is offered through a *scores* object whose methods compute only what is asked
for (the full head-mean matrix, a few rows, or the keys), so a method that needs one row never
pays for the matrix, and the layer's own output keeps its fused attention kernel.

Sites still to come (methods.md §8) slot in as further step classes without touching the
existing ones, as `VisionOutputStep` (VisionZip, PruMerge, TopK-CLS, Random, pooling) and
`ProjectorStep` (DivPrune) did. `LLMLayerStep.scores_from="previous"`
hands a step the attention and keys of the layer before the reducing one (FastV, DART,
SparseVLM). `VisionTokens.key_bias` already carries ToMe's proportional attention.

Shapes: B = batch (images for vision steps, prompts for LLM steps), N = current tokens,
D = width, H = heads, d = head dim, L = current sequence length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping, Protocol

import torch

from ficoco.budget import layer_average, step_counts
from ficoco.paradigm.compress import gather_tokens, self_preserving_merge
from ficoco.paradigm.correlate import adaptive_quantile_weights, fixed_k_weights

PHASES = ("none", "vision", "projector", "llm", "both")
SITES = ("vision", "projector", "llm")
VISION_ATTENTION = ("probs", "rows", "keys", "none")
LLM_SCORES_FROM = ("self", "previous")


# ------------------------------------------------------------------------------------------------
# What flows between the adapter and a step

@dataclass(frozen=True)
class VisionTokens:
    """The token matrix of one vision-encoder layer, CLS first, patches in original order."""

    hidden: torch.Tensor                    # (B, 1+N, D)
    positions: torch.Tensor                 # (B, N) int64 raster position (row·W + col) of each patch
    key_bias: torch.Tensor | None = None    # (B, 1+N) additive logit bias per key (ToMe sizes); None = 0


class VisionScores(Protocol):
    """Attention of the current vision layer, computed on demand (float32, averaged over heads)."""

    def probs(self) -> torch.Tensor:
        """(B, 1+N, 1+N) softmax probabilities, row = query, column = key, CLS at 0."""

    def rows(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, R, 1+N) probabilities of the query rows `queries` (B, R)."""

    def keys(self) -> torch.Tensor:
        """(B, H, 1+N, d) keys of the layer."""

    def logits(self) -> torch.Tensor:
        """(B, 1+N, 1+N) float32 pre-softmax logits q·k·scale averaged over heads (no key bias)."""


@dataclass(frozen=True)
class LLMTokens:
    """The residual stream entering one LLM decoder layer during prefill (one image span per row)."""

    hidden: torch.Tensor                    # (B, L, D)
    visual: torch.Tensor                    # (B, N) int64 sequence positions of the current visual tokens
    instruction: torch.Tensor               # (B, M) int64 positions of the prompt tokens after the last image token
    input_visual: torch.Tensor | None = None       # (B, N0, D) LLM input embeddings of every image token (before
                                                   # any reduction); only for a step with needs_inputs
    input_instruction: torch.Tensor | None = None  # (B, M, D) LLM input embeddings of the instruction tokens


@dataclass(frozen=True)
class LLMKept:
    """What an LLM step returns: the updated residual stream and the visual positions it keeps."""

    hidden: torch.Tensor                    # (B, L, D) merged values written at the kept positions
    visual: torch.Tensor                    # (B, N') int64 kept visual positions, sorted ascending


class LLMScores(Protocol):
    """Causal attention of one LLM layer on its own input, computed on demand.

    The layer is the reducing layer itself, or the layer before it when the step says
    `scores_from="previous"`; either way positions are those of the reducing layer's input.
    """

    def rows(self, queries: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """(B, R, K) float32 head-mean probabilities of query rows `queries` (B, R), softmax over every
        key the row may see (causal + padding mask), returned for the key columns `keys` (B, K)
        (all columns when None)."""

    def keys(self) -> torch.Tensor:
        """(B, H_kv, L, d) the layer's keys after RoPE (what its KV cache holds)."""

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D): the LLM's final norm (the one before the LM head) applied to `hidden`."""


@dataclass(frozen=True)
class VisionLayerStep:
    """Reduce inside vision encoder layers, between the attention residual add and the MLP."""

    WHERE: ClassVar[str] = "vision encoder layers (between attention and MLP)"   # for `ficoco methods`

    layers: tuple[int, ...]                 # 0-based encoder layers that reduce
    reduce: Callable[[int, VisionTokens, VisionScores], VisionTokens]
    tokens_out: Mapping[int, int]           # layer -> patches left after it (CLS not counted)
    attention: str = "probs"                # what reduce reads: "probs" (the full matrix, computed once
                                            # together with the layer output) or "rows" / "keys" / "none"
                                            # (on demand; the output keeps the fused kernel)
    site: str = field(default="vision", init=False)

    def __post_init__(self):
        if self.attention not in VISION_ATTENTION:
            raise ValueError(f"attention={self.attention!r}; valid choices are {list(VISION_ATTENTION)}")


@dataclass(frozen=True)
class VisionInputStep:
    """Change the image the vision tower encodes: fewer patches from the start (image downsampling).

    `prepare` maps the pixel values the caller passed (B, C, H, W) to (B, C, image_side, image_side);
    the adapter runs it (unless the input already has that size), interpolates the position
    embeddings to the new patch grid and sends the LLM one feature per patch.
    """

    WHERE: ClassVar[str] = "vision encoder input (fewer patches are encoded)"   # for `ficoco methods`

    image_side: int                         # pixels per side of the square image the tower encodes
    prepare: Callable[[torch.Tensor], torch.Tensor]
    site: str = field(default="vision", init=False)

    def __post_init__(self):
        if isinstance(self.image_side, bool) or not isinstance(self.image_side, int) or self.image_side < 1:
            raise ValueError(f"image_side={self.image_side!r} must be an integer number of pixels >= 1")


@dataclass(frozen=True)
class LLMLayerStep:
    """Reduce the visual tokens at the input of LLM decoder layers during prefill.

    Kept tokens keep their original RoPE positions; the adapter drops the removed positions from
    the hidden states, rotary tables, mask and (from that layer on) the KV cache.
    """

    WHERE: ClassVar[str] = "LLM layers (layer input, prefill)"   # for `ficoco methods`

    layers: tuple[int, ...]                 # 0-based decoder layers that reduce
    reduce: Callable[[int, LLMTokens, LLMScores], LLMKept]
    tokens_out: Mapping[int, int]           # layer -> visual tokens left after it
    needs_instruction: bool = True          # a prompt with no tokens after the image cannot be scored:
                                            # alone it is left unreduced, in a batch it is an error
    scores_from: str = "self"               # "self": the reducing layer's attention on its input;
                                            # "previous": layer l−1's (FastV: A_{K−1}), same positions
    needs_inputs: bool = False              # reduce reads LLMTokens.input_visual / input_instruction (SparseVLM)
    site: str = field(default="llm", init=False)

    def __post_init__(self):
        if self.scores_from not in LLM_SCORES_FROM:
            raise ValueError(f"scores_from={self.scores_from!r}; valid choices are {list(LLM_SCORES_FROM)}")
        if self.scores_from == "previous" and any(layer < 1 for layer in self.layers):
            raise ValueError(f"scores_from='previous' needs every reducing layer >= 1 (layer 0 has no previous "
                             f"layer); got layers {list(self.layers)}")


@dataclass(frozen=True)
class ImageTokens:
    """The tokens of each image on their way to the LLM (what a vision-output or projector step returns)."""

    hidden: torch.Tensor                    # (B, K, D) exactly what the next part receives, in delivery order
    positions: torch.Tensor | None          # (B, P) raster positions of the original patches kept or merged into
                                            # (sorted; for analysis); None when every token is new (pooling)
    counts: torch.Tensor | None = None      # (B,) int64 tokens of each image when they differ (an adaptive
                                            # step): row b's first counts[b] tokens are real, the rest of the
                                            # K = max(counts) rows are padding; `positions` rows are padded
                                            # with -1 after their image's own entries. None = K for every image


class VisionOutputScores(Protocol):
    """What a vision-output step may read about the features, each computed on demand."""

    def cls_row(self) -> torch.Tensor:
        """(B, 1+N) float32 head-mean attention probabilities of the CLS query in the feature layer."""

    def keys(self) -> torch.Tensor:
        """(B, H, 1+N, d) the feature layer's keys."""

    def next_cls_row(self) -> torch.Tensor:
        """(B, 1+N) float32 CLS row of the *next* layer's q/k projections applied to the features (its
        layer norm first), all heads concatenated, scale 1/sqrt(width), softmax over all keys (PruMerge)."""

    def next_keys(self) -> torch.Tensor:
        """(B, 1+N, D) the next layer's keys of the features, full width (PruMerge's kNN metric)."""

    def image_digests(self) -> list[str]:
        """One sha256 hex digest of the pixel values per image: a content identity for seeded methods."""


@dataclass(frozen=True)
class VisionOutputStep:
    """Reduce the output of the vision layer LLaVA reads (CLS first, all patches), before the projector.

    `reduce(layer, tokens, scores)` gets the feature layer's index, its output as `VisionTokens` and a
    `VisionOutputScores`; its `ImageTokens.hidden` (B, tokens_out, D) replaces the projector input
    (CLS only if the method keeps it), so the LLM sees `tokens_out` tokens per image.

    An *adaptive* step (`tokens_out=None`, PruMerge's IQR rule) chooses a count per image: its reduce
    returns `hidden` padded to the batch's largest count (B, max(counts), D) and `counts` (B,); the
    adapter trims each image's projected tokens to its own count and gives every image a placeholder
    run of that length.
    """

    WHERE: ClassVar[str] = "vision tower output (the features LLaVA reads, before the projector)"   # for `ficoco methods`

    reduce: Callable[[int, VisionTokens, VisionOutputScores], ImageTokens]
    tokens_out: int | None                  # tokens per image the projector (and then the LLM) receives;
                                            # None = adaptive (a count per image, `ImageTokens.counts`)
    site: str = field(default="vision", init=False)


@dataclass(frozen=True)
class ProjectorStep:
    """Reduce the projected visual tokens of each image before they enter the LLM (contiguous positions).

    `reduce(0, tokens, None)` gets `ImageTokens(hidden (B, N, D_llm), positions (B, N))` and returns
    (B, tokens_out, D_llm). (A variant keeping the original RoPE positions is an `LLMLayerStep` at layer 0.)
    """

    WHERE: ClassVar[str] = "projector output (before the LLM)"   # for `ficoco methods`

    reduce: Callable[[int, ImageTokens, None], ImageTokens]
    tokens_out: int                         # tokens per image the LLM receives
    site: str = field(default="projector", init=False)


Step = VisionLayerStep | VisionInputStep | LLMLayerStep | VisionOutputStep | ProjectorStep


# ------------------------------------------------------------------------------------------------
# Shared correlate -> compress tail (FiCoCo-V and FiCoCo-L use the same one)

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


# ------------------------------------------------------------------------------------------------
# Parameters

@dataclass(frozen=True)
class Param:
    """One hyperparameter: default, a one-line description, and a check returning an error or None."""

    default: Any
    doc: str
    check: Callable[[Any], str | None]


def unit_interval(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0
    return None if ok else "must be a number in [0, 1]"


def positive_number(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) > 0 and math.isfinite(value)
    return None if ok else "must be a finite number > 0"


def positive_int(value) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else "must be an integer >= 1"


def non_negative_int(value) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else "must be an integer >= 0"


def optional_non_negative_int(value) -> str | None:
    return None if value is None else non_negative_int(value)


# ------------------------------------------------------------------------------------------------
# Method

@dataclass(frozen=True)
class Method:
    """A named token-reduction method: where it acts, what it needs, its stages and parameters.

    `schedule(dims, budget, params) -> plan` turns a budget into per-layer counts without a model;
    `build(plan) -> tuple[Step, ...]` turns a plan into the reduction steps an adapter installs.

    `budgeted=False` marks an *adaptive* method (PruMerge's IQR originals): it chooses its token count
    per image, so it takes no budget. `plan(dims, None)` plans its adaptive reduction (the plan's
    "delivered", "llm_visual" and "layer_average" are None: the counts exist only once a run has
    realised them, `handle.last_counts()`), and any other budget is a ValueError naming the method.
    The grid runs such a method once, under the budget label "adaptive".
    """

    name: str
    summary: str
    phase: str                                  # "none" | "vision" | "projector" | "llm" | "both"
    acts_on: tuple[str, ...]                    # subset of SITES
    needs_attention: str                        # which attention probabilities, in words
    stages: Mapping[str, str]                   # filter / correlate / compress -> one line each
    params: Mapping[str, Param]
    schedule: Callable[[Any, int | None, dict], dict]
    build: Callable[[dict], tuple[Step, ...]]
    budgeted: bool = True                       # False: adaptive, a count per image and no budget

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"{self.name}: phase={self.phase!r}; valid phases are {list(PHASES)}")
        bad_sites = [site for site in self.acts_on if site not in SITES]
        if bad_sites:
            raise ValueError(f"{self.name}: acts_on {bad_sites} invalid; valid sites are {list(SITES)}")
        object.__setattr__(self, "stages", MappingProxyType(dict(self.stages)))
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    @property
    def defaults(self) -> dict:
        return {name: param.default for name, param in self.params.items()}

    def resolve(self, overrides: Mapping[str, Any]) -> dict:
        """Defaults updated by `overrides`; ValueError for an unknown key or a bad value."""
        unknown = sorted(set(overrides) - set(self.params))
        if unknown:
            valid = ", ".join(self.params) or "none (this method has no parameters)"
            raise ValueError(f"{self.name}: unknown parameter(s) {unknown}; valid parameters: {valid}")
        params = self.defaults
        params.update(overrides)
        for name, value in params.items():
            error = self.params[name].check(value)
            if error:
                raise ValueError(f"{self.name}: {name}={value!r} {error} ({self.params[name].doc})")
        return params

    def plan(self, dims, budget: int | None, **overrides) -> dict:
        """The JSON-able schedule for `budget` on a model of shape `dims` (ficoco.dims.ModelDims).

        Raises ficoco.budget.InfeasibleBudget (a ValueError) when the budget cannot be reached, and
        ValueError for unknown or bad overrides or an out-of-range budget.
        """
        if budget is not None and not self.budgeted:
            raise ValueError(f"{self.name}: an adaptive method takes no budget (it chooses its token count per "
                             f"image and logs the realised count); got budget {budget!r}. Use budget None (the "
                             f"grid's budget label 'adaptive')")
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int):
                raise ValueError(f"{self.name}: budget must be an integer number of visual tokens or None; got {budget!r}")
            if not 1 <= budget <= dims.visual_tokens:
                raise ValueError(f"{self.name}: budget {budget} must be in [1, {dims.visual_tokens}] "
                                 f"(the model's visual tokens), or None for unreduced")
        params = self.resolve(overrides)
        plan = self.schedule(dims, budget, params)
        return {"method": self.name, "phase": self.phase, "budget": budget, "params": params, **plan}

    def check_budget(self, dims, budget: int | None, **overrides) -> dict:
        """Validate a (budget, overrides) pair without a model; returns the planned schedule."""
        return self.plan(dims, budget, **overrides)

    def steps(self, plan: dict) -> tuple[Step, ...]:
        """The reduction steps that realise `plan` (a dict returned by `plan`)."""
        return self.build(plan)


# ------------------------------------------------------------------------------------------------
# Plan pieces shared by the schedules

def vision_layer_counts(dims, discards: Mapping[int, int]) -> list[list[int]]:
    """Planned [n_attn, n_mlp] per executed vision layer, CLS included, for one image."""
    tokens = dims.vision_tokens
    counts = []
    for layer in range(dims.vision_layers_run):
        after = tokens - discards.get(layer, 0)
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


def planned_vision_layers(plan: Mapping) -> tuple:
    """The reducing vision layers of a plan's "vision" entry; () when it has none."""
    vision = plan["vision"]
    return tuple(vision["layers"]) if vision and vision["layers"] else ()


def vision_layers(method: str, dims, start: int, end: int | None, start_name="start", end_name="end") -> list[int]:
    """The reducing vision layers start..end, inside the layers that run (0..last feature layer)."""
    last = dims.last_vision_layer
    end = last if end is None else end
    check_layer_range(method, start_name, start, end_name, end, last + 1,
                      f"the vision layers that produce LLaVA's features are 0..{last}")
    return list(range(start, end + 1))


def vision_plan(dims, discards: dict[int, int]) -> dict:
    """Plan entries of an in-encoder schedule: per-layer discards and the tokens delivered to the LLM."""
    patches, patches_out = dims.num_patches, []
    for layer in sorted(discards):
        patches -= discards[layer]
        patches_out.append(patches)
    delivered = dims.visual_tokens - sum(discards.values())
    return {
        "vision": {"layers": sorted(discards), "discards": [discards[layer] for layer in sorted(discards)],
                   "patches_out": patches_out, "grid_hw": [dims.grid_side, dims.grid_side]},
        "vision_counts": vision_layer_counts(dims, discards),
        "delivered": delivered,
    }


def encoder_plan(dims, discards: dict[int, int]) -> dict:
    """The whole plan of a method that reduces only inside the vision encoder (`vision_plan`, then
    the delivered tokens in every LLM layer)."""
    return unreduced_llm_plan(dims, vision_plan(dims, discards))


def patches_for(dims, delivered: int) -> int:
    """Patches that must remain for `delivered` tokens to reach the LLM (CLS is delivered under "full")."""
    return delivered - (dims.visual_tokens - dims.num_patches)


def vision_layer_build(make_reduce: Callable[[tuple, dict], Callable], attention: str = "probs"
                       ) -> Callable[[dict], tuple]:
    """`build(plan)` of an in-encoder method: one `VisionLayerStep` over the plan's reducing vision
    layers, with `make_reduce(layers, plan["vision"])`; none when the plan reduces no vision layer."""
    def build(plan: dict) -> tuple:
        layers = planned_vision_layers(plan)
        if not layers:
            return ()
        vision = plan["vision"]
        return (VisionLayerStep(layers=layers, reduce=make_reduce(layers, vision),
                                tokens_out=dict(zip(layers, vision["patches_out"])), attention=attention),)

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

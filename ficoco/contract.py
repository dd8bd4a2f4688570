"""The contract between token-reduction methods and model adapters: what flows between them.

Methods (ficoco/methods) and adapters (ficoco/models) both import this module and never each
other: a method is a plan and a few reduction steps built from the types here; an adapter
installs the steps on one model family and hands them these types.

A `Method` says *what* happens and *where*; a model adapter (ficoco/models) says *how* to get the
hidden states and attention at that place. The boundary between the two is a small set of
**reduction steps**, one class per site a method can act on:

| step                | site                                                                  | the adapter hands it          |
|---------------------|-----------------------------------------------------------------------|-------------------------------|
| `VisionLayerStep`   | inside vision encoder layers, after the attention residual, before the MLP | `VisionTokens`, `VisionScores` |
| `VisionInputStep`   | the vision tower's input: the image is resized to fewer patches       | the pixel values              |
| `LLMLayerStep`      | at the input of LLM decoder layers, during prefill                    | `LLMTokens`, `LLMScores`      |
| `VisionOutputStep`  | the output of the vision layer LLaVA reads (CLS first), before the projector | `VisionTokens`, `VisionOutputScores` |
| `ProjectorStep`     | the projected visual tokens of each image, before the LLM             | `ImageTokens`, `InstructionScores` (CDPruner) |

A step's `reduce` is a plain function of tensors (built from ficoco.paradigm); it never sees a
module. Attention is offered through a *scores* object whose methods compute only what is asked
for (the full head-mean matrix, a few rows, or the keys), so a method that needs one row never
pays for the matrix, and the layer's own output keeps its fused attention kernel.

Sites still to come (methods.md §8) slot in as further step classes without touching the
existing ones, as `VisionOutputStep` (VisionZip, PruMerge, TopK-CLS, Random, pooling) and
`ProjectorStep` (DivPrune, CDPruner) did. `LLMLayerStep.scores_from="previous"`
hands a step the attention and keys of the layer before the reducing one (FastV, DART,
SparseVLM). `VisionTokens.key_bias` already carries ToMe's proportional attention.

Shapes: B = batch (images for vision steps, prompts for LLM steps), N = current tokens,
D = width, H = heads, d = head dim, L = current sequence length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Protocol

import torch

VISION_ATTENTION = ("probs", "rows", "keys", "none")
LLM_SCORES_FROM = ("self", "previous")
LLM_PLACEMENTS = ("input", "attention")


# ------------------------------------------------------------------------------------------------
# What flows between the adapter and a step

@dataclass(frozen=True)
class VisionTokens:
    """The token matrix of one vision-encoder layer, CLS first, patches in original order.

    A tower without CLS (Qwen2-VL) has `prefix` 0 and hands whole merge groups as its units: each row of
    `hidden` is one group's merge² patches side by side (width merge²·D), `positions` the group's raster
    position on the image's grid of groups, and the scores are the patches' pooled to groups (the adapter
    says how). Only a method whose needs admit a tower without CLS gets such tokens (`Needs.cls_first`).
    """

    hidden: torch.Tensor                    # (B, P+N, D): P prefix tokens (CLS), then the N units (patches)
    positions: torch.Tensor                 # (B, N) int64 raster position (row·W + col) of each unit
    key_bias: torch.Tensor | None = None    # (B, P+N) additive logit bias per key (ToMe sizes); None = 0
    prefix: int = 1                         # P: 1 = CLS first, 0 = no CLS


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

    def rows(self, queries: torch.Tensor, keys: torch.Tensor | None = None, heads: str = "mean") -> torch.Tensor:
        """(B, R, K) float32 head-mean probabilities of query rows `queries` (B, R), softmax over every
        key the row may see (causal + padding mask), returned for the key columns `keys` (B, K)
        (all columns when None); `heads="max"`: the maximum over heads instead of the mean."""

    def keys(self) -> torch.Tensor:
        """(B, H_kv, L, d) the layer's keys after RoPE (what its KV cache holds; read from that cache when
        the layer already ran, `StepShape.keys_cached`)."""

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D): the LLM's final norm (the one before the LM head) applied to `hidden`."""


@dataclass(frozen=True)
class StepShape:
    """The sizes one reduction step ran on, for one image (tower and projector sites) or one prompt (LLM).

    A step's `overhead(dims, shape)` counts, from these sizes alone, the multiply-accumulates of the
    matrix products the step adds to the model (score rows or matrices it computes, similarity and
    correlation matrices, merges written as products, extra projections), for that image or prompt.
    Work without products (softmax, norms, sorting, quantiles, gathers) is not counted; neither is
    what the layer computes anyway (a vision step with attention="probs" reads the probabilities
    the layer's own output is computed from). docs/flops.md, "Selection overhead".
    """

    layer: int | None                       # the reducing layer (tower or LLM); None at the projector
    tokens: int                             # tokens the step received: 1+N (CLS first) in the tower and at its
                                            # output, N projected tokens at the projector, N visual at the LLM
    kept: int                               # tokens it kept (counted as `tokens` is)
    length: int = 0                         # LLM: the prompt's sequence length L entering the layer (no padding)
    instruction: int = 0                    # LLM: prompt tokens M after the image
    delivered: int = 0                      # LLM: image tokens N0 of the prompt's LLM input (before any LLM step;
                                            # LLaVA-NeXT / Qwen: this image's own, not the nominal count)
    keys_cached: bool = False               # LLM: the scoring layer's keys were read from its KV cache (a step
                                            # scoring from the previous layer, which ran already), not projected
    companion_macs: int = 0                 # projector: MACs of the CLIP companion's work for this image that the
                                            # step asked for (`InstructionScores`: image and text embeddings, cosines)


Overhead = Callable[[Any, StepShape], int]   # (ModelDims, StepShape) -> multiply-accumulates


@dataclass(frozen=True)
class VisionLayerStep:
    """Reduce inside vision encoder layers, between the attention residual add and the MLP."""

    WHERE: ClassVar[str] = "vision encoder layers (between attention and MLP)"   # for `ficoco methods`

    layers: tuple[int, ...]                 # 0-based encoder layers that reduce
    reduce: Callable[[int, VisionTokens, VisionScores], VisionTokens]
    tokens_out: Mapping[int, int]           # layer -> patches left after it (CLS not counted)
    overhead: Overhead                      # MACs of one image's step at one layer (`StepShape`)
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
    Resizing multiplies no matrices, so an input step has no selection overhead (`StepShape`).
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
    """Reduce the visual tokens of LLM decoder layers during prefill: at a layer's input, or (placement
    "attention") between its attention and its MLP.

    Kept tokens keep their original RoPE positions; the adapter drops the removed positions from
    the hidden states, rotary tables, mask and KV cache: from the reducing layer on at its input;
    from the next layer on after its attention (the reducing layer's attention, and so its cache,
    saw every token; its MLP runs on the kept ones). After attention, `LLMScores.rows` reads the
    probabilities the layer's own output was computed from (its attention runs explicitly), and
    `LLMTokens.hidden` is the residual stream after the attention residual add.
    """

    WHERE: ClassVar[str] = "LLM layers (layer input, prefill)"   # for `ficoco methods`

    layers: tuple[int, ...]                 # 0-based decoder layers that reduce
    reduce: Callable[[int, LLMTokens, LLMScores], LLMKept]
    tokens_out: Mapping[int, int | None]    # layer -> visual tokens left after it; None: the reduce chooses
                                            # (every row of a batch alike; FitPrune's fit, one prompt at a time)
    overhead: Overhead                      # MACs of one prompt's step at one layer (`StepShape`)
    needs_instruction: bool = True          # a prompt with no tokens after the image cannot be scored:
                                            # alone it is left unreduced, in a batch it is an error
    scores_from: str = "self"               # "self": the reducing layer's attention on its input;
                                            # "previous": layer l−1's (FastV: A_{K−1}), same positions
    needs_inputs: bool = False              # reduce reads LLMTokens.input_visual / input_instruction (SparseVLM)
    placement: str = "input"                # "input": before the layer runs; "attention": between its
                                            # attention residual and its MLP (the released FiCoCo-L code)
    site: str = field(default="llm", init=False)

    def __post_init__(self):
        if self.scores_from not in LLM_SCORES_FROM:
            raise ValueError(f"scores_from={self.scores_from!r}; valid choices are {list(LLM_SCORES_FROM)}")
        if self.placement not in LLM_PLACEMENTS:
            raise ValueError(f"placement={self.placement!r}; valid choices are {list(LLM_PLACEMENTS)}")
        if self.placement == "attention" and self.scores_from != "self":
            raise ValueError("placement='attention' scores from the reducing layer's own attention; "
                             f"scores_from={self.scores_from!r} needs placement='input'")
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
    overhead: Overhead                      # MACs of one image's step (`StepShape`)
    site: str = field(default="vision", init=False)


class InstructionScores(Protocol):
    """What a projector step that reads the instruction may ask about each image (`ProjectorStep.
    reads_instruction`), from the CLIP checkpoint the vision tower came from (its text tower is a
    companion of the model, ficoco/models/companion.py)."""

    def instruction_cosines(self) -> list[torch.Tensor]:
        """Per image, (N, M) float32: the cosine of each visual token's CLIP image embedding (the
        feature layer's patch output, CLIP's post-layernorm and visual projection) with each of the M
        CLIP text embeddings of its prompt's instruction (one per text-tower segment of the text)."""


@dataclass(frozen=True)
class ProjectorStep:
    """Reduce the projected visual tokens of each image before they enter the LLM (contiguous positions).

    `reduce(0, tokens, scores)` gets `ImageTokens(hidden (B, N, D_llm), positions (B, N))` and returns
    (B, tokens_out, D_llm); `scores` is an `InstructionScores` when the step reads the instruction, else
    None. (A variant keeping the original RoPE positions is an `LLMLayerStep` at layer 0.)
    """

    WHERE: ClassVar[str] = "projector output (before the LLM)"   # for `ficoco methods`

    reduce: Callable[[int, ImageTokens, "InstructionScores | None"], ImageTokens]
    tokens_out: int                         # tokens per image the LLM receives
    overhead: Overhead                      # MACs of one image's step (`StepShape`)
    reads_instruction: bool = False         # reduce reads `InstructionScores` (the model needs its CLIP text tower)
    site: str = field(default="projector", init=False)


Step = VisionLayerStep | VisionInputStep | LLMLayerStep | VisionOutputStep | ProjectorStep


# ------------------------------------------------------------------------------------------------
# What a method is handed about each image, and what it needs of it

POSITION_SCHEMES = ("rope-1d", "mrope-3d")


@dataclass(frozen=True)
class CropLayout:
    """One crop of an image as the vision tower encodes it (LLaVA-1.5: the one 336 px image)."""

    grid: tuple[int, int]                   # (rows, cols) of patches
    prefix: int                             # tokens before the patches in the tower: 1 = a CLS token, 0 = none


@dataclass(frozen=True)
class ImageLayout:
    """The visual tokens of one image, from the tower to the LLM.

    LLaVA-1.5: one 24x24 crop behind a CLS token, CLS not delivered, no layout tokens, 1-D RoPE.
    LLaVA-NeXT (AnyRes) adds crops and image-newline tokens; Qwen2-VL has no CLS and 3-D M-RoPE.
    """

    crops: tuple[CropLayout, ...]
    prefix_delivered: bool                  # the crops' prefix tokens reach the LLM (select strategy "full")
    layout_tokens: int                      # LLM tokens of the image that are no patch (image-newline)
    positions: str                          # how the LLM numbers positions: one of POSITION_SCHEMES

    def __post_init__(self):
        if self.positions not in POSITION_SCHEMES:
            raise ValueError(f"positions={self.positions!r}; valid: {', '.join(POSITION_SCHEMES)}")

    @property
    def visual_tokens(self) -> int:
        """LLM tokens of the unreduced image: patches, delivered prefixes and layout tokens."""
        patches = sum(rows * cols for rows, cols in (crop.grid for crop in self.crops))
        prefixes = sum(crop.prefix for crop in self.crops) if self.prefix_delivered else 0
        return patches + prefixes + self.layout_tokens


@dataclass(frozen=True)
class Needs:
    """What a method assumes about an image's layout; `unmet_needs` says which a model does not meet."""

    cls_first: bool = False                 # the tower's tokens start with a CLS token (CLS attention, CLS kept)
    remedy: str = ""                        # what would lift the needs, in words (a parameter value), if anything
    square_grid: bool = False               # that crop's grid is square (image resizing)
    positions: tuple[str, ...] = POSITION_SCHEMES   # LLM position schemes its LLM steps keep correctly


def unmet_needs(needs: Needs, layout: ImageLayout) -> list[str]:
    """Each need `layout` does not meet, in words ([] when the method can run on it)."""
    unmet = []
    if needs.cls_first and any(crop.prefix != 1 for crop in layout.crops):
        unmet.append("a CLS token first in the vision tower (this model's tower has "
                     f"{sorted({crop.prefix for crop in layout.crops})} prefix tokens)")
    if needs.square_grid and any(rows != cols for rows, cols in (crop.grid for crop in layout.crops)):
        unmet.append(f"a square patch grid (this model's: {[crop.grid for crop in layout.crops]})")
    if layout.positions not in needs.positions:
        unmet.append(f"{' or '.join(needs.positions)} positions in the LLM (this model uses {layout.positions})")
    if unmet and needs.remedy:
        unmet[-1] += f"; {needs.remedy}"
    return unmet


# ------------------------------------------------------------------------------------------------
# A method's plan for one budget on one model (Method.plan): what its steps will do, per layer

@dataclass(frozen=True)
class VisionSchedule:
    """A reduction inside the vision tower (or at its input), for one image."""

    layers: list[int]                       # reducing tower layers, 0-based ([] for an input step)
    grid_hw: list[int]                      # [rows, cols] of the patch grid the schedule is planned on
    discards: list[int] = field(default_factory=list)       # units removed at each reducing layer (patches;
                                                            # on Qwen2-VL merge groups of 2×2 patches)
    patches_out: list[int] = field(default_factory=list)    # units left after each reducing layer
    image_side: int | None = None           # an input step's image side in pixels (image downsampling)
    patches: int | None = None              # the patches such an input step encodes


@dataclass(frozen=True)
class LLMSchedule:
    """A reduction inside the LLM during prefill, for one prompt."""

    layers: list[int]                       # reducing decoder layers, 0-based
    discards: list[int]                     # visual tokens removed at each
    n0: int                                 # visual tokens entering the LLM
    final: int                              # visual tokens after the last reducing layer
    visual_out: list[int]                   # visual tokens left after each reducing layer
    details: Mapping[str, Any] = field(default_factory=dict)   # the method's own (PDrop's λ, SparseVLM's keeps)


@dataclass(frozen=True)
class OutputSchedule:
    """One reduction between the tower and the LLM: of the features ("vision_output") or of the
    projected tokens ("projector")."""

    site: str                               # "vision_output" | "projector"
    tokens_out: int | None                  # tokens per image the LLM receives; None: a count per image
    layer: int | None = None                # the tower layer whose output is reduced ("vision_output")
    adaptive: bool = False                  # a count per image, chosen while it runs (PruMerge's IQR rule)
    tokens_min: int | None = None           # an adaptive step's bounds on that count
    tokens_max: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)   # the method's own split of the tokens


@dataclass(frozen=True)
class Plan:
    """What a method will do at one budget on one model, and the token counts that follow.

    `vision_counts` holds one [attention tokens, MLP tokens] pair per executed tower layer (CLS
    included); `delivered` the visual tokens per image entering the LLM; `llm_visual` the visual
    tokens of every LLM layer and `layer_average` their mean (the budget's measure). An adaptive plan
    (a count per image) has None for these three: its counts exist once a run realises them. A plan
    that reduces between an LLM layer's attention and MLP counts `llm_visual` as the tokens the
    attention (and KV cache) saw, and `llm_mlp_visual` as those the MLP ran on.
    """

    method: str
    phase: str
    budget: int | None
    params: Mapping[str, Any]
    vision: VisionSchedule | None
    vision_counts: list[list[int]]
    delivered: int | None
    llm: LLMSchedule | None
    llm_visual: list[int] | None
    layer_average: float | None
    post_vision: OutputSchedule | None = None
    llm_mlp_visual: list[int] | None = None  # visual tokens each LLM layer's MLP runs on, where a reduction
                                             # falls between a layer's attention and MLP; None = llm_visual
    projector_tokens: int | None = None      # tokens per image the projector runs on, where a projector step
                                             # reduces its output afterwards; None = delivered
    vision_crops: int = 1                    # tower passes per image, `vision_counts` listing them one after
                                             # the other (LLaVA-NeXT: base image + crops)

    @classmethod
    def from_schedule(cls, method: str, phase: str, budget: int | None, params: Mapping[str, Any],
                      schedule: Mapping[str, Any]) -> "Plan":
        """The typed plan of a method's schedule (the mapping its `schedule` function builds); a key no
        field holds is an error, so nothing a schedule says is lost."""
        entries = dict(schedule)
        vision, llm, post = entries.pop("vision", None), entries.pop("llm", None), entries.pop("post_vision", None)
        llm_mlp_visual = entries.pop("llm_mlp_visual", None)
        projector_tokens = entries.pop("projector_tokens", None)
        vision_crops = entries.pop("vision_crops", 1)
        known = {"vision_counts", "delivered", "llm_visual", "layer_average"}
        if set(entries) != known:
            raise ValueError(f"{method}: its schedule has keys {sorted(entries)}; a plan holds vision, vision_counts, "
                             f"delivered, llm, llm_visual, layer_average, post_vision, llm_mlp_visual, "
                             f"projector_tokens and vision_crops")
        llm_visual = entries["llm_visual"]
        return cls(
            method=method, phase=phase, budget=budget, params=dict(params),
            vision=None if vision is None else VisionSchedule(**vision),
            vision_counts=[list(pair) for pair in entries["vision_counts"]],
            delivered=entries["delivered"],
            llm=None if llm is None else _llm_schedule(llm),
            llm_visual=None if llm_visual is None else list(llm_visual),
            layer_average=entries["layer_average"],
            post_vision=None if post is None else _output_schedule(post),
            llm_mlp_visual=None if llm_mlp_visual is None else list(llm_mlp_visual),
            projector_tokens=projector_tokens, vision_crops=vision_crops,
        )

    def to_dict(self) -> dict:
        """JSON-able, each schedule's `details` beside its own fields."""
        def flat(schedule) -> dict | None:
            if schedule is None:
                return None
            entries = {key: value for key, value in schedule.__dict__.items() if key != "details"}
            return {**entries, **dict(getattr(schedule, "details", {}))}

        return {"method": self.method, "phase": self.phase, "budget": self.budget, "params": dict(self.params),
                "vision": flat(self.vision), "vision_counts": [list(pair) for pair in self.vision_counts],
                "delivered": self.delivered, "llm": flat(self.llm),
                "llm_visual": None if self.llm_visual is None else list(self.llm_visual),
                "layer_average": self.layer_average, "post_vision": flat(self.post_vision),
                "llm_mlp_visual": None if self.llm_mlp_visual is None else list(self.llm_mlp_visual),
                "projector_tokens": self.projector_tokens, "vision_crops": self.vision_crops}


def _llm_schedule(entry: Mapping[str, Any]) -> LLMSchedule:
    fields = ("layers", "discards", "n0", "final", "visual_out")
    return LLMSchedule(layers=list(entry["layers"]), discards=list(entry["discards"]), n0=entry["n0"],
                       final=entry["final"], visual_out=list(entry["visual_out"]),
                       details={key: value for key, value in entry.items() if key not in fields})


def _output_schedule(entry: Mapping[str, Any]) -> OutputSchedule:
    fields = ("site", "tokens_out", "layer", "adaptive", "tokens_min", "tokens_max")
    return OutputSchedule(**{key: entry[key] for key in fields if key in entry},
                          details={key: value for key, value in entry.items() if key not in fields})

"""`ficoco-v-code`: FiCoCo-V as the released repository computes it (methods.md §7, non-normative).

`ficoco-v` follows the paper (spec §3). This method replicates what the authors' code
(`kawhiiiileo/FiCoCo`, `llava/model/multimodal_encoder/FiCoCo_V.py`: `Filter`, `Correlate`,
`Compress`, `merge_ficoco_v`, `find_windows_min_indices`; `clip_encoder.py`: `FiCoCo_Attention`,
`FiCoCo_CLIPEncoderLayer`, `CLIPVisionTower.feature_select`) computes, so that the paper's
released numbers can be told apart from the paper's text. In each reducing CLIP layer, between
the attention residual and the MLP, with T = 1 + N tokens in the order the previous layer left
them (slot 0 first):

filter    L = pre-softmax logits q·k/√d averaged over heads (per image). score_i = 0.35·‖L[0, 1:]‖-normalised
          − 0.65·‖row mean of L[1:, 1:]‖-normalised (the row of slot 0, and attention *given* by each token).
          The window-minimum local penalty runs on the penalty buffer (below); slot 0 is protected
          (score +inf) and the r LOWEST scores are the sources.
correlate K = the largest number of logits above the 0.998-quantile of a source's row (full T-wide row,
          diagonal included); targets = the K largest softmax(L) entries of the source's row, weights =
          those values renormalised to sum to 1.
compress  the kept tokens in ascending score order (slot 0 therefore last); a target index t lands on
          slot t of that array (t − r when t >= T − r) and the self-preserving merge
          (x_slot + Σ w·x_src)/(1 + Σ w) is taken there.

What follows from that, reproduced on purpose:
- Token order. The output is in score order with the protected token last, and the next layer
  protects whatever token is then in slot 0 and uses *its* row as the "CLS" term. So the CLS token
  is protected, and moved to the end, only in the first reducing layer; from the second one on it
  is an ordinary candidate (it can be merged away) and a patch takes its role. LLaVA's feature
  selection drops slot 0 of the layer it reads (layer 22): it drops a patch, and the CLS token
  reaches the projector if it survived. The projector receives exactly that, in that order.
  `last_trace()["vision"][layer]` lists the raster position of every slot after slot 0, in order,
  with -1 for the CLS token.
- Merges land on slots of the score-ordered array chosen by the targets' *previous* indices
  (FiCoCo_V.py `Compress`), so a merge usually lands on another token than its target; a target
  may be the source itself, another source or slot 0.
- The local penalty runs on a buffer of one cell per patch of the grid (the released one is
  1×576, i.e. the 24×24 grid, with its 144 = (24/2)² 2×2 windows hard-coded). Each layer writes
  the unpenalised scores, in slot order, into the cells still finite; takes the minimum of every
  2×2 window (first cell on ties); for each minimum cell p < N, halves score p if it is positive
  and doubles it otherwise (the sign convention is flipped: the lowest scores are discarded) and
  sets cell p to +inf. Cell indices are grid positions but are applied to slot indices, as released.

Deliberate differences from the released code (docs/methods.md repeats them):
- Per image. The released `FiCoCo_Attention` averages the logits over heads *and the batch*
  (`attn_weights.mean(dim=0)` over bsz·heads), so one image's scores decide for every image of a
  batch. Here every image has its own logits, K, targets and penalty buffer; a batch equals each
  image alone.
- Penalty state. The released buffer (`dst_score_global`) is module-level and never reset, so
  every image after the first inherits the previous images' state. Here each image starts from a
  fresh buffer (filled with 1e9, the released initial value) unless `carry_state=True`; then the
  buffer is kept in the object `build` returns (one per applied model, never shared), which needs
  one image per vision-tower call. The released code also updates the buffer in layer 23, whose
  output LLaVA never reads and which the adapter does not run; with the released grid, r = 42 and
  layers 12..22 that update changes nothing (every minimum it could retire, a cell below 114, lies
  in a window that layers 12..15 already retired completely, and the values it writes are
  overwritten by the next image's first write; tested); elsewhere it is skipped.
- Scores are computed in float32 (the released code uses the tower's dtype); ties are broken by
  the lower slot (the released `argsort`/`topk` are not stable).
- The grid is the model's (the 24×24 LLaVA-1.5 grid gives the released 576 cells / 144 windows).

Budget: B maps to r_l = spread(576 − B, n) discards over the released layer range (12..22, the
layers whose reductions reach LLaVA's features; the released `control_encoding_layer = 11` reduces
from block 12). B = 114 is exactly the released configuration (r = 42 in each of the 11 layers;
the released code's own arithmetic 576 − 12·42 = 72 counts layer 23, which LLaVA does not read);
other budgets run the same code with a per-layer r (192 / 128 / 64: 35/34, 41/40, 47/46). The
released `Compress` moves a target index t >= T − r to t − r, which is a valid slot only when
2·r_l <= T_l; a budget whose schedule breaks that somewhere is infeasible
(`ficoco.budget.InfeasibleBudget`, naming the reachable budgets).

Shapes: B = images, T = 1 + N tokens of the current layer (slot 0 first), G = patches of the grid
(cells of the penalty buffer), r = sources, K = targets per source, D = width.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ficoco.budget import InfeasibleBudget, spread
from ficoco.contract import StepShape, VisionLayerStep, VisionScores, VisionTokens
from ficoco.methods.base import Method, Param, non_negative_int, optional_non_negative_int
from ficoco.methods.shared import (TOWER_NEEDS, encoder_plan, patches_for, planned_vision_layers, vision_layers,
                                  vision_rows_macs)
from ficoco.paradigm.compress import gather_tokens

NAME = "ficoco-v-code"
CLS_WEIGHT = 0.35            # FiCoCo_V.py `Filter`: beta, on the CLS (slot-0 row) term; 1 − beta on the patch term
QUANTILE = 0.998             # `Correlate`: torch.quantile(..., 0.998) of each source's logit row
WINDOW = 2                   # `Filter`: sx = sy = 2
UNSET = 1e9                  # the released buffer's initial fill, torch.full((1, 576), 1e9)
CLS_ID = -1                  # `positions` / `last_trace()` entry of the CLS token


# ------------------------------------------------------------------------------------------------
# Filter (FiCoCo_V.py `Filter`, `find_windows_min_indices`)

def code_scores(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, T) head-mean logits -> (B, N) scores of slots 1..N; the lowest are discarded.

    The "CLS" term is the logit row of slot 0 (whatever token is there) over the other slots;
    the patch term is each slot's mean logit over slots 1..N (attention *given*, own column
    included). Each is L2-normalised over the N slots, as released.
    """
    first_row = torch.nn.functional.normalize(logits[:, 0, 1:], p=2, dim=-1)          # (B, N)
    given = torch.nn.functional.normalize(logits[:, 1:, 1:].mean(dim=-1), p=2, dim=-1)  # (B, N)
    return CLS_WEIGHT * first_row - (1 - CLS_WEIGHT) * given


def fresh_buffer(images: int, cells: int, device) -> torch.Tensor:
    """(B, G) a new penalty buffer per image, filled as the released module-level one starts."""
    return torch.full((images, cells), UNSET, dtype=torch.float32, device=device)


def write_scores(buffer: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B, G) the buffer with scores[:, i] written into its i-th finite cell (ascending), for the
    first min(#finite, N) finite cells; other cells keep their values (stale ones included)."""
    finite = buffer != float("inf")                                                     # (B, G)
    rank = finite.long().cumsum(dim=-1) - 1                                             # (B, G) i of a finite cell
    write = finite & (rank < scores.shape[1])
    values = scores.float().gather(1, rank.clamp(0, scores.shape[1] - 1))               # (B, G)
    return torch.where(write, values, buffer)


def window_minima(buffer: torch.Tensor, side: int) -> torch.Tensor:
    """(B, G) True at the minimum cell of every full 2×2 window of the side×side grid (the first
    in row-major order within the window on ties, as `torch.min` returns); cells of a trailing
    odd row or column belong to no window, as in `find_windows_min_indices`."""
    images, wins = buffer.shape[0], side // WINDOW
    grid = buffer.view(images, side, side)[:, :wins * WINDOW, :wins * WINDOW]
    windows = grid.reshape(images, wins, WINDOW, wins, WINDOW).permute(0, 1, 3, 2, 4)   # (B, w, w, 2, 2)
    first = windows.reshape(images, wins, wins, WINDOW * WINDOW).argmin(dim=-1)         # (B, w, w) within-window
    rows = torch.arange(wins, device=buffer.device)[:, None] * WINDOW + first // WINDOW   # (B, w, w)
    cols = torch.arange(wins, device=buffer.device)[None, :] * WINDOW + first % WINDOW
    minima = torch.zeros_like(buffer, dtype=torch.bool)
    return minima.scatter_(1, (rows * side + cols).reshape(images, -1), True)


def penalise(scores: torch.Tensor, minima: torch.Tensor) -> torch.Tensor:
    """(B, N) scores with entry p, for every window-minimum cell p < N, halved if positive and
    doubled otherwise (grid cells used as slot indices, as released)."""
    hit = minima[:, :scores.shape[1]]                                                  # (B, N)
    return torch.where(hit, torch.where(scores > 0, scores / 2, scores * 2), scores)


def retire(buffer: torch.Tensor, minima: torch.Tensor, n: int) -> torch.Tensor:
    """(B, G) the buffer with the window-minimum cells below n set to +inf (never written again)."""
    hit = minima.clone()
    hit[:, n:] = False
    return buffer.masked_fill(hit, float("inf"))


def score_order(scores: torch.Tensor) -> torch.Tensor:
    """(B, N) penalised scores -> (B, T) slots in ascending score order; slot 0 (score +inf) last.
    Ties go to the lower slot."""
    protected = torch.full_like(scores[:, :1], float("inf"))
    return torch.cat([protected, scores], dim=1).argsort(dim=-1, stable=True)


def code_filter(logits: torch.Tensor, buffer: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's filter: (slot order (B, T), the updated penalty buffer (B, G))."""
    scores = code_scores(logits)                                                        # (B, N)
    buffer = write_scores(buffer, scores)
    minima = window_minima(buffer, side)                                                # (B, G)
    return score_order(penalise(scores, minima)), retire(buffer, minima, scores.shape[1])


# ------------------------------------------------------------------------------------------------
# Correlate (FiCoCo_V.py `Correlate`)

def code_targets(logits: torch.Tensor, sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (B, r, K) and merge weights (B, r, K) of the sources (B, r), slot indices into T.

    K_b = the largest count, over image b's sources, of logits strictly above the row's
    0.998-quantile (the whole row: the source itself, slot 0 and other sources included), uniform
    over the layer's sources. Targets are the K_b largest entries of softmax(L) on the source's row
    and the weights those values over their sum. In a batch K = max_b K_b and columns k >= K_b
    carry weight 0.
    """
    rows = logits.gather(1, sources[..., None].expand(-1, -1, logits.shape[-1]))         # (B, r, T)
    threshold = torch.quantile(rows, QUANTILE, dim=-1, keepdim=True)                     # (B, r, 1)
    per_image = (rows > threshold).sum(dim=-1).amax(dim=-1)                              # (B,) K_b
    top, targets = rows.softmax(dim=-1).sort(dim=-1, descending=True, stable=True)
    k = int(per_image.max()) if per_image.numel() else 0
    top, targets = top[..., :k], targets[..., :k]                                        # (B, r, K)
    used = torch.arange(k, device=logits.device) < per_image[:, None, None]              # (B, 1, K)
    top = top * used
    weights = top / top.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(top.dtype).tiny)
    return targets, weights


# ------------------------------------------------------------------------------------------------
# Compress (FiCoCo_V.py `Compress`, `merge_ficoco_v`)

def scatter_merge(x: torch.Tensor, order: torch.Tensor, r: int, targets: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """(B, T − r, D): the kept slots in score order, each source added with its weights at the slots
    its targets' indices name in that array (t, or t − r when t >= T − r), then the self-preserving
    normalisation by 1 + the weights received. Sources contribute their pre-merge values."""
    kept = gather_tokens(x, order[:, r:])                                               # (B, T−r, D)
    if targets.shape[-1] == 0:
        return kept
    images, n_kept, width = kept.shape
    slots = torch.where(targets >= n_kept, targets - r, targets).reshape(images, -1)    # (B, r·K)
    w = weights.to(x.dtype)                                                             # (B, r, K)
    sources = gather_tokens(x, order[:, :r])                                            # (B, r, D)
    incoming = (sources[:, :, None, :] * w[..., None]).reshape(images, -1, width)       # (B, r·K, D)
    total = kept.scatter_add(1, slots[..., None].expand(-1, -1, width), incoming)
    size = torch.ones(images, n_kept, 1, dtype=x.dtype, device=x.device)
    size = size.scatter_add(1, slots[..., None], w.reshape(images, -1, 1))              # (B, T−r, 1)
    return total / size


# ------------------------------------------------------------------------------------------------
# The step

@dataclass
class PenaltyState:
    """What the released code keeps between calls, held per applied model (never module-level):
    the penalty buffer (B, G) and the identity of the token in slot 0 (B,) during a pass."""

    buffer: torch.Tensor | None = None
    first_slot: torch.Tensor | None = None


@dataclass(frozen=True)
class CodeReduce:
    """The released FiCoCo-V step; `discards[layer]` sources per layer (0: the layer is left alone,
    as the released `if rr > 0` does). `state` is this applied model's own."""

    discards: dict[int, int]
    grid_side: int
    carry_state: bool
    state: PenaltyState = field(default_factory=PenaltyState, compare=False, repr=False)

    @property
    def first_layer(self) -> int:
        return min(layer for layer, r in self.discards.items() if r > 0)

    def __call__(self, layer: int, tokens: VisionTokens, scores: VisionScores) -> VisionTokens:
        r = self.discards[layer]
        if r == 0:
            return tokens
        hidden = tokens.hidden                                                           # (B, T, D)
        images, device = hidden.shape[0], hidden.device
        if layer == self.first_layer:                                                    # a new pass begins
            self._start_pass(images, device)
        state = self.state
        logits = scores.logits().float()                                                 # (B, T, T)
        order, state.buffer = code_filter(logits, state.buffer, self.grid_side)          # (B, T), (B, G)
        sources = order[:, :r]                                                           # (B, r)
        targets, weights = code_targets(logits, sources)                                 # (B, r, K) each
        merged = scatter_merge(hidden, order, r, targets, weights)                       # (B, T−r, D)
        ids = torch.cat([state.first_slot[:, None], tokens.positions], dim=1).gather(1, order[:, r:])   # (B, T−r)
        state.first_slot = ids[:, 0]
        key_bias = tokens.key_bias
        if key_bias is not None:                                 # never set by this method (released size: None)
            key_bias = key_bias.gather(1, order[:, r:])
        return VisionTokens(hidden=merged, positions=ids[:, 1:], key_bias=key_bias)

    def overhead(self, dims, shape: StepShape) -> int:
        # the full T×T logit matrix from the layer's q/k (a layer with r = 0 is left alone); the
        # merge is a scatter-add, not a product
        if self.discards[shape.layer] == 0:
            return 0
        return vision_rows_macs(dims, shape.tokens, shape.tokens)

    def _start_pass(self, images: int, device) -> None:
        """Slot 0 holds CLS again; the buffer is fresh per image, or the carried one (one image)."""
        state = self.state
        if self.carry_state and images != 1:
            raise ValueError(self._one_image(images))
        state.first_slot = torch.full((images,), CLS_ID, dtype=torch.long, device=device)
        if self.carry_state and state.buffer is not None:
            state.buffer = state.buffer.to(device)
        else:
            state.buffer = fresh_buffer(images, self.grid_side ** 2, device)

    @staticmethod
    def _one_image(images: int) -> str:
        return (f"{NAME}: carry_state=True replays the released module-level penalty buffer, which images "
                f"update one after another; encode one image per vision-tower call (batch size 1, as the "
                f"released evaluation runs); got {images} images in one call. carry_state=False (the "
                f"default) handles batches")


# ------------------------------------------------------------------------------------------------
# Schedule and build

def boolean(value) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


PARAMS = {
    "start": Param(12, "first reducing CLIP layer (0-based); the released control_encoding_layer = 11 reduces "
                       "from block 12", non_negative_int),
    "end": Param(None, "last reducing CLIP layer, inclusive; None = the last layer LLaVA reads (22; the released "
                       "code also reduces 23, whose output LLaVA does not read)", optional_non_negative_int),
    "carry_state": Param(False, "keep the local-penalty buffer from one image to the next, as the released "
                                "module-level buffer does (per applied model; one image per tower call); False = "
                                "a fresh buffer per image", boolean),
}


def _violation(n_patches: int, patches: int, layers: list[int]) -> tuple[int, int, int] | None:
    """The first (layer, r, T) where spread discards break 2·r <= T (or leave no patch); None if none."""
    if patches < 1:
        return layers[-1], n_patches, n_patches + 1
    tokens = 1 + n_patches
    for layer, r in zip(layers, spread(n_patches - patches, len(layers))):
        if 2 * r > tokens:
            return layer, r, tokens
        tokens -= r
    return None


def schedule(dims, budget, params) -> dict:
    layers = vision_layers(NAME, dims, params["start"], params["end"])
    discards = {}
    if budget is not None:
        patches = patches_for(dims, budget)
        violation = _violation(dims.num_patches, patches, layers)
        if violation:
            smallest = next(b for b in range(1, dims.visual_tokens + 1)
                            if _violation(dims.num_patches, patches_for(dims, b), layers) is None)
            layer, r, tokens = violation
            released = dims.visual_tokens - 42 * len(layers)
            raise InfeasibleBudget(
                f"{NAME}: budget B={budget} is infeasible over the reducing layers {layers[0]}..{layers[-1]} "
                f"({len(layers)} layers): spreading {dims.num_patches - patches} discards gives r={r} at layer "
                f"{layer} with T={tokens} tokens, and the released Compress (a target index t >= T - r moves to "
                f"t - r) needs 2r <= T in every layer. Valid budgets: {smallest}..{dims.visual_tokens}"
                + (f" ({released} = the released r=42 per layer)" if smallest <= released else "")
                + "; an earlier start adds reducing layers")
        discards = dict(zip(layers, spread(dims.num_patches - patches, len(layers))))
    return encoder_plan(dims, discards)


def build(plan: dict) -> tuple:
    layers = planned_vision_layers(plan)
    if not layers:
        return ()
    vision = plan.vision
    reduce = CodeReduce(discards=dict(zip(layers, vision.discards)), grid_side=vision.grid_hw[0],
                        carry_state=plan.params["carry_state"])
    # q/k on demand (the layer output keeps SDPA): the step reads logits, not probabilities
    return (VisionLayerStep(layers=layers, reduce=reduce, tokens_out=dict(zip(layers, vision.patches_out)),
                            overhead=reduce.overhead, attention="keys"),)


METHOD = Method(
    name=NAME,
    summary="FiCoCo-V as the released code computes it (spec §7): logit scores, score order to the projector, "
            "window-minimum penalty, merges scattered by index; B=114 = the released r=42 in blocks 12..22. Per "
            "image (the released batch mean of the logits, which mixes images, is not reproduced); the penalty "
            "buffer is fresh per image unless carry_state=True (then kept per applied model)",
    phase="vision",
    acts_on=("vision",),
    needs=TOWER_NEEDS,
    needs_attention="pre-softmax attention logits (q·k/√d, head mean) of each reducing vision layer, from its "
                    "own q/k (the layer keeps SDPA)",
    stages={
        "filter": "0.35·L2-normalised logit row of slot 0 − 0.65·L2-normalised row-mean logits (attention given); "
                  "window-minimum penalty on a per-image buffer of grid cells (halve if > 0, else double); "
                  "slot 0 protected; lowest r = sources",
        "correlate": "K = max over sources of #logits above the row's 0.998-quantile (full row, diagonal "
                     "included); top-K softmax(logit) entries, renormalised",
        "compress": "kept tokens in ascending score order, slot 0 last; each target index t lands on slot t "
                    "(t − r if t >= T − r) of that array; self-preserving merge there",
    },
    params=PARAMS,
    schedule=schedule,
    build=build,
)

"""The vision tower side of the Qwen2-VL adapter: reductions of whole merge groups inside the tower's blocks
(transformers 5.x `Qwen2VisionTransformerPretrainedModel`, `Qwen2_5_VisionTransformerPretrainedModel`).

The tower runs every image of a call as one sequence of patches (S, D), each block's attention restricted to
each image (`cu_seqlens`) or, in Qwen2.5-VL's windowed blocks, to each window, whose groups the tower has put
next to each other (`window_index`). Each 2×2 merge group is 4 consecutive patches, and the merger makes each
group one LLM token; so a reduction keeps or drops whole groups, and a budget in LLM tokens is a count of them.

What it does, all undone by `remove()`:
- a pre-hook on the tower opens a `QwenTowerPass` with each image's grid and the step planned for it, and a
  post-hook hands it, finished, to the handle;
- Qwen2.5-VL: the tower's `permute_input_for_window_attn` is wrapped to read `window_index` (the original
  group at each position of the tower's sequence);
- a pre-hook on every block records its counts and, once a block reduced, hands it the kept patches' rows of the
  rotary tables and its sequence lengths (`cu_seqlens`, per image or window) recounted over the kept patches,
  once per cutting between two reductions;
- each reducing block gets a replacement forward: its attention with its own weights, explicit (float32
  softmax) per image, the step on each image between the attention residual and the MLP, the MLP on the kept
  patches;
- a forward hook on the merger puts the kept groups' LLM tokens back at their groups' rows, zeros at the
  dropped ones, so the model's image placeholders, M-RoPE positions and per-image split stay those of the
  unreduced image; the LLM drops the dropped ones at the input of decoder layer 0 (`LLMPass.tower_kept`),
  and the kept tokens keep their 3-D positions.

The step sees each image's groups as units (`VisionTokens` with prefix 0): a unit's hidden state is its 4
patches side by side (1, G, 4·D), so a merge is patch by patch; its scores are the patches' pooled to groups
(`group_attention`, `GroupScores`). State lives in a `QwenTowerPass` per tower call; nothing is module-level.
"""
from __future__ import annotations

import inspect
import types
from typing import Callable

import torch

from ficoco.contract import StepShape, VisionLayerStep, VisionTokens
from ficoco.invariants import InvariantViolation
from ficoco.paradigm.attention import attention_probs


class QwenTowerPass:
    """One call of the Qwen vision tower: each image's current groups, the kept patches, per-image counts."""

    def __init__(self, grids: list[list[int]], steps: list[VisionLayerStep | None], merge_size: int,
                 device: torch.device):
        self.grids = grids                                   # per image: its patch grid [rows, cols]
        self.steps = steps                                   # per image: the step planned for it (None: kept whole)
        self.group = merge_size ** 2                         # patches per group (4)
        groups = [rows * cols // self.group for rows, cols in grids]
        self.offsets = [sum(groups[:image]) for image in range(len(grids))]   # first group of each image
        # per image: the raster positions (row·W + col on its grid of groups) of its groups still in the
        # sequence, in the tower's order; (G_i,) int64
        self.units = [torch.arange(count, device=device) for count in groups]
        self.window_index: torch.Tensor | None = None        # Qwen2.5-VL: original group at each tower position
        self.kept: torch.Tensor | None = None                # (S',) rows of the tower's full sequence still in it
        self.full_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None   # the rotary tables of every patch
        self.layer_counts: list[list[list[int]]] = [[] for _ in grids]   # per image: [n_attn, n_mlp] per block
        self.attention_pairs: list[list[int]] = [[] for _ in grids]      # per image: Σ s² per block (s: its
                                                                         # image's or windows' sequence lengths)
        self.step_shapes: list[list[StepShape]] = [[] for _ in grids]    # per image: its step's shapes
        self.trace: dict[int, list[torch.Tensor]] = {}       # reducing block -> per image kept raster positions
        # per sequence cutting the tower hands its blocks (its `cu_seqlens`: the images', or the windows'), while
        # `kept` stays: (that tensor, the block kwargs replacing its own, each image's Σ s²); a reduction clears it
        self.sequences: list[tuple[torch.Tensor, dict, list[int]]] = []

    @property
    def n_images(self) -> int:
        return len(self.grids)

    def order_units(self, window_index: torch.Tensor) -> None:
        """Qwen2.5-VL: the tower reorders each image's groups window by window; `units` follows."""
        self.window_index = window_index
        self.units = [window_index[offset:offset + len(units)] - offset
                      for offset, units in zip(self.offsets, self.units)]

    def kept_raster(self) -> list[torch.Tensor]:
        """Per image, the raster positions of its kept groups, ascending (the order of its LLM tokens)."""
        return [units.sort().values for units in self.units]


def group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, group: int,
                    max_elements: int = 1 << 26) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's attention, explicit (float32 products and softmax), over query rows in chunks of at most
    `max_elements`
    probabilities (a 1,280-token image has 5,120 patches: all its probabilities at once would take gigabytes).

    q, k, v: (H, n, d) -> the output (n, H·d), and the head-mean probabilities pooled to merge groups of
    `group` consecutive patches (G, G): a group attends to another with its patches' mean over the other's
    patches summed, so rows still sum to 1."""
    heads, patches, _ = q.shape
    groups = patches // group
    rows = max(group, max_elements // (heads * patches) // group * group)
    outputs, pooled = [], []
    keys = k.float()[None]                                                         # (1, H, n, d) once, not per chunk
    for start in range(0, patches, rows):
        probs = attention_probs(q[None, :, start:start + rows], keys, scaling)[0]  # (H, c, n) float32
        outputs.append(torch.matmul(probs.to(v.dtype), v))                         # (H, c, d)
        pooled.append(probs.mean(dim=0).view(-1, group, groups, group).sum(dim=3).mean(dim=1))   # (c / group, G)
    return torch.cat(outputs, dim=1).transpose(0, 1).reshape(patches, -1), torch.cat(pooled)


class GroupScores:
    """`VisionScores` of one image at one block, on merge groups: the pooled probabilities of `group_attention`,
    and each group's key, its patches' mean key."""

    def __init__(self, pooled: torch.Tensor, keys: torch.Tensor, group: int):
        heads, patches = keys.shape[0], keys.shape[1]
        self._probs = pooled[None]                                                  # (1, G, G)
        self._keys = keys.view(heads, patches // group, group, -1).mean(dim=2)[None]   # (1, H, G, d)

    def probs(self) -> torch.Tensor:
        return self._probs

    def rows(self, queries: torch.Tensor) -> torch.Tensor:
        return self._probs.gather(1, queries[..., None].expand(-1, -1, self._probs.shape[-1]))

    def keys(self) -> torch.Tensor:
        return self._keys

    def logits(self) -> torch.Tensor:
        raise ValueError("the Qwen tower offers its groups' probabilities and keys, not pre-softmax logits")


class QwenTowerPatch:
    """Installs the hooks and replacement forwards on a Qwen2-VL-family vision tower; `remove()` undoes them."""

    def __init__(self, tower, layers: tuple[int, ...], steps_for: Callable[[list[list[int]]], list],
                 on_pass_end: Callable[[QwenTowerPass], None]):
        self.tower = tower
        self.merge_size = tower.spatial_merge_size
        self.steps_for = steps_for                  # per image grid [rows, cols] -> its step (None: kept whole)
        self.on_pass_end = on_pass_end              # the finished pass, for the prefill that reads its features
        self.current: QwenTowerPass | None = None
        self._handles, self._replaced = [], []
        bad = [layer for layer in layers if not 0 <= layer < len(tower.blocks)]
        if bad:
            raise ValueError(f"vision reduction layers {bad} are outside the tower's {len(tower.blocks)} blocks")
        self._rotary = _rotary_function(tower)
        self._handles.append(tower.register_forward_pre_hook(self._start_pass, with_kwargs=True))
        self._handles.append(tower.register_forward_hook(self._end_pass, always_call=True))
        if hasattr(tower, "fullatt_block_indexes"):                 # Qwen2.5-VL: windows
            permute = getattr(tower, "permute_input_for_window_attn", None)
            if permute is None or "window_index" not in inspect.signature(permute).parameters:
                raise RuntimeError(f"{type(tower).__name__} has no permute_input_for_window_attn(..., window_index, "
                                   f"...): this transformers orders the tower's windows otherwise "
                                   f"(ficoco/models/guard.py)")
            self._replace(tower, "permute_input_for_window_attn", self._reading_window_index(permute))
        for index, block in enumerate(tower.blocks):
            self._handles.append(block.register_forward_pre_hook(self._block_inputs(index), with_kwargs=True))
            if index in layers:
                self._replace(block, "forward", self._reducing_forward(index, block))
        self._handles.append(tower.merger.register_forward_hook(self._scatter_groups))

    def _replace(self, owner, name: str, value) -> None:
        if name in owner.__dict__:
            raise RuntimeError(f"{type(owner).__name__}.{name} is already replaced; is another patch installed?")
        setattr(owner, name, value)
        self._replaced.append((owner, name))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for owner, name in self._replaced:
            delattr(owner, name)
        self._handles, self._replaced, self.current = [], [], None

    # -- the tower call ---------------------------------------------------------------------------
    def _start_pass(self, tower, args, kwargs):
        grids = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        pixels = args[0] if args else kwargs["hidden_states"]
        if any(frames != 1 for frames, _, _ in grids.tolist()):
            raise ValueError(f"grid_thw {grids.tolist()}: a reduction inside the tower runs on images (one temporal "
                             f"patch each); videos are not supported")
        grids = [[rows, cols] for _, rows, cols in grids.tolist()]
        self.current = QwenTowerPass(grids, self.steps_for(grids), self.merge_size, pixels.device)

    def _end_pass(self, tower, args, output):
        tower_pass, self.current = self.current, None
        if tower_pass is not None:
            self.on_pass_end(tower_pass)

    def _reading_window_index(self, permute):
        def wrapper(hidden_states, window_index, *args, **kwargs):
            tower_pass = self.current
            if tower_pass is not None and tower_pass.window_index is None:
                tower_pass.order_units(window_index)
            return permute(hidden_states, window_index, *args, **kwargs)
        return wrapper

    def _block_inputs(self, index: int):
        """Pre-hook of block `index`: the kept patches' rotary rows and sequence lengths, once a block reduced;
        the block's counts per image."""
        def pre_hook(block, args, kwargs):
            tower_pass = self.current
            if tower_pass is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if tower_pass.full_embeddings is None:
                tower_pass.full_embeddings = kwargs["position_embeddings"]
            patches = [len(units) * tower_pass.group for units in tower_pass.units]
            if sum(patches) != hidden.shape[0]:
                raise InvariantViolation(f"vision block {index} runs on {hidden.shape[0]} patches, and the images' "
                                         f"kept groups hold {patches}: the tower's sequence lost track of the kept "
                                         f"patches")
            # the blocks share a few cuttings (the images', the windows'): each is recounted once per reduction
            known = [entry for entry in tower_pass.sequences if entry[0] is kwargs["cu_seqlens"]]
            if not known:
                known = [self._sequences(tower_pass, kwargs, patches)]
                tower_pass.sequences.append(known[0])
            _, replaced, pairs = known[0]
            for image, (count, image_pairs) in enumerate(zip(patches, pairs)):
                tower_pass.layer_counts[image].append([count, count])
                tower_pass.attention_pairs[image].append(image_pairs)
            return args, {**kwargs, **replaced}
        return pre_hook

    @staticmethod
    def _sequences(tower_pass: QwenTowerPass, kwargs: dict, patches: list[int]) -> tuple[torch.Tensor, dict, list[int]]:
        """For the sequences a block's own `cu_seqlens` cuts: the kwargs that replace its own once a block reduced
        (the kept patches' rotary rows, the sequence lengths recounted over them) and each image's Σ s² over its
        sequences."""
        cu_seqlens, replaced = kwargs["cu_seqlens"], {}
        if tower_pass.kept is not None:
            lengths = _kept_lengths(cu_seqlens, tower_pass.kept)
            replaced = {"cu_seqlens": torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(cu_seqlens.dtype),
                        "position_embeddings": tuple(table[tower_pass.kept] for table in tower_pass.full_embeddings)}
            if kwargs.get("max_seqlen") is not None:
                replaced["max_seqlen"] = int(lengths.max())
        cut = replaced.get("cu_seqlens", cu_seqlens)
        ends = torch.tensor(patches, device=cut.device).cumsum(0)
        starts, lengths = cut[:-1], cut[1:] - cut[:-1]
        image_of = torch.searchsorted(ends, starts.to(ends.dtype), right=True)
        pairs = torch.zeros(len(patches), dtype=torch.int64, device=ends.device)
        pairs.index_add_(0, image_of, lengths.to(torch.int64) ** 2)
        return cu_seqlens, replaced, pairs.tolist()

    def _scatter_groups(self, merger, args, output):
        """The kept groups' LLM tokens (G', d) back at their groups' rows of the full sequence (G, d)."""
        tower_pass = self.current
        if tower_pass is None or tower_pass.kept is None:
            return None
        kept_groups = tower_pass.kept[::tower_pass.group] // tower_pass.group
        if output.shape[0] != kept_groups.shape[0]:
            raise InvariantViolation(f"the patch merger made {output.shape[0]} LLM tokens of the "
                                     f"{kept_groups.shape[0]} kept groups")
        full = output.new_zeros(tower_pass.full_embeddings[0].shape[0] // tower_pass.group, output.shape[1])
        return full.index_copy(0, kept_groups, output)

    # -- a reducing block -----------------------------------------------------------------------------
    def _reducing_forward(self, index: int, block):
        """Qwen2VLVisionBlock.forward with the step between the attention residual and the MLP."""
        original = types.MethodType(type(block).forward, block)

        def forward(hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
            tower_pass = self.current
            if tower_pass is None:                                      # the block used outside the tower
                return original(hidden_states, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings,
                                **kwargs)
            if not any(step is not None and index in step.layers for step in tower_pass.steps):
                return original(hidden_states, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings,
                                **kwargs)                              # its images are kept whole: the block as is
            bounds = cu_seqlens.tolist()
            if len(bounds) - 1 != tower_pass.n_images:
                raise InvariantViolation(f"vision block {index} attends within {len(bounds) - 1} sequences, and a "
                                         f"reduction there needs each of the {tower_pass.n_images} images whole")
            attention = block.attn
            length = hidden_states.shape[0]
            q, k, v = attention.qkv(block.norm1(hidden_states)).reshape(length, 3, attention.num_heads, -1) \
                .permute(1, 0, 2, 3).unbind(0)                                         # (S, H, d) each
            q, k = self._rotary(q, k, *position_embeddings)
            outputs, image_scores = [], []
            for start, end in zip(bounds, bounds[1:]):
                q_image, k_image, v_image = (t[start:end].transpose(0, 1) for t in (q, k, v))   # (H, n, d)
                out, pooled = group_attention(q_image, k_image, v_image, attention.scaling, tower_pass.group)
                outputs.append(out)
                image_scores.append(GroupScores(pooled, k_image, tower_pass.group))
            hidden = hidden_states + attention.proj(torch.cat(outputs))               # (S, D) attention residual
            hidden = self._reduce(index, tower_pass, hidden, bounds, image_scores)
            return hidden + block.mlp(block.norm2(hidden))

        return forward

    def _reduce(self, index: int, tower_pass: QwenTowerPass, hidden: torch.Tensor, bounds: list[int],
                image_scores: list[GroupScores]) -> torch.Tensor:
        """Each image's step on its groups; the kept patches' rows, and `tower_pass` moved on to them."""
        width, group = hidden.shape[1], tower_pass.group
        pieces, kept_rows = [], []
        current = torch.arange(hidden.shape[0], device=hidden.device) if tower_pass.kept is None else tower_pass.kept
        for image, (start, end) in enumerate(zip(bounds, bounds[1:])):
            step, units = tower_pass.steps[image], tower_pass.units[image]
            rows = current[start:end]
            if step is None or index not in step.layers:
                pieces.append(hidden[start:end])
                kept_rows.append(rows)
                continue
            tokens = VisionTokens(hidden=hidden[start:end].reshape(1, -1, group * width), positions=units[None],
                                  prefix=0)
            reduced = step.reduce(index, tokens, image_scores[image])
            kept = torch.isin(units, reduced.positions[0]).nonzero()[:, 0]            # kept groups, in order
            if reduced.hidden.shape[1] != step.tokens_out[index] or not torch.equal(units[kept], reduced.positions[0]):
                raise InvariantViolation(f"vision block {index}: the step kept {reduced.hidden.shape[1]} of "
                                         f"{units.shape[0]} groups of image {image}, planned "
                                         f"{step.tokens_out[index]}, in the order they came")
            pieces.append(reduced.hidden[0].reshape(-1, width))                        # (4·T, D)
            kept_rows.append(rows.view(-1, group)[kept].reshape(-1))
            tower_pass.units[image] = units[kept]
            tower_pass.layer_counts[image][-1][1] = kept.shape[0] * group
            tower_pass.step_shapes[image].append(StepShape(index, units.shape[0], kept.shape[0]))
            tower_pass.trace.setdefault(index, [None] * tower_pass.n_images)[image] = units[kept]
        tower_pass.kept = torch.cat(kept_rows)
        tower_pass.sequences = []                  # the later blocks' sequences are recounted over the kept rows
        return torch.cat(pieces)


def _kept_lengths(cu_seqlens: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The lengths of the sequences `cu_seqlens` cuts the full sequence into, counted over the `kept` rows
    (ascending), sequences left empty dropped."""
    sequence = torch.searchsorted(cu_seqlens[1:].to(kept.dtype), kept, right=True)
    lengths = torch.bincount(sequence, minlength=cu_seqlens.shape[0] - 1)
    return lengths[lengths > 0]


def _rotary_function(tower):
    """The modeling module's `apply_rotary_pos_emb_vision(q, k, cos, sin)`, which the tower's attention applies:
    a reducing block applies the same."""
    module = inspect.getmodule(type(tower))
    rotary = getattr(module, "apply_rotary_pos_emb_vision", None)
    if rotary is None or list(inspect.signature(rotary).parameters)[:4] != ["q", "k", "cos", "sin"]:
        raise RuntimeError(f"{module.__name__} has no apply_rotary_pos_emb_vision(q, k, cos, sin): this transformers "
                           f"applies the tower's rotary embedding otherwise (ficoco/models/guard.py)")
    return rotary

"""The Llama decoder side of the LLaVA adapter (transformers 5.23 `LlamaModel`).

Forward pre-hooks on every decoder layer (platform-notes §4.2):
- prefill: count the tokens each layer processes; at a reducing layer, compute the score rows
  from the layer's own q/k, apply the method's step, and drop the removed positions from the
  hidden states; from then on slice the rotary tables, position ids and 4-D mask (query and key
  axes) by the kept positions. Kept tokens keep their original RoPE positions, and the KV cache
  of the reducing layer and every later layer holds only the kept positions.
- decode: slice the key axis of a 4-D mask to the kept prefill positions plus the new tokens.
- a step with `scores_from="previous"` scores from the layer before the reducing one: that
  layer's input (as it ran, after any reduction of its own) is kept for the reducing layer.
- a step with `placement="attention"` reduces inside its layers instead: they get a replacement
  `forward` that runs the layer's own attention in explicit form (a copy of the config on that attention
  module only, naming `float32_eager_attention`, registered under a name of this patch's own in
  transformers' attention registry while it is installed: the probabilities in float32 from the products on,
  spec methods.md §0), applies the step to the residual stream after the attention, drops
  the removed positions and runs the MLP on the kept ones. Calls that do not reduce (decode steps, a prefill
  without an image) run with the attention's own config, so with the model's attention kernel, as every
  method's decode steps do. The step's scores are the probabilities
  that attention computed; the layer's KV cache holds every token it attended to, later layers'
  only the kept ones.
- a static KV cache (ficoco/models/static_decode.py) fills each layer's slots in order, as a dynamic one
  grows, so the same keeps apply; a layer with more slots than the model's mask reaches gets the rest
  masked (`static_slots`), and a decode step reads nothing from the device on the host.

`LLMPass` holds the state of one forward call; the prefill pass is remembered per KV cache object
by the adapter, so decode steps find the positions their cache holds.
"""
from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, StaticLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from ficoco.contract import LLMKept, LLMLayerStep, LLMTokens
from ficoco.models.static_decode import PromptStaticCache
from ficoco.paradigm.attention import attention_probs, head_mean_probs, reduce_heads, require


class LLMPass:
    """The LLM part of one forward call.

    Prefill: `visual` (B, N) and `instruction` (list of (M_r,) per row) are positions in the
    current (possibly reduced) sequence; `keep` (B, L') maps current positions to input positions
    (None while nothing was dropped); `valid` (B, L') marks non-padding.
    Decode: `keep_at` (per reducing layer) and `full_len` come from the prefill that filled the cache.
    """

    def __init__(self, prefill: bool, full_len: int, valid: torch.Tensor | None, visual: torch.Tensor | None,
                 instruction: list[torch.Tensor] | None, reduce: bool, step: LLMLayerStep | None = None):
        self.prefill = prefill
        self.step = step                              # the step this prefill runs (None when it does not reduce):
                                                      # LLaVA-NeXT plans one per image span
        self.full_len = full_len
        self.valid = valid
        self.visual = visual
        self.instruction = instruction
        self.input_positions = (visual, instruction)  # image / instruction positions in the LLM input
        # batch rows grouped by instruction length (host lists, device tensors), made while the device is idle
        self.row_groups = _rows_by_instruction_length(instruction) if instruction else []
        self.inputs: torch.Tensor | None = None       # (B, L, D) LLM input embeddings, for steps with needs_inputs
        self.reduce = reduce
        self.keep: torch.Tensor | None = None
        self.keep_at: dict[int, torch.Tensor] = {}    # layer -> the keep its cache and every later one's hold (the
                                                      # reducing layer, or the next one after an in-layer reduction)
        self.layer_lengths: list[int] = []            # sequence length each layer processed (padding included)
        self.layer_dropped: list[int] = []            # visual tokens dropped before each layer ran (cumulative)
        self.mlp_dropped: dict[int, int] = {}         # layer -> visual tokens dropped before its MLP (cumulative),
                                                      # where a reduction fell between its attention and MLP
        self.dropped = 0
        self.trace: dict[int, torch.Tensor] = {}      # reducing layer -> kept visual input positions (B, N_l)
        self.step_shapes: list[tuple[int, int, int, int, list[int], bool]] = []   # per reducing layer run:
                                                      # (layer, length L with padding, visual N, kept, M per
                                                      # row, keys read from a KV cache)
        self.previous_input: tuple | None = None      # (layer, hidden, cos, sin, valid) for scores_from="previous"
        self.awaits_tower_kept = False                # a reduction inside the tower keeps visual tokens, dropped at
        self.tower_kept: torch.Tensor | None = None   # the input of layer 0: these (B, T) indices into the visual
                                                      # axis (its placeholders of dropped ones hold no feature)
        self._sliced: dict[str, object] = {}          # kwargs sliced for the current keep
        self._decode_index: dict[tuple[int, int], torch.Tensor] = {}

    def decode_view(self) -> "LLMPass":
        """The state a decode step needs from this prefill."""
        decode = LLMPass(False, self.full_len, None, None, None, False)
        decode.keep, decode.keep_at = self.keep, self.keep_at
        return decode

    def decode_key_index(self, layer: int, mask_length: int) -> torch.Tensor | None:
        """Key columns of a decode step's 4-D mask that layer `layer`'s cache holds (None: all of them).

        The mask is laid out like layer 0's cache: the full prompt, or layer 0's kept positions when
        layer 0 reduces. Each layer's cache holds the positions of the last keep registered at or
        before it (`keep_at`), then the generated tokens.
        """
        reductions = [reduced for reduced in self.keep_at if reduced <= layer]
        if not reductions or max(reductions) == 0:
            return None
        last = max(reductions)
        key = (last, mask_length)
        if key not in self._decode_index:
            keep, base = self.keep_at[last], self.keep_at.get(0)
            if base is not None:
                keep, base_length = torch.searchsorted(base, keep), base.shape[1]
            else:
                base_length = self.full_len
            new = torch.arange(base_length, mask_length, device=keep.device).expand(keep.shape[0], -1)
            self._decode_index = {key: torch.cat([keep, new], dim=1)}
        return self._decode_index[key]


class LlamaScores:
    """`LLMScores` of one decoder layer, computed from its own input layer norm, q/k and RoPE, each part on
    first use; the keys are read from the layer's KV cache instead when it already ran (`cached_keys`)."""

    def __init__(self, layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 valid: torch.Tensor | None, norm=None, cached_keys: torch.Tensor | None = None):
        self.layer, self.hidden, self.valid, self.norm = layer, hidden, valid, norm   # hidden (B, L, D)
        batch = hidden.shape[0]
        self.cos, self.sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)   # (B, L, d)
        self._keys = cached_keys                                                    # (B, H_kv, L, d) or None
        self._normed_input: torch.Tensor | None = None

    def _normed(self) -> torch.Tensor:
        """(B, L, D) the layer's input layer norm of its input (what its q/k projections read)."""
        if self._normed_input is None:
            self._normed_input = self.layer.input_layernorm(self.hidden)
        return self._normed_input

    def keys(self) -> torch.Tensor:
        """(B, H_kv, L, d) post-RoPE keys of the layer's input, as its KV cache holds them."""
        if self._keys is None:
            attn = self.layer.self_attn
            batch, length, _ = self.hidden.shape
            k = attn.k_proj(self._normed()).view(batch, length, -1, attn.head_dim)
            self._keys = _rope(k.transpose(1, 2), self.cos, self.sin)
        return self._keys

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The language model's final norm applied to `hidden` (B, N, D)."""
        if self.norm is None:
            raise ValueError("final_norm is unavailable: these scores were built without the model's final norm")
        return self.norm(hidden)

    def rows(self, queries: torch.Tensor, keys: torch.Tensor | None = None, heads: str = "mean") -> torch.Tensor:
        attn = self.layer.self_attn
        batch, length, _ = self.hidden.shape
        n_rows, head_dim = queries.shape[1], attn.head_dim
        normed = self._normed()                                                               # (B, L, D)
        query_in = normed.gather(1, queries[..., None].expand(-1, -1, normed.shape[-1]))    # (B, R, D)
        q = attn.q_proj(query_in).view(batch, n_rows, -1, head_dim).transpose(1, 2)         # (B, H, R, d)
        rows_index = queries[..., None].expand(-1, -1, head_dim)
        q = _rope(q, self.cos.gather(1, rows_index), self.sin.gather(1, rows_index))
        k = self.keys()                                                                      # (B, H_kv, L, d)
        key_pos = torch.arange(length, device=queries.device)
        allowed = key_pos[None, None, :] <= queries[:, :, None]                             # (B, R, L) causal
        if self.valid is not None:
            allowed = allowed & self.valid[:, None, :]                                      # padding keys
        additive = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
        additive = additive.masked_fill(~allowed, float("-inf"))[:, None]                  # (B, 1, R, L)
        probs = head_mean_probs(q, k, attn.scaling, additive, heads)                        # (B, R, L)
        if keys is None:
            return probs
        return probs.gather(2, keys[:, None, :].expand(-1, n_rows, -1))                     # (B, R, K)


class LayerProbabilities:
    """`LLMScores` of a reduction between a layer's attention and its MLP, for the batch rows `batch_rows`:
    the probabilities (B, H, L, L) that attention computed (causal and padding masks included), reduced
    over heads on first use into `reduced` (heads -> (B, L, L)), which every row group of the layer
    shares; nothing is recomputed."""

    def __init__(self, probs: torch.Tensor, batch_rows: torch.Tensor, reduced: dict, norm):
        self.probs, self.batch_rows, self.reduced, self.norm = probs, batch_rows, reduced, norm

    def rows(self, queries: torch.Tensor, keys: torch.Tensor | None = None, heads: str = "mean") -> torch.Tensor:
        if heads not in self.reduced:
            self.reduced[heads] = reduce_heads(self.probs.float(), heads)                    # (B, L, L)
        reduced = self.reduced[heads][self.batch_rows]                                       # (b, L, L)
        length = reduced.shape[-1]
        rows = reduced.gather(1, queries[..., None].expand(-1, -1, length))                  # (B, R, L)
        if keys is None:
            return rows
        return rows.gather(2, keys[:, None, :].expand(-1, queries.shape[1], -1))             # (B, R, K)

    def keys(self) -> torch.Tensor:
        raise ValueError("a reduction between attention and MLP reads the layer's probabilities only; a step that "
                         "needs the keys must use placement='input'")

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, H, N, d) with cos/sin (B, N, d), as the Llama attention applies it."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


class LlamaPatch:
    """Pre-hooks on every decoder layer of a `LlamaModel`; `remove()` undoes them.

    `step` fixes which layers reduce and where (its layers and placement); each prefill runs the step
    its `LLMPass` carries: this one, or on LLaVA-NeXT one planned for its image span, on the same layers."""

    def __init__(self, language_model, step: LLMLayerStep | None, current_pass):
        self.layers = language_model.layers
        self.norm = language_model.norm
        self.current_pass = current_pass                  # () -> LLMPass | None
        reducing = tuple(step.layers) if step else ()
        bad = [layer for layer in reducing if not 0 <= layer < len(self.layers)]
        if bad:
            raise ValueError(f"LLM reduction layers {bad} are outside the {len(self.layers)} decoder layers")
        in_layer = step is not None and step.placement == "attention"
        self.reducing = frozenset(() if in_layer else reducing)            # reduce at the layer input
        self.reducing_in_layer = frozenset(reducing if in_layer else ())   # reduce between attention and MLP
        self._handles = [layer.register_forward_pre_hook(self._hook(index), with_kwargs=True)
                         for index, layer in enumerate(self.layers)]
        self._replaced = []
        self._attention_name = f"ficoco-float32-eager-{id(self)}" if self.reducing_in_layer else None
        if self._attention_name:
            ALL_ATTENTION_FUNCTIONS[self._attention_name] = float32_eager_attention   # removed with the patch
        for index in sorted(self.reducing_in_layer):
            layer = self.layers[index]
            if "forward" in layer.__dict__:
                raise RuntimeError(f"decoder layer {index} already has an instance forward; is another patch installed?")
            attention = layer.self_attn
            explicit = copy.copy(attention.config)                         # probabilities for this layer only
            explicit._attn_implementation = self._attention_name
            self._replaced.append((layer, attention.config))
            layer.forward = self._in_layer_forward(index, layer, attention.config)
            attention.config = explicit

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for layer, config in self._replaced:
            del layer.forward
            layer.self_attn.config = config
        if self._attention_name in ALL_ATTENTION_FUNCTIONS:
            del ALL_ATTENTION_FUNCTIONS[self._attention_name]
        self._handles, self._replaced = [], []

    def _hook(self, index: int):
        def pre_hook(layer, args, kwargs):
            llm_pass = self.current_pass()
            if llm_pass is None:
                return None
            if llm_pass.prefill:
                return self._prefill(index, layer, args, kwargs, llm_pass)
            mask = kwargs.get("attention_mask")
            if not (isinstance(mask, torch.Tensor) and mask.dim() == 4):       # no mask: SDPA is_causal
                return None
            key_index = llm_pass.decode_key_index(index, mask.shape[-1])
            if key_index is None:
                return None
            mask = _gather_seq(mask, key_index, 3)
            slots = static_slots(cache_of(kwargs), index, 1)
            if slots is not None:        # a static layer attends over all its slots: those it never filled are masked
                mask = _masked_to(mask, slots)
            return args, {**kwargs, "attention_mask": mask}
        return pre_hook

    # -- prefill --------------------------------------------------------------------------------
    def _prefill(self, index, layer, args, kwargs, llm_pass: LLMPass):
        hidden = args[0] if args else kwargs["hidden_states"]
        if index == 0 and llm_pass.reduce and llm_pass.step.needs_inputs:
            llm_pass.inputs = hidden                       # the embeddings, before any reduction
        if index == 0 and llm_pass.awaits_tower_kept:     # a reduction inside the tower chose the kept tokens
            if llm_pass.tower_kept is None:
                raise RuntimeError("the vision tower reduced this prefill's images, and which tokens it kept never "
                                   "reached the LLM: the tower's hooks did not run (an untested transformers?)")
            hidden = self._keep(0, hidden, llm_pass, llm_pass.visual.gather(1, llm_pass.tower_kept), keep_from=0)
        if llm_pass.reduce and index in self.reducing:
            cos, sin = _sliced_kwargs(kwargs, llm_pass)["position_embeddings"]
            scores_for, keys_cached = self._input_scores(index, layer, hidden, cos, sin, llm_pass, cache_of(kwargs))
            hidden = self._reduce(index, hidden, llm_pass, scores_for, keep_from=index, keys_cached=keys_cached)
        if llm_pass.reduce and llm_pass.step.scores_from == "previous" and index + 1 in self.reducing:
            cos, sin = _sliced_kwargs(kwargs, llm_pass)["position_embeddings"]
            llm_pass.previous_input = (layer, hidden, cos, sin, llm_pass.valid)
        llm_pass.layer_lengths.append(hidden.shape[1])
        llm_pass.layer_dropped.append(llm_pass.dropped)
        if llm_pass.keep is None:                          # nothing dropped yet: the layer runs as is
            return None
        kwargs = {**kwargs, **_sliced_kwargs(kwargs, llm_pass)}
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _input_scores(self, index: int, layer, hidden, cos, sin, llm_pass: LLMPass, cache):
        """`scores_for(rows)` of a reduction at the input of layer `index`: its q/k on `hidden`, or those of
        the layer before it (`scores_from="previous"`), in the same positions; and whether the keys come
        from that previous layer's KV cache (it ran on exactly these positions), so none are projected."""
        score_layer, score_hidden, score_valid = layer, hidden, llm_pass.valid
        cached = None
        if llm_pass.step.scores_from == "previous":
            score_layer, score_hidden, cos, sin, score_valid = llm_pass.previous_input
            llm_pass.previous_input = None
            cached = _prefill_keys(cache, index - 1, score_hidden.shape[:2])

        def scores_for(rows: torch.Tensor) -> LlamaScores:
            valid = None if score_valid is None else score_valid[rows]
            return LlamaScores(score_layer, score_hidden[rows], _rows_of(cos, rows), _rows_of(sin, rows), valid,
                               norm=self.norm, cached_keys=None if cached is None else cached[rows])
        return scores_for, cached is not None

    def _in_layer_forward(self, index: int, layer, own_config):
        """LlamaDecoderLayer.forward with the step between the attention residual and the MLP (`own_config`: the
        attention's config as the model built it, for the calls that do not reduce)."""
        original = type(layer).forward

        def forward(hidden_states, *args, **kwargs):
            if args:
                raise TypeError(f"decoder layer {index}: expected the hidden states as the only positional argument")
            llm_pass = self.current_pass()
            if llm_pass is None or not llm_pass.prefill or not llm_pass.reduce:
                # decode steps (and prefills that reduce nothing) run the model's own attention, as every method's
                # do: the explicit float32 form is for the reducing prefill's probabilities only
                explicit = layer.self_attn.config
                layer.self_attn.config = own_config
                try:
                    return original(layer, hidden_states, **kwargs)
                finally:
                    layer.self_attn.config = explicit
            # the model built its mask for SDPA (None = causal, or booleans); this call runs eager attention
            cache = cache_of(kwargs)
            past = cache.get_seq_length(index) if cache is not None else 0       # entries before this call
            kwargs = {**kwargs, "attention_mask": _eager_mask(kwargs.get("attention_mask"), hidden_states, past,
                                                              static_slots(cache, index, hidden_states.shape[1]))}
            attention_out, probs = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
            if probs is None:
                raise RuntimeError(f"decoder layer {index}'s attention returned no probabilities; the in-layer "
                                   f"reduction needs its eager attention")
            hidden = hidden_states + attention_out                         # (B, L, D) the attention residual
            reduced: dict = {}                                             # once per layer, for every row group
            hidden = self._reduce(index, hidden, llm_pass,
                                  lambda rows: LayerProbabilities(probs, rows, reduced, self.norm), keep_from=index + 1)
            llm_pass.mlp_dropped[index] = llm_pass.dropped
            return hidden + layer.mlp(layer.post_attention_layernorm(hidden))   # (B, L', D)

        return forward

    def _reduce(self, index, hidden, llm_pass: LLMPass, scores_for, keep_from: int,
                keys_cached: bool = False) -> torch.Tensor:
        """Apply the step at layer `index` with the scores `scores_for(rows)` of each group of batch rows,
        then drop the removed positions; the caches of layers >= `keep_from` hold only the kept ones.
        `keys_cached`: the scores read their keys from a KV cache (recorded for the overhead).
        Returns (B, L', D)."""
        batch, length = hidden.shape[:2]
        kept_hidden = torch.empty_like(hidden)
        kept_visual = None
        for row_list, rows in llm_pass.row_groups:
            tokens = LLMTokens(hidden=hidden[rows], visual=llm_pass.visual[rows],
                               instruction=torch.stack([llm_pass.instruction[r] for r in row_list]),
                               **(_input_embeddings(llm_pass, row_list, rows) if llm_pass.step.needs_inputs else {}))
            kept: LLMKept = llm_pass.step.reduce(index, tokens, scores_for(rows))
            planned = llm_pass.step.tokens_out[index]           # None: the reduce chose the count
            if kept_visual is None:
                kept_visual = llm_pass.visual.new_empty(batch, kept.visual.shape[1] if planned is None else planned)
            if kept.visual.shape[1] != kept_visual.shape[1]:
                raise ValueError(f"LLM layer {index}: the reduction kept {kept.visual.shape[1]} visual tokens in rows "
                                 f"{row_list} and {kept_visual.shape[1]} in others; "
                                 + ("it must keep the planned count" if planned is not None else
                                    "a reduction that chooses its count runs one prompt at a time"))
            kept_hidden[rows], kept_visual[rows] = kept.hidden, kept.visual
        llm_pass.step_shapes.append((index, length, llm_pass.visual.shape[1], kept_visual.shape[1],
                                     [positions.shape[0] for positions in llm_pass.instruction], keys_cached))
        return self._keep(index, kept_hidden, llm_pass, kept_visual, keep_from)

    @staticmethod
    def _keep(index, hidden, llm_pass: LLMPass, kept_visual: torch.Tensor, keep_from: int) -> torch.Tensor:
        """Drop the visual positions of `hidden` (B, L, D) not in `kept_visual` (B, T), positions into the current
        sequence; the caches of layers >= `keep_from` hold only the kept ones. Returns (B, L', D)."""
        batch, length, width = hidden.shape
        n_dropped = llm_pass.visual.shape[1] - kept_visual.shape[1]              # the same in every row
        dropped = torch.zeros(batch, length, dtype=torch.uint8, device=hidden.device)
        dropped.scatter_(1, llm_pass.visual, 1).scatter_(1, kept_visual, 0)
        require((dropped.sum(dim=1) == n_dropped).all(),
                f"LLM layer {index}: the reduction kept positions that are not distinct visual positions", RuntimeError)
        # a stable sort puts every row's kept positions (0) first, ascending: no count read on the host
        keep_local = torch.argsort(dropped, dim=1, stable=True)[:, :length - n_dropped].contiguous()   # (B, L')
        hidden = hidden.gather(1, keep_local[..., None].expand(-1, -1, width))
        # re-index the pass state to the shorter sequence
        llm_pass.visual = torch.searchsorted(keep_local, kept_visual)
        llm_pass.instruction = [torch.searchsorted(keep_local[r], positions)
                                for r, positions in enumerate(llm_pass.instruction)]
        if llm_pass.valid is not None:
            llm_pass.valid = llm_pass.valid.gather(1, keep_local)
        llm_pass.keep = keep_local if llm_pass.keep is None else llm_pass.keep.gather(1, keep_local)
        llm_pass.keep_at[keep_from] = llm_pass.keep
        llm_pass.dropped += n_dropped
        llm_pass.trace[index] = llm_pass.keep.gather(1, llm_pass.visual)
        llm_pass._sliced = {}
        return hidden


def cache_of(kwargs: dict) -> Cache | None:
    """The KV cache of a forward call (the multimodal model's or a decoder layer's), found by its type
    rather than its keyword.

    transformers 5.23 passes it as `past_key_values`, 5.24 as `cache`; a lookup by name took every
    decode step for a prefill under 5.24 and recorded the last decode step's counts.
    """
    caches = [value for value in kwargs.values() if isinstance(value, Cache)]
    if len(caches) > 1:
        raise RuntimeError(f"{len(caches)} KV cache objects in one forward call; expected at most one")
    return caches[0] if caches else None


def static_slots(cache: Cache | None, layer: int, queries: int) -> int | None:
    """The keys layer `layer`'s attention reads in a call of `queries` tokens when its KV cache is a static one
    (`StaticLayer`: a buffer for the prompt and every new token, read whole), else None.

    A static layer writes each call's keys after those it holds, so a layer whose prefill kept L_l tokens holds them
    in its first L_l slots and the t-th new token in slot L_l + t, as a dynamic cache does; the model's masks are
    laid out like layer 0's slots, and where a layer has more slots than that layout reaches, the rest are masked."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer >= len(layers) or not isinstance(layers[layer], StaticLayer):
        return None
    return layers[layer].get_mask_sizes(queries)[0]


def _masked_to(mask: torch.Tensor, length: int) -> torch.Tensor:
    """A 4-D mask (B, 1, Q, K) extended to `length` key columns that no query may attend."""
    missing = length - mask.shape[-1]
    if missing < 0:
        raise RuntimeError(f"a mask over {mask.shape[-1]} keys for a static cache layer of {length} slots")
    if missing == 0:                  # a layer sized to its own tokens (`PromptSizedLayer`): nothing to add
        return mask
    fill = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    return torch.cat([mask, mask.new_full((*mask.shape[:-1], missing), fill)], dim=-1)


def holds_tokens(cache: Cache) -> bool:
    """Whether a KV cache already holds tokens (a forward call on it is a decode step). A cache that knows it on
    the host (`static_decode.PromptStaticCache`) says so without a device read, which a captured decode step
    may not make; any other is asked its length (a static cache's is a device value: one read)."""
    if isinstance(cache, PromptStaticCache):
        return cache.holds_prompt
    return bool(cache.get_seq_length() != 0)


def _prefill_keys(cache: Cache | None, layer: int, batch_and_length: tuple[int, int]) -> torch.Tensor | None:
    """(B, H_kv, L, d) the keys layer `layer` stored in this prefill's cache, when the cache holds exactly
    this prefill's B × L positions (a dynamic cache filled by this call alone, or the first L slots of a static
    one, which a prefill finds empty); else None (recompute)."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer >= len(layers):
        return None
    keys = getattr(layers[layer], "keys", None)
    batch, length = batch_and_length
    if isinstance(layers[layer], StaticLayer) and isinstance(keys, torch.Tensor) and keys.dim() == 4:
        keys = keys[:, :, :length]           # a prefill on an empty static cache wrote its first slots
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.shape[0] != batch or keys.shape[2] != length:
        return None
    return keys


def float32_eager_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """transformers' eager attention (the attention interface's signature) with the probabilities in float32 from
    the q·k products on, as spec methods.md §0 wants A, and returned in float32; the output in the model's dtype.
    query (B, H, Q, d), key / value (B, H_kv, K, d) -> output (B, Q, H, d), probabilities (B, H, Q, K)."""
    probs = attention_probs(query, key, scaling, attention_mask)                             # (B, H, Q, K)
    value = repeat_kv(value, module.num_key_value_groups)
    output = torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous()         # (B, Q, H, d)
    return output, probs


def _eager_mask(mask, hidden: torch.Tensor, past: int, slots: int | None = None) -> torch.Tensor | None:
    """The additive float mask (B|1, 1, Q, K) eager attention adds to its logits, from the mask the model built
    for SDPA: None (causal), a boolean 4-D mask (True = may attend) or an additive one. K = past + Q, or a
    static cache layer's `slots` (`static_slots`), the ones beyond past + Q masked."""
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        return mask
    lowest = torch.finfo(hidden.dtype).min
    if mask is None:
        queries = hidden.shape[1]
        if queries == 1 and slots is None:                     # one new token sees the whole cache
            return None
        keys = torch.arange(past + queries, device=hidden.device)
        mask = keys[None, :] <= (past + torch.arange(queries, device=hidden.device))[:, None]   # (Q, K) causal
        mask = mask[None, None]
        if slots is not None:
            mask = _masked_to(mask, slots)
    zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
    return torch.where(mask, zero, torch.full((), lowest, dtype=hidden.dtype, device=hidden.device))


def _input_embeddings(llm_pass: LLMPass, row_list: list[int], rows: torch.Tensor) -> dict:
    """LLMTokens.input_visual / input_instruction of batch rows `rows` (`row_list` on the host), from the LLM
    input embeddings."""
    inputs, (visual, instruction) = llm_pass.inputs[rows], llm_pass.input_positions
    instruction = torch.stack([instruction[r] for r in row_list])
    width = inputs.shape[-1]
    return {"input_visual": inputs.gather(1, visual[rows, :, None].expand(-1, -1, width)),
            "input_instruction": inputs.gather(1, instruction[..., None].expand(-1, -1, width))}


def _rows_of(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of a (B or 1, L, d) rotary table."""
    return table if table.shape[0] == 1 else table[rows]


def _rows_by_instruction_length(instruction: list[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """Batch rows grouped by instruction length M, so each group is a rectangular sub-batch: each group's rows
    on the host and on the device."""
    groups: dict[int, list[int]] = {}
    for row, positions in enumerate(instruction):
        groups.setdefault(positions.shape[0], []).append(row)
    device = instruction[0].device
    return [(rows, torch.tensor(rows, device=device)) for rows in groups.values()]


def _gather_seq(tensor: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """tensor[b, ..., keep[b], ...] along `dim` (batch first; a batch of 1 is broadcast)."""
    batch, kept = keep.shape
    tensor = tensor.expand(batch, *tensor.shape[1:])
    view = [batch] + [1] * (tensor.dim() - 1)
    view[dim] = kept
    size = list(tensor.shape)
    size[dim] = kept
    return tensor.gather(dim, keep.view(view).expand(size))


def _sliced_kwargs(kwargs: dict, llm_pass: LLMPass) -> dict:
    """position_embeddings, position_ids and attention_mask restricted to the kept positions.

    The decoder passes the same full-length tensors to every layer; they are sliced once per keep.
    """
    if llm_pass.keep is None:
        return {"position_embeddings": kwargs["position_embeddings"]}
    if not llm_pass._sliced:
        keep = llm_pass.keep
        cos, sin = kwargs["position_embeddings"]                                   # (B|1, L, d) each
        if cos.dim() != 3 or cos.shape[1] != llm_pass.full_len:    # e.g. M-RoPE tables left unmerged (3, B, L, d)
            raise RuntimeError(f"the decoder layers' rotary tables have shape {tuple(cos.shape)}; the adapter slices "
                               f"kept positions out of (B|1, L={llm_pass.full_len}, head_dim) tables: this "
                               f"transformers version builds them otherwise (ficoco/models/guard.py)")
        sliced = {"position_embeddings": (_gather_seq(cos, keep, 1), _gather_seq(sin, keep, 1))}
        if kwargs.get("position_ids") is not None:
            sliced["position_ids"] = _gather_seq(kwargs["position_ids"], keep, 1)  # (B, L')
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:                     # (B, 1, L, L)
            sliced["attention_mask"] = _gather_seq(_gather_seq(mask, keep, 2), keep, 3)
        llm_pass._sliced = sliced
    return llm_pass._sliced

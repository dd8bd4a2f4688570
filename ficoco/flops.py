"""Cost accounting: exact per-sample MACs/FLOPs, the literature's conventions, weights and KV cache.

Normative source: spec `flops.md`. Everything here is integer arithmetic on `ModelDims` and the
§2 token-count record (docs/contracts.md); no torch, no model.

Units. A MAC is one multiply plus one add; **FLOPs = 2 · MACs** (flops.md §1). Every quantity in
`sample_cost` is given both ways (`*_macs`, `*_flops`). Element-wise work (norms, activations,
softmax, RoPE, residual adds) is left out, as in every convention below.

Notation in the formulas: n = tokens a layer processes, d = hidden size, m = FFN width,
h = attention heads, h_kv = key/value heads, V = vocabulary size, p = patch size.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from types import MappingProxyType
from typing import Sequence

from ficoco.budget import InfeasibleBudget
from ficoco.budget_labels import TFLOPS_CONVENTIONS, ImageTokens, TflopsTarget, image_tokens
from ficoco.contract import Plan
from ficoco.dims import ModelDims, dims_from_config, image_plan, llava_1_5_dims, llava_next_dims, unreduced_plan
from ficoco.qwen_dims import QwenVLDims, qwen_image_plan, qwen_refusal, qwen_vl_dims

# Bytes per stored value for weights and the KV cache. Read-only so no module state can change.
BYTES_PER_VALUE = MappingProxyType({
    "float32": 4.0, "fp32": 4.0,
    "float16": 2.0, "fp16": 2.0, "bfloat16": 2.0, "bf16": 2.0,
    "int8": 1.0,
    "int4": 0.5,
})

# The text length FiCoCo's TFLOPs labels assume for LLaVA-1.5-7B (flops.md §6.1, v4 App. Table 10).
NOMINAL_TEXT_TOKENS = 60

SHAPES = ("llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "llava-next-13b", "qwen2-vl-7b", "qwen2.5-vl-7b")


def bytes_per_value(dtype: str) -> float:
    """Storage width of one value: float32 4, float16/bfloat16 2, int8 1, int4 0.5."""
    if dtype not in BYTES_PER_VALUE:
        raise ValueError(f"dtype={dtype!r}: valid choices are {sorted(BYTES_PER_VALUE)}")
    return BYTES_PER_VALUE[dtype]


# ------------------------------------------------------------------------------------------------
# Per-layer formulas (flops.md §3), in MACs


def kv_width(dims: ModelDims) -> int:
    """Width of the K (or V) projection output: head_dim · h_kv (= d for multi-head attention)."""
    return dims.llm_hidden // dims.llm_heads * dims.llm_kv_heads


def patch_embedding_macs(dims: ModelDims, patches: int | None = None) -> int:
    """Patch embedding conv: patches · (3 · p · p) · d_v (576 · 588 · 1024 ≈ 0.35 GMAC for LLaVA-1.5)."""
    patches = dims.num_patches if patches is None else patches
    return patches * (3 * dims.patch_size * dims.patch_size) * dims.vision_hidden


def clip_layer_macs(dims: ModelDims, n_attn: int, n_mlp: int | None = None) -> int:
    """One CLIP encoder layer: 4·n_in·d² + 2·n_in²·d + 2·n_out·d·m.

    n_in = n_attn (tokens the attention ran on), n_out = n_mlp (tokens the MLP ran on; = n_in for
    a layer that does not reduce between attention and MLP).
    """
    n_in, n_out = n_attn, (n_attn if n_mlp is None else n_mlp)
    d, m = dims.vision_hidden, dims.vision_mlp
    attention_projections = 4 * n_in * d * d        # Q, K, V, O
    attention_scores = 2 * n_in * n_in * d          # QKᵀ and A·V over the full n×n matrix
    mlp = 2 * n_out * d * m                         # fc1 and fc2 (GELU MLP, 2 matrices)
    return attention_projections + attention_scores + mlp


def projector_macs(dims: ModelDims, visual_tokens: int) -> int:
    """LLaVA's 2-layer projector: n_vis · (d_v·d_p + d_p·d)."""
    first = dims.vision_hidden * dims.projector_hidden
    second = dims.projector_hidden * dims.llm_hidden
    return visual_tokens * (first + second)


def llama_layer_macs(dims: ModelDims, n: int, n_mlp: int | None = None) -> int:
    """One LLaMA decoder layer in prefill, GQA-aware: (2 + 2·h_kv/h)·n·d² + 2·n²·d + 3·n_mlp·d·m, with
    n tokens in the attention and n_mlp (default n) in the MLP (fewer after an in-layer reduction).

    For multi-head attention (Vicuna) and n_mlp = n this is 4·n·d² + 2·n²·d + 3·n·d·m.
    """
    d, m = dims.llm_hidden, dims.llm_mlp
    n_mlp = n if n_mlp is None else n_mlp
    q_and_o = 2 * n * d * d
    k_and_v = 2 * n * d * kv_width(dims)
    attention_scores = 2 * n * n * d                # QKᵀ and A·V, every query head
    mlp = 3 * n_mlp * d * m                         # gate, up and down (SwiGLU, 3 matrices)
    return q_and_o + k_and_v + attention_scores + mlp


def llama_decode_layer_macs(dims: ModelDims, kv_length: int) -> int:
    """One decoder layer for one new token with a cache of kv_length entries (the new one included):
    (2 + 2·h_kv/h)·d² + 2·kv·d + 3·d·m."""
    d, m = dims.llm_hidden, dims.llm_mlp
    return 2 * d * d + 2 * d * kv_width(dims) + 2 * kv_length * d + 3 * d * m


def lm_head_macs(dims: ModelDims, positions: int = 1) -> int:
    """LM head on the positions whose logits are computed: positions · d · V."""
    return positions * dims.llm_hidden * dims.vocab_size


def decode_step_macs(dims: ModelDims, llm_counts: Sequence[int], t: int) -> int:
    """Decode step t (t = 1 feeds the first generated token): Σ_l layer(kv_l(t) = n_l + t) + LM head."""
    if t < 1:
        raise ValueError(f"decode step t must be >= 1 (1 = the first generated token is fed); got {t}")
    return sum(llama_decode_layer_macs(dims, n + t) for n in llm_counts) + lm_head_macs(dims, 1)


# ------------------------------------------------------------------------------------------------
# Legacy per-layer formulas (flops.md §5), MAC-style, always multi-head form 4·n·d²


def legacy_layer_macs(dims: ModelDims, n: float, ffn_matrices: int) -> float:
    """4·n·d² + 2·n²·d + k·n·d·m with k = 2 (FastV) or 3 (PDrop, SparseVLM)."""
    d, m = dims.llm_hidden, dims.llm_mlp
    return 4 * n * d * d + 2 * n * n * d + ffn_matrices * n * d * m


def nominal_macs(dims: ModelDims, visual_tokens: float, text_tokens: float = NOMINAL_TEXT_TOKENS) -> float:
    """L × f(visual + text): the LLM prefill layers charged with one token count, no LM head.

    f is the prefill layer formula with the 3-matrix FFN, GQA-aware as LLM-Viewer counts the real
    K/V widths (for Vicuna identical to 4nd² + 2n²d + 3ndm).
    """
    n = visual_tokens + text_tokens
    d, m = dims.llm_hidden, dims.llm_mlp
    layer = 2 * n * d * d + 2 * n * d * kv_width(dims) + 2 * n * n * d + 3 * n * d * m
    return dims.llm_layers * layer


def nominal_tflops(dims: ModelDims, visual_tokens: float, text_tokens: float = NOMINAL_TEXT_TOKENS) -> float:
    """The LLM-Viewer / FiCoCo label: 2 FLOPs/MAC × L × f(visual + text), in TFLOPs.

    LLM prefill only: no vision tower, projector, LM head or decode.
    LLaVA-1.5-7B: 576 + 60 → 8.45, 192 + 60 → 3.30, 128 + 60 → 2.45, 64 + 60 → 1.61.
    """
    return 2 * nominal_macs(dims, visual_tokens, text_tokens) / 1e12


# ------------------------------------------------------------------------------------------------
# Memory: weights and KV cache


def parameter_counts(dims: ModelDims) -> dict:
    """Parameters of a LLaVA-1.5-style model from its dimensions (every checkpoint tensor).

    Vision tower (CLIP): patch conv without bias, CLS and position embeddings, pre- and post-
    LayerNorm, and all `dims.vision_layers` layers (Q/K/V/O and fc1/fc2 with biases, two
    LayerNorms) — the checkpoint holds layer 23 even though LLaVA does not need it.
    Projector: two linear layers with biases. LLM (Llama): token embeddings, per layer Q/O (d²),
    K/V (d·kv_width) and gate/up/down (d·m) without biases and two RMSNorms, the final norm and an
    untied LM head.
    """
    dv, mv = dims.vision_hidden, dims.vision_mlp
    vision_embeddings = 3 * dims.patch_size ** 2 * dv + dv + dims.vision_tokens * dv
    vision_layer = 4 * (dv * dv + dv) + (dv * mv + mv) + (mv * dv + dv) + 2 * (2 * dv)
    vision = vision_embeddings + 2 * (2 * dv) + dims.vision_layers * vision_layer

    p = dims.projector_hidden
    projector = (dv * p + p) + (p * dims.llm_hidden + dims.llm_hidden)

    d, m, vocab = dims.llm_hidden, dims.llm_mlp, dims.vocab_size
    llm_layer = 2 * d * d + 2 * d * kv_width(dims) + 3 * d * m + 2 * d
    llm = vocab * d + dims.llm_layers * llm_layer + d + d * vocab
    return {"vision": vision, "projector": projector, "llm": llm, "total": vision + projector + llm}


def weight_memory_bytes(dims: ModelDims, dtype: str = "float16") -> float:
    """Bytes to hold every parameter at one width (no quantisation scales or exceptions)."""
    return parameter_counts(dims)["total"] * bytes_per_value(dtype)


def kv_cache_bytes(dims: ModelDims, tokens: float | Sequence[float], bytes_per_value: float) -> float:
    """KV cache: 2 (K and V) · kv_width · bytes per cached token per layer.

    `tokens` is one length for every layer or a list with one length per LLM layer.
    LLaVA-1.5-7B FP16: 524,288 B per token; 636 tokens → 333 MB.
    """
    if isinstance(tokens, (int, float)):
        total_tokens = tokens * dims.llm_layers
    else:
        if len(tokens) != dims.llm_layers:
            raise ValueError(f"tokens lists {len(tokens)} layers; the model has {dims.llm_layers} LLM layers")
        total_tokens = sum(tokens)
    return 2 * kv_width(dims) * bytes_per_value * total_tokens


def llm_viewer_prefill_memory_bytes(dims: ModelDims, tokens: int, bytes_per_value: float) -> float:
    """LLM-Viewer's prefill memory figure, as its analyzer defines it (for comparison only).

    = weights of the decoder's linear layers (no embeddings, LM head or vision tower)
    + KV cache of every layer
    + the activations one layer stores in prefill: outputs of q, o, gate, up, down, A·V, the two
      norms, the two residual adds and the activation (counted d wide), 9·n·d + 2·n·m values, plus
      the n×n scores and softmax of every head, 2·h·n² values.
    """
    n, d, m = tokens, dims.llm_hidden, dims.llm_mlp
    linear_weights = dims.llm_layers * (2 * d * d + 2 * d * kv_width(dims) + 3 * d * m)
    one_layer_activations = 9 * n * d + 2 * n * m + 2 * dims.llm_heads * n * n
    values = linear_weights + one_layer_activations
    return values * bytes_per_value + kv_cache_bytes(dims, tokens, bytes_per_value)


MEMORY_ACCESS_CONVENTIONS = ("llm-viewer", "exact")


def llm_viewer_memory_access_parts(
    dims: ModelDims,
    tokens: float | Sequence[float],
    bytes_per_value: float,
    activation_bytes: float | None = None,
    kv_bytes: float | None = None,
    *,
    logits_positions: int = 1,
    convention: str = "llm-viewer",
) -> dict:
    """Bytes moved by one LLM prefill, operator by operator, as a roofline tool counts them.

    Every operator loads its inputs and its weights and stores its outputs; nothing is assumed to
    stay on chip between operators (no fusion, no FlashAttention), and the sum runs over every
    operator of every decoder layer plus the LM head. This is LLM-Viewer's prefill "memory access",
    the number the FiCoCo paper prints as memory (flops.md §6.3; docs/flops.md §4).

    bytes_per_value: weight width (2 fp16, 1 int8, 0.5 int4). activation_bytes: width of activations
    (default = weights). kv_bytes: width of K/V written to and read from the cache (default =
    activations, as LLM-Viewer does when no KV width is given). `tokens`: one length n for every
    layer or one length per LLM layer (floats allowed). Per layer with n tokens, d, m, h heads,
    w = kv_width:

      weights               (2d² + 2dw + 3dm)                    weight bytes, read once
      linear I/O            loads 6nd + nm, stores 3nd + 2nm     q, k, v, o, gate, up, down
                                                                 (k/v outputs go to the cache:)
      KV store              2nw                                  kv bytes
      attention I/O         Q load nd, A·V store nd              activation bytes
                            K and V loads 2nw                    kv bytes
      attention scores      h·n² stored by QKᵀ, loaded and stored by softmax, loaded by A·V: 4hn²
      element-wise          two RMSNorms 4nd, two residual adds, the SwiGLU product

    Element-wise, `convention`: "llm-viewer" counts what LLM-Viewer counts: an add loads one input
    and stores one output (2nd each), the activation loads 2nd and stores nd (d wide although it runs
    on m = FFN width), 11nd in all. "exact" counts an add's two inputs (3nd each) and the activation
    m wide (3nm), 10nd + 3nm. LM head on `logits_positions` positions: weights dV, loads pd, stores
    pV. Not counted: token embeddings (a gather of n rows), the vision tower and the projector — as
    the TFLOPs label, LLM prefill only.
    """
    if convention not in MEMORY_ACCESS_CONVENTIONS:
        raise ValueError(f"convention={convention!r}: valid choices are {list(MEMORY_ACCESS_CONVENTIONS)}")
    act = bytes_per_value if activation_bytes is None else activation_bytes
    kv = act if kv_bytes is None else kv_bytes
    d, m, h, w, L = dims.llm_hidden, dims.llm_mlp, dims.llm_heads, kv_width(dims), dims.llm_layers
    if isinstance(tokens, (int, float)):
        per_layer = [tokens] * L
    else:
        per_layer = list(tokens)
        if len(per_layer) != L:
            raise ValueError(f"tokens lists {len(per_layer)} layers; the model has {L} LLM layers")
    n_sum = sum(per_layer)
    n2_sum = sum(n * n for n in per_layer)

    if convention == "llm-viewer":
        elementwise_per_token = 4 * d + 2 * (2 * d) + 3 * d          # norms, adds (one input), act d wide
    else:
        elementwise_per_token = 4 * d + 2 * (3 * d) + 3 * m          # norms, adds (two inputs), act m wide
    parts = {
        "weights": L * (2 * d * d + 2 * d * w + 3 * d * m) * bytes_per_value,
        "lm_head": dims.vocab_size * d * bytes_per_value + logits_positions * (d + dims.vocab_size) * act,
        "linear_io": n_sum * (9 * d + 3 * m) * act,
        "kv_store": n_sum * 2 * w * kv,
        "attention_io": n_sum * (2 * d * act + 2 * w * kv),
        "attention_scores": 4 * h * n2_sum * act,
        "elementwise": n_sum * elementwise_per_token * act,
    }
    parts["total"] = sum(parts.values())
    return parts


def llm_viewer_memory_access_bytes(
    dims: ModelDims,
    tokens: float | Sequence[float],
    bytes_per_value: float,
    activation_bytes: float | None = None,
    kv_bytes: float | None = None,
    *,
    logits_positions: int = 1,
    convention: str = "llm-viewer",
) -> float:
    """Total prefill memory access in bytes (`llm_viewer_memory_access_parts(...)["total"]`).

    LLaVA-1.5-7B, 636 tokens: FP16 22.21 GB (paper 22.4), all-INT8 11.10 GB (paper 11.2);
    124 tokens FP16 14.45 GB (paper 14.4).
    """
    return llm_viewer_memory_access_parts(dims, tokens, bytes_per_value, activation_bytes, kv_bytes,
                                          logits_positions=logits_positions, convention=convention)["total"]


# ------------------------------------------------------------------------------------------------
# Counts records (contracts §2) without a model


ADAPTIVE_NOTE = ("an adaptive method chooses its token count per image, so it has no planned counts; its FLOPs come "
                 "from the realised per-sample counts of a run (handle.last_counts(), the evaluate job's records)")


def counts_from_schedule(
    dims: ModelDims,
    text_tokens: int,
    llm_visual: Sequence[int],
    vision: Sequence[Sequence[int]] | None = None,
    visual_delivered: int | None = None,
) -> dict:
    """A §2 counts record from a planned schedule: per-LLM-layer visual counts plus text tokens.

    `vision` defaults to the unreduced tower (`vision_layers_run` × [577, 577]);
    `visual_delivered` defaults to the first LLM layer's visual count.
    """
    if len(llm_visual) != dims.llm_layers:
        raise ValueError(f"llm_visual lists {len(llm_visual)} layers; the model has {dims.llm_layers} LLM layers")
    if vision is None:
        vision = [[dims.vision_tokens, dims.vision_tokens]] * dims.vision_layers_run
    return {
        "vision": [[int(n_attn), int(n_mlp)] for n_attn, n_mlp in vision],
        "visual_delivered": int(llm_visual[0] if visual_delivered is None else visual_delivered),
        "llm": [int(v) + text_tokens for v in llm_visual],
        "llm_visual": [int(v) for v in llm_visual],
    }


def vanilla_counts(dims: ModelDims, text_tokens: int = NOMINAL_TEXT_TOKENS,
                   image_size: tuple[int, int] | None = None) -> dict:
    """The §2 record of the unreduced model: vision_layers_run × [577, 577]; every LLM layer 576 + text.

    On LLaVA-NeXT the record depends on the image's (height, width), `image_size`: the tower runs once
    per pass of its `anyres_layout` (`vision_crops` passes, their layers listed one pass after the
    other), the projector on every pass's patches, and the LLM gets the packed span."""
    if not dims.image_grid_pinpoints:
        if image_size is not None:
            raise ValueError("image_size: a model with one crop per image costs the same for every image size")
        return counts_from_schedule(dims, text_tokens, [dims.visual_tokens] * dims.llm_layers)
    if image_size is None:
        raise ValueError("image_size: a LLaVA-NeXT image's cost depends on its (height, width); pass it")
    return counts_from_plan(dims, unreduced_plan(dims, [dims.anyres_layout(*image_size)]), text_tokens)


def counts_from_plan(dims: ModelDims, plan: Plan, text_tokens: int = NOMINAL_TEXT_TOKENS) -> dict:
    """The §2 record of a method's plan (`Method.check_budget` / `handle.plan`): its tower counts,
    delivered tokens and visual tokens per LLM layer, with `text_tokens` text tokens."""
    if plan.llm_visual is None:
        raise ValueError(f"{plan.method}: {ADAPTIVE_NOTE}")
    counts = counts_from_schedule(dims, text_tokens, plan.llm_visual, plan.vision_counts, plan.delivered)
    if plan.llm_mlp_visual is not None:
        counts["llm_mlp"] = [text_tokens + visual for visual in plan.llm_mlp_visual]
    if plan.projector_tokens is not None:
        counts["projector_tokens"] = plan.projector_tokens
    if plan.vision_crops != 1:
        counts["vision_crops"] = plan.vision_crops
    return counts


def planned_counts(dims: ModelDims, method: str, budget, text_tokens: int = NOMINAL_TEXT_TOKENS,
                   image_size: tuple[int, int] | None = None, **overrides) -> dict:
    """The §2 record a method plans for a budget, from `ficoco.methods.get(method).check_budget`.

    Budget None is the method's plan without a budget: unreduced for most, but a fixed published
    schedule for ficoco-v-official and pdrop-official. An adaptive method (`Method.budgeted` False)
    has no planned record: ValueError. LLaVA-NeXT: the plan of an image of `image_size` (height, width),
    keeping the budget's fraction of the nominal image (`ficoco.dims.image_plan`)."""
    from ficoco import methods

    if method != "vanilla" and not methods.get(method).budgeted:
        raise ValueError(f"{methods.get(method).name}: {ADAPTIVE_NOTE}")
    if method == "vanilla":
        return vanilla_counts(dims, text_tokens, image_size)
    if dims.image_grid_pinpoints:
        if image_size is None:
            raise ValueError("image_size: a LLaVA-NeXT image's plan depends on its (height, width); pass it")
        plan = image_plan(methods.get(method), dims, [dims.anyres_layout(*image_size)], budget, **overrides)
        return counts_from_plan(dims, plan, text_tokens)
    plan = methods.get(method).check_budget(dims, budget, **overrides)
    return counts_from_plan(dims, plan, text_tokens)


# ------------------------------------------------------------------------------------------------
# The exact cost of one sample (flops.md §7)


def _check_counts(dims: ModelDims, counts: dict) -> None:
    missing = [key for key in ("vision", "visual_delivered", "llm", "llm_visual") if key not in counts]
    if missing:
        raise ValueError(f"counts record lacks {missing}; required keys: vision, visual_delivered, llm, llm_visual")
    for key in ("llm", "llm_visual", "llm_mlp"):
        if key in counts and len(counts[key]) != dims.llm_layers:
            raise ValueError(f"counts[{key!r}] lists {len(counts[key])} layers; the model has {dims.llm_layers}")
    for index, pair in enumerate(counts["vision"]):
        if len(pair) != 2:
            raise ValueError(f"counts['vision'][{index}] = {pair!r}: expected a pair [n_attn, n_mlp]")
    crops = counts.get("vision_crops", 1)
    if not isinstance(crops, int) or crops < 1 or len(counts["vision"]) % crops:
        raise ValueError(f"counts['vision_crops'] = {crops!r}: expected a whole number >= 1 that divides the "
                         f"{len(counts['vision'])} tower layer passes in counts['vision']")
    # counts no forward can have executed: each would cost a negative or an impossible amount without an error
    whole = {"visual_delivered": [counts["visual_delivered"]], "llm": counts["llm"], "llm_visual": counts["llm_visual"],
             **{key: [counts[key]] for key in ("projector_tokens", "overhead_macs") if key in counts},
             **({"llm_mlp": counts["llm_mlp"]} if "llm_mlp" in counts else {}),
             "vision": [count for pair in counts["vision"] for count in pair]}
    for key, values in whole.items():
        bad = [value for value in values if isinstance(value, bool) or not isinstance(value, int) or value < 0]
        if bad:
            raise ValueError(f"counts[{key!r}] holds {bad[0]!r}: token counts and MACs are whole numbers >= 0")
    for index, (n_attn, n_mlp) in enumerate(counts["vision"]):
        if n_mlp > n_attn:
            raise ValueError(f"counts['vision'][{index}] = {[n_attn, n_mlp]}: its MLP ran on more tokens than its "
                             f"attention; valid: n_mlp <= n_attn (a reduction between them only removes)")
    if not isinstance(dims, QwenVLDims):       # CLIP: every pass's first layer holds CLS and its patches
        firsts = counts["vision"][::len(counts["vision"]) // crops] if counts["vision"] else []
        if any(n_attn < 1 for n_attn, _ in firsts):
            raise ValueError(f"counts['vision']: a tower pass whose first layer ran on {min(firsts)[0]} tokens; "
                             f"valid: >= 1 (CLS, then the image's patches)")
    llm_mlp = counts.get("llm_mlp", counts["llm"])
    for layer, (length, visual, mlp) in enumerate(zip(counts["llm"], counts["llm_visual"], llm_mlp)):
        if length < 1 or visual > length or mlp > length:
            raise ValueError(f"LLM layer {layer}: {length} tokens, {visual} of them visual, {mlp} in its MLP; valid: "
                             f">= 1 tokens, visual and MLP tokens at most that many")
    most = max(range(len(counts["llm_visual"])), key=counts["llm_visual"].__getitem__)
    if counts["llm_visual"][most] > counts["visual_delivered"]:
        raise ValueError(f"counts['llm_visual'][{most}] = {counts['llm_visual'][most]}: more visual tokens in LLM "
                         f"layer {most} than the {counts['visual_delivered']} delivered (visual_delivered)")


def llm_macs(dims, llm: Sequence[int], llm_mlp: Sequence[int], generated_tokens: int,
             logits_positions: int) -> tuple[int, int, list[int]]:
    """The LLM part of one sample: (prefill layers, LM head on the computed positions, each decode step), with
    llm[l] tokens in layer l's attention and llm_mlp[l] in its MLP; `dims` any model's (LLM fields)."""
    prefill_layers = sum(llama_layer_macs(dims, n, n_mlp) for n, n_mlp in zip(llm, llm_mlp))
    steps = max(generated_tokens - 1, 0)
    return prefill_layers, lm_head_macs(dims, logits_positions), [decode_step_macs(dims, llm, t)
                                                                  for t in range(1, steps + 1)]


def macs_and_flops(macs: dict) -> dict:
    """Each part of a cost in MACs as `{part}_macs` and `{part}_flops` (2 FLOPs per MAC), floats."""
    return {f"{name}_{unit}": float(value * (2 if unit == "flops" else 1))
            for name, value in macs.items() for unit in ("macs", "flops")}


def sample_cost(dims: ModelDims, counts: dict, generated_tokens: int, logits_positions: int = 1) -> dict:
    """Exact cost of one sample from the token counts it executed (contracts §2). See docs/flops.md.

    generated_tokens G: new tokens in the output (EOS included if produced). The first comes from
    the prefill logits and the last is never fed back, so G − 1 decode steps ran; step t feeds
    generated token t with cache length kv_l(t) = llm[l] + t.
    logits_positions: prefill positions whose logits were computed (1 for `generate`).
    Optional counts keys: `projector_tokens` (tokens the projector ran on, if not
    visual_delivered), `llm_mlp` (tokens each LLM layer's MLP ran on, if not `llm`: a reduction
    between a layer's attention and MLP), `vision_crops` (tower passes per sample, 1 if absent:
    LLaVA-NeXT's base image and crops, whose layers `vision` lists one pass after the other) and
    `overhead_macs` (selection overhead, reported separately). On Qwen2-VL-family dims (`QwenVLDims`) the
    tower and merger are costed from `vision_grids` (each image's patch grid [rows, cols]; required there).
    """
    _check_counts(dims, counts)
    if generated_tokens < 0:
        raise ValueError(f"generated_tokens must be >= 0; got {generated_tokens}")
    if not 1 <= logits_positions <= counts["llm"][-1]:
        raise ValueError(f"logits_positions = {logits_positions}: valid: 1 (generate) to the {counts['llm'][-1]} "
                         f"positions the last LLM layer ran on")
    vision_pairs = counts["vision"]
    crops = counts.get("vision_crops", 1)
    layers_per_crop = len(vision_pairs) // crops
    llm, llm_visual = list(counts["llm"]), list(counts["llm_visual"])
    L = dims.llm_layers

    if isinstance(dims, QwenVLDims):
        # 1.-2. Qwen: the tower over each image's patch grid (windows from the grid), and the patch merger
        patch_embed, vision_layers, projector = qwen_vision_and_merger_macs(dims, counts)
    else:
        # 1. vision tower: patch embedding (patches = each pass's first-layer tokens minus CLS) + executed layers
        patches = sum(vision_pairs[crop * layers_per_crop][0] - 1 for crop in range(crops)) if vision_pairs else 0
        patch_embed = patch_embedding_macs(dims, patches)
        vision_layers = sum(clip_layer_macs(dims, n_attn, n_mlp) for n_attn, n_mlp in vision_pairs)
        # 2. projector on the tokens it ran on
        projector = projector_macs(dims, counts.get("projector_tokens", counts["visual_delivered"]))
    vision = patch_embed + vision_layers

    # 3. LLM prefill: every layer with its own n_l, then the LM head on the computed positions
    # 4. decode: steps t = 1..G-1, each Σ_l layer(n_l + t) + LM head; linear in t
    prefill_layers, prefill_lm_head, decode_steps = llm_macs(dims, llm, counts.get("llm_mlp", llm), generated_tokens,
                                                             logits_positions)
    prefill, decode, steps = prefill_layers + prefill_lm_head, sum(decode_steps), len(decode_steps)

    # 5. selection overhead, if the adapter measured it
    overhead = counts.get("overhead_macs", 0)

    total = vision + projector + prefill + decode

    # legacy conventions, LLM prefill only
    fastv = sum(legacy_layer_macs(dims, n, ffn_matrices=2) for n in llm)
    pdrop = sum(legacy_layer_macs(dims, v, ffn_matrices=3) for v in llm_visual)
    sparsevlm = sum(legacy_layer_macs(dims, n, ffn_matrices=3) for n in llm)
    visual_average = sum(llm_visual) / L
    nominal = nominal_macs(dims, visual_average, NOMINAL_TEXT_TOKENS)

    macs = {
        "vision_patch_embed": patch_embed,
        "vision_layers": vision_layers,
        "vision": vision,
        "projector": projector,
        "prefill_layers": prefill_layers,
        "prefill_lm_head": prefill_lm_head,
        "prefill": prefill,
        "decode": decode,
        "decode_step_first": decode_steps[0] if decode_steps else 0,
        "decode_step_last": decode_steps[-1] if decode_steps else 0,
        "overhead": overhead,
        "total": total,
        "total_with_overhead": total + overhead,
        "legacy_fastv": fastv,
        "legacy_pdrop": pdrop,
        "legacy_sparsevlm": sparsevlm,
        "legacy_nominal": nominal,
    }
    cost = macs_and_flops(macs)
    cost["legacy_nominal_tflops"] = float(2 * nominal / 1e12)

    prefill_cache, final_cache = llm, [n + steps for n in llm]
    for dtype in ("fp32", "fp16", "int8", "int4"):
        cost[f"kv_cache_bytes_{dtype}"] = float(kv_cache_bytes(dims, prefill_cache, BYTES_PER_VALUE[dtype]))
    cost["kv_cache_final_bytes_fp16"] = float(kv_cache_bytes(dims, final_cache, BYTES_PER_VALUE["fp16"]))

    cost["decode_steps"] = float(steps)
    cost["visual_tokens_layer_average"] = float(visual_average)
    cost["visual_tokens_delivered"] = float(counts["visual_delivered"])
    cost["text_tokens"] = float(llm[0] - llm_visual[0])
    cost["prefill_tokens_layer_average"] = float(sum(llm) / L)
    cost["vision_layers_executed"] = float(layers_per_crop)
    cost["vision_crops"] = float(crops)
    return cost


# ------------------------------------------------------------------------------------------------
# Qwen2-VL and Qwen2.5-VL (flops.md §6): a tower without CLS whose length follows the image


def qwen_vision_block_macs(dims: QwenVLDims, attention_tokens: int, mlp_tokens: int, attention_pairs: int) -> int:
    """One Qwen vision block: qkv and proj on its `attention_tokens` n_a, QKᵀ and A·V over the `attention_pairs`
    Σ s² of the sequences it attends within (each image, or each window), its MLP on `mlp_tokens` n_m (fewer
    where a reduction falls between its attention and MLP):
    4·n_a·d² + 2·d·Σ s² + k·n_m·d·m, k = 2 MLP matrices (Qwen2-VL) or 3 (Qwen2.5-VL)."""
    d, m = dims.vision_hidden, dims.vision_mlp
    attention_projections = 4 * attention_tokens * d * d       # qkv (one fused matrix of 3·d) and proj
    return attention_projections + 2 * d * attention_pairs + dims.vision_mlp_matrices * mlp_tokens * d * m


def qwen_attention_pairs(dims: QwenVLDims, grid: tuple[int, int],
                         vision_counts: Sequence[Sequence[int]] | None = None) -> list[int]:
    """Per tower block, the query-key pairs Σ s² one image's attention scores, its blocks running on `vision_counts`
    ([n_attn, n_mlp] patches per block; default every patch): its grid's sequences (the image, or its windows)
    while every patch is there; after a reduction, n_attn² in a block that attends over the whole image. In a
    windowed block after a reduction they depend on which groups each window kept, which only a run knows (its
    counts' `vision_attention_pairs`): ValueError."""
    patches, pairs = grid[0] * grid[1], []
    if vision_counts is None:
        vision_counts = [[patches, patches]] * dims.vision_layers
    for layer, (attention_tokens, _) in enumerate(vision_counts):
        if attention_tokens == patches:
            pairs.append(sum(span * span for span in dims.attention_spans(grid, layer)))
        elif dims.attends_whole_image(layer):
            pairs.append(attention_tokens * attention_tokens)
        else:
            raise ValueError(f"tower block {layer} attends within windows, after a reduction to {attention_tokens} of "
                             f"{patches} patches: its cost depends on which groups each window kept, known per sample "
                             f"from a run (counts['vision_attention_pairs']), not from a plan")
    return pairs


def qwen_merger_macs(dims: QwenVLDims, visual_tokens: int) -> int:
    """The patch merger: per LLM token, merge² patches concatenated (w = merge²·d_v) through w×w and w×d."""
    width = dims.merge_size ** 2 * dims.vision_hidden
    return visual_tokens * (width * width + width * dims.llm_hidden)


def qwen_vision_and_merger_macs(dims: QwenVLDims, counts: dict) -> tuple[int, int, int]:
    """(patch embedding, tower blocks, merger) MACs of a Qwen sample's images, from `counts["vision_grids"]`
    (each image's patch grid), `counts["vision"]` (the patches each block ran on, [attention, MLP]) and
    `counts["vision_attention_pairs"]` (per block Σ s² over the sequences it attended within; from the grids, by
    `qwen_attention_pairs`, when absent and the tower is unreduced). The merger makes one LLM token of merge²
    patches of what the last block kept: `visual_delivered`."""
    grids = [tuple(grid) for grid in counts.get("vision_grids", ())]
    patches, group = sum(rows * cols for rows, cols in grids), dims.merge_size ** 2
    vision = [list(pair) for pair in counts["vision"]]
    if len(vision) != (dims.vision_layers if grids else 0) or grids and vision[0][0] != patches:
        raise ValueError(f"counts['vision'] = {counts['vision']!r}: valid: one [attention, MLP] pair for each of the "
                         f"{dims.vision_layers} tower blocks, the first on every patch of the grids "
                         f"{counts.get('vision_grids')!r} ({patches})" + ("" if grids else "; none without an image"))
    delivered = counts["visual_delivered"]
    if grids and (vision[-1][1] != delivered * group or patches % group):
        raise ValueError(f"counts['visual_delivered'] = {delivered}: the last tower block kept {vision[-1][1]} patches "
                         f"of grids {counts.get('vision_grids')!r}; valid: {vision[-1][1] / group:g} LLM tokens "
                         f"(merged {dims.merge_size}×{dims.merge_size}), whole groups of whole grids")
    derived = None                                 # an unreduced tower's pairs follow from the grids
    if grids and all(pair == [patches, patches] for pair in vision):
        derived = [sum(layer) for layer in zip(*(qwen_attention_pairs(dims, grid) for grid in grids))]
    pairs = counts.get("vision_attention_pairs", derived)
    if pairs is None:
        raise ValueError("counts['vision'] shows a reduced tower, and counts has no 'vision_attention_pairs': the "
                         "attention of its windowed blocks cannot be costed from the grids")
    if len(pairs) != len(vision) or derived is not None and list(pairs) != derived or any(
            not attention <= pair <= attention * attention for (attention, _), pair in zip(vision, pairs)):
        raise ValueError(f"counts['vision_attention_pairs'] = {pairs!r}: valid: one per tower block, between the "
                         f"block's patches n and n² (exactly {derived} for the unreduced grids)")
    patch_embed = patches * dims.patch_features * dims.vision_hidden           # the Conv3d, one output per patch
    vision_layers = sum(qwen_vision_block_macs(dims, attention, mlp, pair)
                        for (attention, mlp), pair in zip(vision, pairs))
    return patch_embed, vision_layers, qwen_merger_macs(dims, delivered)


def qwen_vl_sample_cost(dims: QwenVLDims, image_size: tuple[int, int], text_tokens: int = NOMINAL_TEXT_TOKENS,
                        generated_tokens: int = 1, logits_positions: int = 1, llm_visual: Sequence[int] | None = None,
                        llm_mlp_visual: Sequence[int] | None = None,
                        vision_counts: Sequence[Sequence[int]] | None = None) -> dict:
    """Exact cost of one sample with one image of `image_size` (height, width) pixels: the tower over its
    patch grid (every block runs; the merger reads the last; `vision_counts`, the [attention, MLP] patches of
    each block where a reduction inside the tower keeps fewer, their attention by `qwen_attention_pairs`;
    default: every patch), the merger on the groups the last block kept, the LLM prefill over text_tokens
    plus the visual tokens each layer holds (`llm_visual`, one count per layer, from a plan or a run;
    `llm_mlp_visual` those of its MLP where a reduction falls between; default: the delivered ones in every
    layer), the LM head on `logits_positions`, and generated_tokens − 1 decode steps. The vision start/end
    markers are text tokens. Keys as `sample_cost`'s parts."""
    if generated_tokens < 0 or text_tokens < 0 or logits_positions < 1:
        raise ValueError(f"need generated_tokens >= 0, text_tokens >= 0, logits_positions >= 1; got "
                         f"{generated_tokens}, {text_tokens}, {logits_positions}")
    grid = dims.patch_grid(*image_size)
    patches, visual = grid[0] * grid[1], dims.image_tokens(*image_size)
    vision_counts = [[patches, patches]] * dims.vision_layers if vision_counts is None else \
        [list(pair) for pair in vision_counts]
    delivered = vision_counts[-1][1] // dims.merge_size ** 2
    llm_visual = [delivered] * dims.llm_layers if llm_visual is None else list(llm_visual)
    llm_mlp_visual = llm_visual if llm_mlp_visual is None else list(llm_mlp_visual)
    for name, counts in (("llm_visual", llm_visual), ("llm_mlp_visual", llm_mlp_visual)):
        if len(counts) != dims.llm_layers or not all(0 <= count <= visual for count in counts):
            raise ValueError(f"{name}={counts}: need one count per LLM layer ({dims.llm_layers}), each in "
                             f"[0, {visual}] (the image's visual tokens)")
    counts = {"vision": vision_counts, "vision_grids": [list(grid)],
              "vision_attention_pairs": qwen_attention_pairs(dims, grid, vision_counts),
              "visual_delivered": delivered, "llm": [text_tokens + n for n in llm_visual], "llm_visual": llm_visual,
              "llm_mlp": [text_tokens + n for n in llm_mlp_visual]}
    return {**sample_cost(dims, counts, generated_tokens, logits_positions), "resized": dims.resized(*image_size),
            "patch_grid": grid, "vision_tokens": patches, "visual_tokens": visual, "text_tokens": text_tokens,
            "visual_tokens_layer_average": sum(llm_visual) / dims.llm_layers}


def qwen_vl_planned_cost(dims: QwenVLDims, method: str, budget: int | ImageTokens | None, image_size: tuple[int, int],
                         text_tokens: int = NOMINAL_TEXT_TOKENS, generated_tokens: int = 1, **overrides) -> dict:
    """`qwen_vl_sample_cost` of the counts `method` plans for one image of `image_size` at `budget` (of the
    nominal 1,280-token image: the image keeps the budget's fraction of its span; or `ImageTokens(n)`: n, or
    its whole span when it has fewer; as the adapter runs it)."""
    from ficoco import methods

    if method == "vanilla":
        return qwen_vl_sample_cost(dims, image_size, text_tokens, generated_tokens)
    refusal = qwen_refusal(methods.get(method), dims, **overrides)
    if refusal:
        raise ValueError(refusal)
    plan = qwen_image_plan(methods.get(method), dims, dims.patch_grid(*image_size), budget, **overrides)
    if plan.llm_visual is None:
        raise ValueError(f"{plan.method}: {ADAPTIVE_NOTE}")
    return qwen_vl_sample_cost(dims, image_size, text_tokens, generated_tokens, llm_visual=plan.llm_visual,
                               llm_mlp_visual=plan.llm_mlp_visual, vision_counts=plan.vision_counts)


# ------------------------------------------------------------------------------------------------
# Budgets stated as costs: a TFLOPs target solved into a token budget per (model, method)


@dataclass(frozen=True)
class SolvedBudget:
    """The token budget a TFLOPs target resolves to for one method on one model."""

    target: TflopsTarget
    tokens: int                                # the budget the method runs (visual tokens per LLM layer)
    predicted_tflops: float                    # its cost per sample under the target's convention
    reachable_tokens: tuple[int, int]          # the smallest and the largest budget the method reaches
    reachable_tflops: tuple[float, float]      # their costs


def convention_tflops(dims: ModelDims, counts: dict, convention: str) -> float:
    """One sample's cost under a TFLOPs convention (docs/flops.md, "TFLOPs budgets").

    exact: our per-sample count (flops.md §7) up to the first generated token: vision tower, projector
    and LLM prefill with its LM head. Decode is left out: its length is the answer's, not the budget's.
    nominal: the paper's LLM-Viewer-style label (`legacy_nominal_tflops`: the layer-averaged visual
    tokens plus 60 text tokens through every layer, 2 FLOPs per MAC).
    """
    if convention not in TFLOPS_CONVENTIONS:
        raise ValueError(f"convention {convention!r} is not known; valid: {', '.join(TFLOPS_CONVENTIONS)}")
    cost = sample_cost(dims, counts, generated_tokens=1)
    return cost["total_flops"] / 1e12 if convention == "exact" else cost["legacy_nominal_tflops"]


def solve_tflops_budget(dims: ModelDims, method: str, target: TflopsTarget,
                        text_tokens: int = NOMINAL_TEXT_TOKENS, **overrides) -> SolvedBudget:
    """The token budget whose planned cost (with `text_tokens` text tokens) is closest to the target;
    of two equally close, the cheaper; of budgets with one cost, the smallest. InfeasibleBudget,
    naming the reachable range, when the target is outside it.

    A method that runs at every budget from its smallest up to the unreduced count (most) is solved
    by bisection: its planned cost never falls as its budget grows. One that runs only at some
    budgets (sparsevlm's official schedules, pooling's factor pairs) takes the closest of those,
    found by a scan. tests/test_tflops_budgets.py checks both against a full scan for every method.
    """
    from ficoco import methods

    registered = methods.get(method)
    top = dims.visual_tokens

    def cost(tokens: int) -> float | None:
        """The planned cost at `tokens`; None where the method does not run."""
        try:
            counts = planned_counts(dims, registered.name, tokens, text_tokens, **overrides)
        except ValueError:
            return None
        return convention_tflops(dims, counts, target.convention)

    costs = _bisection_costs(cost, target.tflops, top)
    assumed_text = text_tokens if target.convention == "exact" else NOMINAL_TEXT_TOKENS    # nominal: always 60
    note = ""
    if costs is None:                                 # it skips budgets: scan them all
        costs = {tokens: value for tokens in range(1, top + 1) if (value := cost(tokens)) is not None}
        if not costs:
            try:
                planned_counts(dims, registered.name, top, text_tokens, **overrides)
            except ValueError as error:
                raise InfeasibleBudget(f"{registered.name} reaches no budget in 1..{top} with these settings (at "
                                       f"{top}: {str(error).rstrip('.')})") from None
        note = f" (it runs only at {_listed(sorted(costs))})"
    low, high = min(costs), max(costs)
    _check_reachable(registered.name, target, assumed_text, (low, high), (costs[low], costs[high]), note)
    # closest; of equally close, the cheaper; of equal costs (a plateau), the smallest budget
    tokens = min(costs, key=lambda budget: (abs(costs[budget] - target.tflops), costs[budget], budget))
    return SolvedBudget(target, tokens, costs[tokens], (low, high), (costs[low], costs[high]))


def _bisection_costs(cost, target: float, top: int) -> dict[int, float] | None:
    """The costs a contiguous method needs probed: its smallest and the unreduced budget, the budgets
    on either side of the target, and the first budget of each of their costs (a plateau's smallest).
    None as soon as a probe finds a budget inside the range where the method does not run."""
    costs: dict[int, float | None] = {}

    def known(tokens: int) -> float | None:
        if tokens not in costs:
            costs[tokens] = cost(tokens)
        return costs[tokens]

    if known(top) is None:
        return None
    low = 1
    if known(low) is None:                            # the smallest budget it runs at: low
        unreachable, low = 1, top
        while low - unreachable > 1:
            middle = (unreachable + low) // 2
            unreachable, low = (middle, low) if known(middle) is None else (unreachable, middle)

    def first_at_least(value: float) -> int | None:
        """The smallest budget costing >= value (top when none does); None at a gap."""
        if known(low) >= value:
            return low
        if known(top) < value:
            return top
        below, above = low, top                       # cost(below) < value <= cost(above)
        while above - below > 1:
            middle = (below + above) // 2
            if known(middle) is None:
                return None
            below, above = (below, middle) if known(middle) >= value else (middle, above)
        return above

    above = first_at_least(target)
    if above is None:
        return None
    for tokens in (above - 1, above):                 # the closest cost is one of these two ...
        if tokens >= low and (known(tokens) is None or first_at_least(known(tokens)) is None):
            return None                               # ... and first_at_least probed where it starts
    return {tokens: value for tokens, value in costs.items() if value is not None and tokens >= low}


def _listed(budgets: Sequence[int], most: int = 8) -> str:
    shown = ", ".join(map(str, budgets[:most]))
    return shown + (f", ... ({len(budgets)} budgets)" if len(budgets) > most else "")


def _check_reachable(method: str, target: TflopsTarget, text_tokens: int, tokens: tuple[int, int],
                     tflops: tuple[float, float], note: str = "") -> None:
    if not tflops[0] - target.tolerance <= target.tflops <= tflops[1] + target.tolerance:
        raise InfeasibleBudget(f"{target.describe()} is out of reach for {method}: its budgets {tokens[0]}..{tokens[1]}"
                               f"{note} cost {tflops[0]:.4g}..{tflops[1]:.4g} TFLOPs ({target.convention}, "
                               f"{text_tokens} text tokens); valid: a target in that range (to within half a unit "
                               f"of its last written digit)")


# ------------------------------------------------------------------------------------------------
# The `ficoco flops` command

# FiCoCo v4 Tables 10/11 (flops.md §6.3), LLaVA-1.5-7B: TFLOPs label, total memory GB, KV cache MB
# FiCoCo memory column (flops.md §6.3; v4 Tables 10/11, FiCoCo-VL from v1), LLaVA-1.5-7B:
# (row, precision, total memory GB, KV cache MB). LLM-Viewer theoretical values, not measured.
PAPER_MEMORY = (
    ("vanilla", "FP16", 22.4, 333.0), ("vanilla", "INT8", 11.2, 167.0), ("vanilla", "INT4", 6.2, 83.4),
    ("FiCoCo-V", "FP16", 14.4, 65.0), ("FiCoCo-V", "INT8", 7.8, 32.5), ("FiCoCo-V", "INT4", 4.4, 16.3),
    ("FiCoCo-L", "FP16", 14.3, 64.2), ("FiCoCo-L", "INT8", 7.2, 32.1), ("FiCoCo-L", "INT4", 3.3, 16.1),
    ("FiCoCo-VL", "FP16", 13.0, 60.8), ("FiCoCo-VL", "INT8", 6.5, 30.4), ("FiCoCo-VL", "INT4", 3.3, 15.2),
)
PRECISION_BYTES = MappingProxyType({"FP16": 2.0, "INT8": 1.0, "INT4": 0.5})
PAPER_LABELS = ((8.5, 576), (3.3, 192), (2.4, 128), (1.5, 64))


def dims_for(model_config: str | None, shape: str | None) -> ModelDims | QwenVLDims:
    """ModelDims (LLaVA) or QwenVLDims (Qwen2-VL, Qwen2.5-VL) from a config.json path, or a published shape."""
    if model_config:
        with open(model_config) as handle:
            config = json.load(handle)
        return dims_from_config(config)
    shape = shape or "llava-1.5-7b"
    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r}: valid choices are {list(SHAPES)}")
    if shape.startswith("qwen"):
        return qwen_vl_dims(shape)
    family, _, size = shape.rpartition("-")
    return (llava_next_dims if family == "llava-next" else llava_1_5_dims)(size)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [list(map(str, header))] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cost_row(label, cost: dict) -> list:
    return [
        label,
        f"{cost['visual_tokens_layer_average']:.2f}",
        f"{cost['vision_macs'] / 1e9:.1f}",
        f"{cost['projector_macs'] / 1e9:.2f}",
        f"{cost['prefill_flops'] / 1e12:.3f}",
        f"{cost['decode_flops'] / 1e9:.1f}",
        f"{cost['total_flops'] / 1e12:.3f}",
        f"{cost['legacy_nominal_tflops']:.2f}",
        f"{cost['legacy_fastv_macs'] / 1e12:.3f}",
        f"{cost['legacy_pdrop_macs'] / 1e12:.3f}",
        f"{cost['legacy_sparsevlm_macs'] / 1e12:.3f}",
        f"{cost['kv_cache_bytes_fp16'] / 1e6:.1f}",
    ]


COST_HEADER = ("budget", "vis avg", "vision GMAC", "proj GMAC", "prefill TFLOPs", "decode GFLOPs",
               "total TFLOPs", "nominal T", "FastV TMAC", "PDrop TMAC", "SparseVLM TMAC", "KV MB fp16")


def _overrides(text: str | None) -> dict:
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"--overrides {text!r}: expected a JSON object of method hyperparameters")
    return value


def flops_table(dims: ModelDims, method: str, budgets: Sequence[int], text_tokens: int, generated: int,
                overrides: dict | None = None,
                image_size: tuple[int, int] | None = None) -> tuple[str, list[dict], list[str]]:
    """(table text, per-row sample_cost dicts, infeasible-budget messages): vanilla first, then
    the method at every budget it can reach. `image_size` (height, width): a LLaVA-NeXT image's size."""
    from ficoco import methods

    unmet = methods.get(method).unmet_needs(dims) if dims.image_grid_pinpoints else []
    if unmet:
        raise ValueError(f"--method {method}: on LLaVA-NeXT it needs {'; '.join(unmet)}")
    rows, costs, infeasible = [], [], []
    vanilla = sample_cost(dims, vanilla_counts(dims, text_tokens, image_size), generated)
    rows.append(_cost_row("vanilla", vanilla))
    costs.append({"method": "vanilla", "budget": None, **vanilla})
    if method != "vanilla":
        for budget in budgets:
            try:
                counts = planned_counts(dims, method, budget, text_tokens, image_size, **(overrides or {}))
            except InfeasibleBudget as error:
                infeasible.append(str(error))
                continue
            cost = sample_cost(dims, counts, generated)
            rows.append(_cost_row(budget, cost))
            costs.append({"method": method, "budget": budget, **cost})
    return _table(COST_HEADER, rows), costs, infeasible


QWEN_HEADER = ("budget", "image", "resized", "patch grid", "tower tokens", "visual tokens", "vis avg", "vision GMAC",
               "merger GMAC", "prefill TFLOPs", "decode GFLOPs", "total TFLOPs")


def qwen_flops_table(dims: QwenVLDims, method: str, budgets: Sequence[int | ImageTokens],
                     image_size: tuple[int, int] | None, text_tokens: int, generated: int,
                     overrides: dict | None = None) -> tuple[str, list[dict], list[str]]:
    """(table text, per-row costs, infeasible-budget messages) of one Qwen2-VL / Qwen2.5-VL sample with an image
    of `image_size`: vanilla first, then the method at every budget it can reach (`qwen_vl_planned_cost`)."""
    if image_size is None:
        raise ValueError("--image-size HEIGHT WIDTH: a Qwen2-VL image's cost depends on its size (dynamic resolution)")
    rows, costs, infeasible = [], [], []
    for name, budget in [("vanilla", None)] + ([(method, budget) for budget in budgets] if method != "vanilla" else []):
        label = "full" if budget is None else budget.label if isinstance(budget, ImageTokens) else budget
        try:
            cost = qwen_vl_planned_cost(dims, name, budget, image_size, text_tokens, generated, **(overrides or {}))
        except InfeasibleBudget as error:
            infeasible.append(str(error))
            continue
        rows.append([label, f"{image_size[0]}x{image_size[1]}",
                     "{}x{}".format(*cost["resized"]), "{}x{}".format(*cost["patch_grid"]), cost["vision_tokens"],
                     cost["visual_tokens"], f"{cost['visual_tokens_layer_average']:.2f}",
                     f"{cost['vision_macs'] / 1e9:.1f}", f"{cost['projector_macs'] / 1e9:.2f}",
                     f"{cost['prefill_flops'] / 1e12:.3f}", f"{cost['decode_flops'] / 1e9:.1f}",
                     f"{cost['total_flops'] / 1e12:.3f}"])
        costs.append({"method": name, "budget": None if budget is None else label, **cost})
    return _table(QWEN_HEADER, rows), costs, infeasible


def _pct(ours: float, reference: float) -> float:
    return 100 * (ours - reference) / reference


def _percent(ours: float, reference: float) -> str:
    return f"{_pct(ours, reference):+.1f}%"


def paper_report(methods_to_try: Sequence[str] = ("ficoco-v", "ficoco-l")) -> str:
    """`ficoco flops --paper`: FiCoCo's TFLOPs labels and memory figures for LLaVA-1.5-7B, and ours."""
    dims = llava_1_5_dims("7b")
    out = []
    out.append("FiCoCo TFLOPs labels, LLaVA-1.5-7B. Convention (LLM-Viewer, flops.md §5): 2 FLOPs per MAC x 32 layers")
    out.append("x (4nd^2 + 2n^2d + 3ndm), n = visual + text tokens, LLM prefill only (no vision tower, projector,")
    out.append("LM head or decode), every layer charged with the label's token count.")
    rows = []
    for label, visual in PAPER_LABELS:
        with_60 = nominal_tflops(dims, visual, 60)
        rows.append([label, visual, f"{with_60:.2f}", _percent(with_60, label),
                     "yes" if abs(with_60 - label) <= 0.03 * label else "NO",
                     f"{nominal_tflops(dims, visual, 64):.2f}", f"{nominal_tflops(dims, visual, 40):.2f}"])
    out.append(_table(("label T", "visual", "+60 text T", "vs label", "within 3%", "+64 text T", "+40 text T"), rows))
    out.append("")
    t64_60, t64_40 = nominal_tflops(dims, 64, 60), nominal_tflops(dims, 64, 40)
    out.append(f"The 1.5 label (64 tokens) is not reproduced with the 60 text tokens that give 8.5 / 3.3 / 2.4: 64 + 60 "
               f"gives {t64_60:.2f} T ({_percent(t64_60, 1.5)}).")
    out.append(f"64 + 40 gives {t64_40:.2f} T, the 40 text tokens of FiCoCo issue #4 ('following LLaVA-PruMerge'), but "
               f"40 then misses 3.3 and 2.4 ({nominal_tflops(dims, 192, 40):.2f} / {nominal_tflops(dims, 128, 40):.2f} T).")
    out.append("No single text length gives all four labels: they are nominal, rounded values (flops.md §6.2). "
               "The headline 5.7x = 8.5 / 1.5")
    out.append("and 82.4% = 1 - 1.5 / 8.5 are computed from the labels, not from a count.")
    out.append("")

    out.append("Our exact cost of the same budgets (flops.md §7): vision tower (patch embedding + layers 0..22) +")
    out.append("projector + LLM prefill with each layer's own token count + LM head on 1 position; 60 text tokens,")
    out.append("1 generated token (no decode step). 'after-encoder B' = any method that delivers B tokens to every")
    out.append("LLM layer and leaves the vision tower unreduced.")
    rows = []
    schedules = [("vanilla", None)] + [("after-encoder", b) for _, b in PAPER_LABELS[1:]]
    for name, budget in schedules:
        counts = vanilla_counts(dims, 60) if budget is None else counts_from_schedule(dims, 60, [budget] * dims.llm_layers)
        rows.append(_cost_row("vanilla" if budget is None else f"{name} {budget}", sample_cost(dims, counts, 1)))
    notes = []
    for method in methods_to_try:
        for _, budget in PAPER_LABELS[1:]:
            try:
                counts = planned_counts(dims, method, budget, 60)
            except Exception as error:  # an unreachable budget, or the methods registry not available yet
                notes.append(f"{method} {budget}: {type(error).__name__}: {error}")
                if not isinstance(error, ValueError):
                    break  # the registry itself failed; the other budgets would say the same
                continue
            rows.append(_cost_row(f"{method} {budget}", sample_cost(dims, counts, 1)))
    out.append(_table(COST_HEADER, rows))
    out.extend(f"not planned: {note}" for note in notes)
    out.append("(nominal T = the paper-style label of the realised layer average; FastV/PDrop/SparseVLM columns are")
    out.append(" those papers' MAC-style counts, printed by them as 'FLOPs'.)")
    out.append("")

    out.append(paper_memory_report(dims))
    return "\n".join(out)


def paper_memory_tokens(dims: ModelDims, row: str) -> float:
    """Prefill length n of a paper memory row: 576 + 60 (vanilla) and 64 + 60 (FiCoCo-V), the text
    length of App. Table 10. FiCoCo-L / -VL change the count inside the LLM and the paper gives no
    schedule, so their n is the one implied by the paper's own FP16 KV column (KV MB / KV per token)."""
    if row == "vanilla":
        return dims.visual_tokens + NOMINAL_TEXT_TOKENS
    if row == "FiCoCo-V":
        return 64 + NOMINAL_TEXT_TOKENS
    fp16_kv_mb = {(name, precision): kv for name, precision, _, kv in PAPER_MEMORY}[(row, "FP16")]
    return fp16_kv_mb * 1e6 / kv_cache_bytes(dims, 1, 2.0)


def paper_memory_rows(dims: ModelDims, convention: str = "llm-viewer") -> list[dict]:
    """Every paper memory row with our prefill memory access (decimal GB) two ways:
    `ours_gb` with weights, activations and KV cache all at the row's width (W=A=KV), and
    `ours_a16_gb` with weights and KV cache at the row's width and activations FP16."""
    rows = []
    for row, precision, paper_gb, paper_kv_mb in PAPER_MEMORY:
        width = PRECISION_BYTES[precision]
        n = paper_memory_tokens(dims, row)
        ours = llm_viewer_memory_access_bytes(dims, n, width, width, width, convention=convention) / 1e9
        ours_a16 = llm_viewer_memory_access_bytes(dims, n, width, 2.0, width, convention=convention) / 1e9
        rows.append({"row": row, "precision": precision, "tokens": n, "paper_gb": paper_gb,
                     "paper_kv_mb": paper_kv_mb, "kv_mb": kv_cache_bytes(dims, n, width) / 1e6,
                     "ours_gb": ours, "ours_a16_gb": ours_a16,
                     "diff_pct": _pct(ours, paper_gb), "diff_a16_pct": _pct(ours_a16, paper_gb)})
    return rows


def paper_memory_report(dims: ModelDims) -> str:
    """The memory part of `ficoco flops --paper`: the paper's figure, ours and the difference, every row."""
    out = []
    out.append("Memory, LLaVA-1.5-7B (paper v4 Tables 10/11, FiCoCo-VL v1; LLM-Viewer theoretical values, flops.md §6.3).")
    out.append("Read as LLM-Viewer's prefill MEMORY ACCESS: bytes loaded and stored by every operator (weights read once,")
    out.append("activations in and out, KV written and read, the h x n x n score matrices), summed over the 32 decoder layers")
    out.append("plus the LM head on 1 position; decimal GB (the KV column matches 1e6-byte MB). No vision tower, projector or")
    out.append("embedding table, as for the TFLOPs label. n = visual + 60 text tokens; FiCoCo-L / -VL: n implied by the paper's")
    out.append("FP16 KV column. 'W=A=KV': weights, activations and KV at the row's width; 'A16': activations kept FP16.")
    table = paper_memory_rows(dims)
    rows = []
    for r in table:
        tokens = f"{r['tokens']:.0f}" if float(r["tokens"]).is_integer() else f"{r['tokens']:.1f}"
        rows.append([r["row"], r["precision"], tokens, f"{r['paper_kv_mb']:.1f}", f"{r['kv_mb']:.1f}",
                     f"{r['paper_gb']:.1f}", f"{r['ours_gb']:.2f}", f"{r['diff_pct']:+.1f}%",
                     "yes" if abs(r["diff_pct"]) <= 5 else "NO", f"{r['ours_a16_gb']:.2f}",
                     f"{r['diff_a16_pct']:+.1f}%", "yes" if abs(r["diff_a16_pct"]) <= 5 else "NO"])
    out.append(_table(("row", "prec", "tokens", "paper KV MB", "KV MB", "paper GB", "W=A=KV GB", "diff", "<=5%",
                       "A16 GB", "diff", "<=5%"), rows))
    out.append(f"KV cache per token: 2 x {dims.llm_layers} layers x {kv_width(dims)} x 2 B = "
               f"{kv_cache_bytes(dims, 1, 2.0):,.0f} B (FP16); the vanilla and FiCoCo-V KV rows match the "
               "paper's at every width (FiCoCo-L / -VL by construction).")
    n_vanilla, n_reduced = paper_memory_tokens(dims, "vanilla"), paper_memory_tokens(dims, "FiCoCo-V")
    parts = llm_viewer_memory_access_parts(dims, n_vanilla, 2.0)
    names = (("weights", "decoder weights"), ("lm_head", "LM head"), ("linear_io", "linear-layer activations"),
             ("kv_store", "KV store"), ("attention_io", "Q/K/V loads and A.V out"),
             ("attention_scores", "score matrices 4hn^2"), ("elementwise", "norms, adds, activation"))
    terms = [f"{label} {parts[key] / 1e9:.2f}" for key, label in names]
    out.append(f"Vanilla FP16 at {n_vanilla} tokens, GB: " + " + ".join(terms[:4]) + " +")
    out.append("  " + " + ".join(terms[4:]) + f" = {parts['total'] / 1e9:.2f} GB ({_percent(parts['total'] / 1e9, 22.4)} vs 22.4).")
    exact = [llm_viewer_memory_access_bytes(dims, n, 2.0, convention="exact") / 1e9 for n in (n_vanilla, n_reduced)]
    out.append(f"Counting an add's two inputs and the SwiGLU product m wide (convention 'exact', not LLM-Viewer's): "
               f"{exact[0]:.2f} GB ({_percent(exact[0], 22.4)}) and {exact[1]:.2f} GB ({_percent(exact[1], 14.4)}).")
    t40, t64 = (llm_viewer_memory_access_bytes(dims, dims.visual_tokens + t, 2.0) / 1e9 for t in (40, 64))
    out.append(f"Text length: 576 + 40 gives {t40:.2f} GB, 576 + 64 gives {t64:.2f} GB.")
    params = parameter_counts(dims)
    out.append(f"Resident weights (FP16): vision tower {params['vision'] * 2 / 1e9:.3f} GB + projector "
               f"{params['projector'] * 2 / 1e9:.3f} GB + LLM {params['llm'] * 2 / 1e9:.2f} GB (incl. embeddings and LM head) "
               f"= {params['total'] * 2 / 1e9:.2f} GB.")
    out.append(f"Resident memory instead (all weights {weight_memory_bytes(dims, 'fp16') / 1e9:.2f} GB + KV) gives "
               f"{(weight_memory_bytes(dims, 'fp16') + kv_cache_bytes(dims, n_vanilla, 2.0)) / 1e9:.2f} GB, and "
               f"LLM-Viewer's memory_consumption {llm_viewer_prefill_memory_bytes(dims, n_vanilla, 2.0) / 1e9:.2f} GB: "
               "neither is the paper's 22.4.")
    weights_only = (parts["weights"] + parts["lm_head"]) / 1e9
    both = [f"{r['row']} {r['precision']}" for r in table if abs(r["diff_pct"]) <= 5 and abs(r["diff_a16_pct"]) <= 5]
    uniform = [f"{r['row']} {r['precision']}" for r in table if abs(r["diff_pct"]) <= 5 and abs(r["diff_a16_pct"]) > 5]
    a16 = [f"{r['row']} {r['precision']}" for r in table if abs(r["diff_pct"]) > 5 and abs(r["diff_a16_pct"]) <= 5]
    missed = [f"{r['row']} {r['precision']}" for r in table if abs(r["diff_pct"]) > 5 and abs(r["diff_a16_pct"]) > 5]
    out.append(f"Within 5%: {', '.join(both)}; with W=A=KV only: {', '.join(uniform)}; with A16 only: {', '.join(a16)}.")
    out.append(f"Missed by both: {', '.join(missed)}.")
    out.append("NOT reproduced: the paper's quantised rows follow no single bit setting (vanilla INT8 = 22.4 / 2 needs "
               "8-bit activations, FiCoCo-V INT8 / INT4 need 16-bit ones);")
    out.append(f"vanilla INT4 6.2 lies between W4A4 and W4A8 "
               f"({llm_viewer_memory_access_bytes(dims, n_vanilla, 0.5) / 1e9:.2f} / "
               f"{llm_viewer_memory_access_bytes(dims, n_vanilla, 0.5, 1.0, 0.5) / 1e9:.2f} GB); FiCoCo-VL 13.0 GB is "
               f"below the {weights_only:.2f} GB read for the weights alone, so no token count gives it, and")
    out.append(f"FiCoCo-L INT4 3.3 GB equals the INT4 weights alone ({weights_only / 4:.2f} GB). We do not fit terms "
               "to these rows.")
    return "\n".join(out)


def _budget_argument(text: str) -> int | ImageTokens:
    """--budgets: a positive integer, or n<tokens> (a count for every image)."""
    if text.isdigit() and int(text) > 0:
        return int(text)
    if image_tokens(text) is not None:
        return image_tokens(text)
    raise argparse.ArgumentTypeError(f"budget {text!r}: valid: a positive integer, or n<tokens> (e.g. n600)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ficoco flops",
        description="Exact FLOPs (vision, projector, prefill, decode), the literature's conventions and the KV cache "
                    "for a model shape, method and budgets, from the planned schedule (no model needed).")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model-config", help="a HF LLaVA, LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL config.json")
    source.add_argument("--shape", choices=SHAPES, help="a published shape (default llava-1.5-7b)")
    parser.add_argument("--method", default="vanilla", help="method name (see `ficoco methods`); default vanilla")
    parser.add_argument("--budgets", type=_budget_argument, nargs="*", default=[],
                        help="visual-token budgets, e.g. 192 128 64; on Qwen2-VL also n<tokens>, a count for every "
                             "image, e.g. n600")
    parser.add_argument("--text-tokens", type=int, default=NOMINAL_TEXT_TOKENS, help="text tokens per prompt (60)")
    parser.add_argument("--generated", type=int, default=1, help="generated tokens per sample (1 = prefill only)")
    parser.add_argument("--overrides", default=None, help="method hyperparameter overrides as a JSON object")
    parser.add_argument("--json", action="store_true", help="print the sample_cost dicts as JSON instead of a table")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
                        help="the image's size in pixels: needed on LLaVA-NeXT, whose cost depends on it")
    parser.add_argument("--paper", action="store_true", help="reproduce FiCoCo's TFLOPs and memory figures (LLaVA-1.5-7B)")
    args = parser.parse_args(argv)

    if args.paper:
        print(paper_report())
        return 0
    if args.method != "vanilla" and not args.budgets:
        parser.error(f"--method {args.method} needs --budgets (e.g. --budgets 192 128 64)")
    try:
        dims = dims_for(args.model_config, args.shape)
        image_size = None if args.image_size is None else tuple(args.image_size)
        counts = [budget.label for budget in args.budgets if isinstance(budget, ImageTokens)]
        if counts and not isinstance(dims, QwenVLDims):
            raise ValueError(f"--budgets {' '.join(counts)}: a count for every image is a Qwen2-VL-family budget; "
                             f"here give visual tokens (of the nominal image)")
        if isinstance(dims, QwenVLDims):
            table, costs, infeasible = qwen_flops_table(dims, args.method, args.budgets, image_size, args.text_tokens,
                                                        args.generated, _overrides(args.overrides))
        else:
            table, costs, infeasible = flops_table(dims, args.method, args.budgets, args.text_tokens, args.generated,
                                                   _overrides(args.overrides), image_size)
    except ValueError as error:
        print(f"ficoco flops: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(costs, indent=2))
    else:
        image = "" if args.image_size is None else f", a {args.image_size[0]}x{args.image_size[1]} image"
        print(f"{args.model_config or args.shape or 'llava-1.5-7b'}: method {args.method}, "
              f"{args.text_tokens} text tokens, {args.generated} generated token(s){image}")
        print(table)
    for message in infeasible:
        print(f"ficoco flops: {message}", file=sys.stderr)
    return 2 if infeasible else 0


if __name__ == "__main__":
    sys.exit(main())

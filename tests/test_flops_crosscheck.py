"""Cross-check: torch's FlopCounterMode on the forward that actually ran vs our analytic count.

A tiny LLaVA (platform-notes §5) with **eager** attention, so the attention matmuls are counted
(CPU SDPA is not, platform-notes §7). FlopCounterMode counts only matmuls and convolutions
(aten.mm / addmm / bmm / convolution), so element-wise work is excluded on both sides; the tests
assert no other op contributed. FlopCounterMode reports FLOPs = 2 · MACs.

Parts are read from the module breakdown: the whole vision tower, the projector, and for the LLM
every decoder layer's `self_attn` and `mlp` plus the LM head. The LLM adapter computes its score
rows in layer pre-hooks, outside `self_attn`, so that work stays out of the LLM part and shows up
only in the global total (selection overhead, reported separately, flops.md §7.5). A vision
reduction runs inside the tower; its merge products are part of the tower's count and small
(< 1 % here), inside the 2 % tolerance.

Reduced runs: `ficoco.apply` with FiCoCo-V / -L / -VL and layer ranges that fit the tiny model,
counts from `handle.last_counts()`; and, independent of the adapter, a run reduced with plain
hooks (a CLIP layer that reduces between attention and MLP; an LLM drop at layer 2).
"""
from __future__ import annotations

import types

import pytest
import torch
from helpers_tiny import COUNTED_OPS, counted
from torch.utils.flop_counter import FlopCounterMode

from ficoco import flops
from ficoco.dims import ModelDims

IMAGE = 5
TOLERANCE = 0.02


def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              image_size=28, patch_size=7, projection_dim=32)        # 16 patches + CLS
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2,               # GQA: K/V width 16
                       max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, image_seq_length=16,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")
    return model, ModelDims.from_config(config)


def assert_close(measured: float, ours: float, what: str) -> None:
    assert ours > 0
    assert abs(measured - ours) <= TOLERANCE * ours, f"{what}: FlopCounterMode {measured} vs ours {ours}"


def test_vanilla_forward_matches_exact_count():
    model, dims = tiny_llava()
    text_before, text_after = [1, 10, 11], [12, 13, 14]
    ids = torch.tensor([text_before + [IMAGE] * 16 + text_after])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 28, 28),
              logits_to_keep=1)
    measured = counted(counter)
    assert measured["ops"] <= COUNTED_OPS

    # HF runs every CLIP layer (4), although LLaVA reads the output of layer 2
    counts = {"vision": [[17, 17]] * 4, "visual_delivered": 16, "llm": [22] * 4, "llm_visual": [16] * 4}
    cost = flops.sample_cost(dims, counts, generated_tokens=1, logits_positions=1)
    assert_close(measured["vision"], cost["vision_flops"], "vision")
    assert_close(measured["projector"], cost["projector_flops"], "projector")
    assert_close(measured["prefill"], cost["prefill_flops"], "prefill")
    assert_close(measured["total"], cost["total_flops"], "total")


def _reducing_clip_forward(keep: int):
    """A CLIP encoder layer forward that drops to CLS + the first `keep` patches between attention and MLP."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        residual = hidden_states
        attended, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), attention_mask=attention_mask,
                                     **kwargs)
        hidden_states = (residual + attended)[:, : 1 + keep]
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))

    return forward


def _llm_drop_hook(full_length: int, keep_positions: torch.Tensor):
    """Forward pre-hook for LLM layers >= K: slice hidden states, RoPE and the 4-D mask (platform-notes §4.2)."""

    def hook(layer, args, kwargs):
        hidden = args[0]
        cos, sin = kwargs["position_embeddings"]
        if cos.shape[1] == full_length:                         # prefill (cos still spans the full prompt)
            if hidden.shape[1] == full_length:
                hidden = hidden[:, keep_positions]
            kwargs["position_embeddings"] = (cos[:, keep_positions], sin[:, keep_positions])
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"][:, keep_positions]
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                kwargs["attention_mask"] = mask[:, :, keep_positions][:, :, :, keep_positions]
        return (hidden, *args[1:]), kwargs

    return hook


def test_reduced_forward_matches_exact_count():
    model, dims = tiny_llava()
    encoder = model.model.vision_tower.encoder
    # CLIP layer 1 reduces 17 -> 9 between attention and MLP; layers 2 and 3 then run on 9
    encoder.layers[1].forward = types.MethodType(_reducing_clip_forward(keep=8), encoder.layers[1])
    # the LLM receives 8 image tokens (3 + 8 + 3 = 14); layers 2 and 3 keep 4 of them (10 tokens)
    ids = torch.tensor([[1, 10, 11] + [IMAGE] * 8 + [12, 13, 14]])
    keep_positions = torch.tensor([0, 1, 2, 3, 5, 7, 9, 11, 12, 13])
    hooks = [model.model.language_model.layers[i].register_forward_pre_hook(
        _llm_drop_hook(14, keep_positions), with_kwargs=True) for i in (2, 3)]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 28, 28),
                    logits_to_keep=1, use_cache=False)
    for hook in hooks:
        hook.remove()
    assert out.logits.shape[1] == 1
    measured = counted(counter)
    assert measured["ops"] <= COUNTED_OPS

    counts = {"vision": [[17, 17], [17, 9], [9, 9], [9, 9]], "visual_delivered": 8,
              "llm": [14, 14, 10, 10], "llm_visual": [8, 8, 4, 4]}
    cost = flops.sample_cost(dims, counts, generated_tokens=1, logits_positions=1)
    vanilla = flops.sample_cost(dims, {"vision": [[17, 17]] * 4, "visual_delivered": 16, "llm": [22] * 4,
                                       "llm_visual": [16] * 4}, generated_tokens=1)
    assert cost["prefill_flops"] < vanilla["prefill_flops"] and cost["vision_flops"] < vanilla["vision_flops"]
    assert_close(measured["vision"], cost["vision_flops"], "vision")
    assert_close(measured["projector"], cost["projector_flops"], "projector")
    assert_close(measured["prefill"], cost["prefill_flops"], "prefill")
    assert_close(measured["total"], cost["total_flops"], "total")


# ficoco.apply on the tiny model: 16 patches, CLIP layers 0..2 run (feature layer -2 of 4), 4 LLM layers
APPLIED = [
    ("vanilla", None, {}),
    ("ficoco-v", 8, {"start": 1, "end": 2}),
    ("ficoco-l", 8, {"start": 1, "window": 2}),
    ("ficoco-vl", 6, {"v_start": 1, "v_end": 2, "l_start": 1, "l_window": 2}),
    # between attention and MLP: the reducing layers' attention on all tokens, their MLP on the kept ones
    ("ficoco-l", 10, {"start": 0, "window": 2, "placement": "attention"}),
    # after the projector: it ran on all 16 patches, the LLM gets 8
    ("divprune", 8, {}),
]


@pytest.mark.parametrize("method, budget, overrides", APPLIED,
                         ids=[row[0] + ("-after-attention" if row[2].get("placement") else "") for row in APPLIED])
def test_applied_method_forward_matches_exact_count(method, budget, overrides):
    import ficoco

    model, dims = tiny_llava()
    handle = ficoco.apply(model, method, budget, **overrides)
    ids = torch.tensor([[1, 10, 11] + [IMAGE] * 16 + [12, 13, 14]])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 28, 28),
              logits_to_keep=1)
    counts = handle.last_counts()[0]
    handle.remove()
    measured = counted(counter)
    assert measured["ops"] <= COUNTED_OPS

    # the executed counts are those the method planned for this budget, and reduced unless vanilla
    assert counts["llm_visual"] == list(handle.plan.llm_visual)
    assert counts["llm"] == [6 + v for v in counts["llm_visual"]]
    if handle.plan.llm_mlp_visual is not None:
        assert counts["llm_mlp"] == [6 + v for v in handle.plan.llm_mlp_visual] != counts["llm"]
    if method == "divprune":
        assert counts["projector_tokens"] == 16 > counts["visual_delivered"]
    if method != "vanilla":
        assert sum(counts["llm_visual"]) / 4 <= budget < 16
    cost = flops.sample_cost(dims, counts, generated_tokens=1, logits_positions=1)
    assert_close(measured["vision"], cost["vision_flops"], "vision")
    assert_close(measured["projector"], cost["projector_flops"], "projector")
    assert_close(measured["prefill"], cost["prefill_flops"], "prefill")
    # selection work lies outside the covered modules: never negative, zero for vanilla
    overhead = measured["total"] - measured["covered"]
    assert overhead >= 0
    if method == "vanilla":
        assert overhead == 0


@pytest.mark.parametrize("method, budget, overrides", [("vanilla", None, {}), ("ficoco-v", 6, {"start": 0})])
def test_a_prompt_with_two_images_costs_two_tower_passes(method, budget, overrides):
    """Each image attends within itself: a prompt with two images records two tower passes (`vision_crops`),
    not one sequence of twice the tokens, and its cost is what the forward counted."""
    import ficoco

    model, dims = tiny_llava()
    ids = torch.tensor([[1, 10] + [IMAGE] * 16 + [11] + [IMAGE] * 16 + [12, 13, 14]])
    with ficoco.apply(model, method, budget, **overrides) as handle, torch.no_grad(), \
            FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 3, 28, 28),
              logits_to_keep=1)
    counts, = handle.last_counts()
    assert counts["vision_crops"] == 2 and counts["vision"] == [list(pair) for pair in handle.plan.vision_counts] * 2
    cost = flops.sample_cost(dims, counts, generated_tokens=1, logits_positions=1)
    measured = counted(counter)
    assert_close(measured["vision"], cost["vision_flops"], "vision")
    if method == "vanilla":                     # nothing reduced: the tower count is exact
        assert measured["vision"] == cost["vision_flops"]


@pytest.mark.parametrize("new_tokens", [1, 4])
def test_generate_matches_prefill_plus_decode(new_tokens):
    """generate(G tokens) = one prefill + G - 1 decode steps with kv_l(t) = n_l + t."""
    model, dims = tiny_llava()
    ids = torch.tensor([[1, 10, 11] + [IMAGE] * 16 + [12, 13, 14]])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                pixel_values=torch.randn(1, 3, 28, 28), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False)
    assert output.shape[1] - ids.shape[1] == new_tokens
    measured = counted(counter)
    assert measured["ops"] <= COUNTED_OPS
    counts = {"vision": [[17, 17]] * 4, "visual_delivered": 16, "llm": [22] * 4, "llm_visual": [16] * 4}
    cost = flops.sample_cost(dims, counts, generated_tokens=new_tokens)
    assert cost["decode_steps"] == new_tokens - 1
    assert_close(measured["total"], cost["total_flops"], "generate total")
    if new_tokens > 1:
        # the decode part alone (the prefill part is checked above): G - 1 steps, not G
        measured_decode = measured["total"] - (cost["vision_flops"] + cost["projector_flops"] + cost["prefill_flops"])
        assert_close(measured_decode, cost["decode_flops"], "decode")


@pytest.mark.parametrize("method, budget, overrides", APPLIED[1:3] + APPLIED[4:5],
                         ids=["ficoco-v", "ficoco-l", "ficoco-l-after-attention"])
def test_generate_with_applied_method_decodes_on_the_reduced_cache(method, budget, overrides):
    """Decode step t runs layer l with kv_l(t) = n_l + t on the reduced per-layer cache lengths
    (FiCoCo-V: 14 in every layer; FiCoCo-L: a different length per layer)."""
    import ficoco

    model, dims = tiny_llava()
    handle = ficoco.apply(model, method, budget, **overrides)
    ids = torch.tensor([[1, 10, 11] + [IMAGE] * 16 + [12, 13, 14]])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 28, 28),
                       max_new_tokens=4, min_new_tokens=4, do_sample=False)
    counts = handle.last_counts()[0]
    handle.remove()
    assert counts["llm"] != [22] * 4
    measured = counted(counter)
    assert measured["ops"] <= COUNTED_OPS
    cost = flops.sample_cost(dims, counts, generated_tokens=4)
    # the decoder layers and LM head over the prefill and the 3 decode steps
    assert_close(measured["prefill"], cost["prefill_flops"] + cost["decode_flops"], "prefill + decode")
    # the decode steps alone (the prefill part is checked in the forward test above)
    assert_close(measured["prefill"] - cost["prefill_flops"], cost["decode_flops"], "decode")
    assert_close(measured["vision"], cost["vision_flops"], "vision")

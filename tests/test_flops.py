"""ficoco.flops against hand arithmetic on small dimensions and against the spec's reference numbers.

Every expected value is written out as arithmetic in the test (flops.md §3-§7), never obtained by
calling the code under test a second time. Reference numbers come from spec flops.md §3-§6.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from ficoco import flops, methods
from ficoco.contract import Plan
from ficoco.dims import ModelDims, llava_1_5_dims

# A small model: CLIP d_v=4, m_v=8, 8x8 image with 4x4 patches (4 patches + CLS);
# LLM d=8, m=16, 4 heads with 2 KV heads (kv width 4), 3 layers, vocab 10; feature layer -2 of 3.
SMALL = ModelDims(
    vision_layers=3, vision_hidden=4, vision_mlp=8, vision_heads=2, image_size=8, patch_size=4,
    feature_layer=-2, select_strategy="default",
    llm_layers=3, llm_hidden=8, llm_mlp=16, llm_heads=4, llm_kv_heads=2, vocab_size=10, projector_hidden=8,
)
LLAVA_7B = llava_1_5_dims("7b")
LLAVA_13B = llava_1_5_dims("13b")


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ------------------------------------------------------------------------------------------ formulas


def test_clip_layer_macs_by_hand():
    # n=3, d=4, m=8: 4·3·16 + 2·9·4 + 2·3·4·8 = 192 + 72 + 192
    assert flops.clip_layer_macs(SMALL, 3) == 456
    # reducing between attention and MLP: attention on 3, MLP on 2 -> 192 + 72 + 2·2·4·8 = 128
    assert flops.clip_layer_macs(SMALL, 3, 2) == 392


def test_llama_layer_macs_gqa_and_mha_by_hand():
    # n=3, d=8, m=16, kv width = 8/4·2 = 4
    # Q,O 2·3·64 = 384; K,V 2·3·8·4 = 192; QKᵀ+AV 2·9·8 = 144; MLP 3·3·8·16 = 1152
    assert flops.llama_layer_macs(SMALL, 3) == 384 + 192 + 144 + 1152
    mha = replace(SMALL, llm_kv_heads=4)
    # MHA: 4·n·d² + 2·n²·d + 3·n·d·m = 768 + 144 + 1152
    assert flops.llama_layer_macs(mha, 3) == 2064
    # attention on 3 tokens, the MLP on 1 (a reduction between them): MLP 3·1·8·16 = 384
    assert flops.llama_layer_macs(SMALL, 3, 1) == 384 + 192 + 144 + 384


def test_decode_layer_lm_head_projector_patch_embedding_by_hand():
    # one token, kv 5: Q,O 2·64 + K,V 2·8·4 + scores 2·5·8 + MLP 3·8·16 = 128 + 64 + 80 + 384
    assert flops.llama_decode_layer_macs(SMALL, 5) == 656
    assert flops.lm_head_macs(SMALL, 2) == 2 * 8 * 10
    # 4 tokens · (d_v·p + p·d) = 4 · (4·8 + 8·8)
    assert flops.projector_macs(SMALL, 4) == 4 * (32 + 64)
    # 4 patches · (3·4·4) · 4
    assert flops.patch_embedding_macs(SMALL) == 4 * 48 * 4


def test_decode_step_uses_each_layers_cache_length():
    # layers with 5, 3, 2 prefill tokens; step t=2 -> kv 7, 5, 4
    # per layer: 128 + 64 + 384 = 576 plus 2·kv·8 -> 576+112, 576+80, 576+64; LM head 8·10
    assert flops.decode_step_macs(SMALL, [5, 3, 2], 2) == (576 + 112) + (576 + 80) + (576 + 64) + 80
    with pytest.raises(ValueError, match="t must be >= 1"):
        flops.decode_step_macs(SMALL, [5, 3, 2], 0)


# ------------------------------------------------------------------------------------------ sample_cost


def small_counts() -> dict:
    # vision: layer 0 full (5 tokens), layer 1 reduces between attention and MLP (5 -> 3)
    # delivered 3 (a projector-side method may deliver other than the tower's last count); LLM: text 2 tokens;
    # visual 3, 3, 1 per layer
    return {"vision": [[5, 5], [5, 3]], "visual_delivered": 3, "llm": [5, 5, 3], "llm_visual": [3, 3, 1]}


def test_sample_cost_parts_by_hand():
    cost = flops.sample_cost(SMALL, small_counts(), generated_tokens=3)
    # vision: patch embedding on 5-1 = 4 patches: 4·48·4 = 768
    #   layer [5,5]: 4·5·16 + 2·25·4 + 2·5·4·8 = 320 + 200 + 320 = 840
    #   layer [5,3]: 320 + 200 + 2·3·4·8 = 712
    assert cost["vision_patch_embed_macs"] == 768
    assert cost["vision_layers_macs"] == 840 + 712
    assert cost["vision_macs"] == 768 + 1552
    # projector on 3 delivered tokens: 3·(32 + 64)
    assert cost["projector_macs"] == 288
    # prefill layers: n=5: Q,O 2·5·64=640, K,V 2·5·8·4=320, scores 2·25·8=400, MLP 3·5·8·16=1920 -> 3280
    #                 n=3: 384 + 192 + 144 + 1152 = 1872
    assert cost["prefill_layers_macs"] == 3280 + 3280 + 1872
    assert cost["prefill_lm_head_macs"] == 80                       # 1 position · 8 · 10
    assert cost["prefill_macs"] == 8432 + 80
    # G=3 generated tokens -> 2 decode steps (t=1, 2); per layer 576 + 16·kv, LM head 80
    step1 = (576 + 16 * 6) + (576 + 16 * 6) + (576 + 16 * 4) + 80    # kv 6, 6, 4
    step2 = (576 + 16 * 7) + (576 + 16 * 7) + (576 + 16 * 5) + 80    # kv 7, 7, 5
    assert cost["decode_steps"] == 2
    assert cost["decode_step_first_macs"] == step1
    assert cost["decode_step_last_macs"] == step2
    assert cost["decode_macs"] == step1 + step2
    assert cost["total_macs"] == 2320 + 288 + 8512 + step1 + step2
    for key in ("vision", "projector", "prefill", "decode", "total", "legacy_fastv"):
        assert cost[f"{key}_flops"] == 2 * cost[f"{key}_macs"]


def test_sample_cost_legacy_conventions_by_hand():
    cost = flops.sample_cost(SMALL, small_counts(), generated_tokens=1)
    # FastV: 4nd² + 2n²d + 2ndm over the full sequence (MHA form even for GQA)
    #   n=5: 4·5·64 + 2·25·8 + 2·5·8·16 = 1280 + 400 + 1280 = 2960; n=3: 768 + 144 + 768 = 1680
    assert cost["legacy_fastv_macs"] == 2960 + 2960 + 1680
    # SparseVLM: 3 FFN matrices, full sequence: n=5: 1280+400+1920 = 3600; n=3: 768+144+1152 = 2064
    assert cost["legacy_sparsevlm_macs"] == 3600 + 3600 + 2064
    # PDrop: 3 FFN matrices, image tokens only: v=3: 2064; v=1: 4·64 + 2·8 + 3·8·16 = 256+16+384 = 656
    assert cost["legacy_pdrop_macs"] == 2064 + 2064 + 656
    # nominal: L·f(avg visual + 60), avg = 7/3; GQA-aware f as LLM-Viewer counts K/V widths
    n = 7 / 3 + 60
    f = 2 * n * 64 + 2 * n * 8 * 4 + 2 * n * n * 8 + 3 * n * 8 * 16
    assert cost["legacy_nominal_macs"] == pytest.approx(3 * f, rel=1e-12)
    assert cost["legacy_nominal_tflops"] == pytest.approx(2 * 3 * f / 1e12, rel=1e-12)
    assert cost["visual_tokens_layer_average"] == pytest.approx(7 / 3)
    assert cost["text_tokens"] == 2


def test_sample_cost_kv_cache_and_decode_bookkeeping():
    cost = flops.sample_cost(SMALL, small_counts(), generated_tokens=4)
    # per cached token per layer: 2 (K, V) · kv width 4 values; prefill cache 5 + 5 + 3 = 13 tokens
    assert cost["kv_cache_bytes_fp16"] == 2 * 4 * 2 * 13
    assert cost["kv_cache_bytes_fp32"] == 2 * 4 * 4 * 13
    assert cost["kv_cache_bytes_int8"] == 2 * 4 * 1 * 13
    assert cost["kv_cache_bytes_int4"] == 2 * 4 * 0.5 * 13
    # after generating 4 tokens, 3 were fed back: 13 + 3·3 layers
    assert cost["kv_cache_final_bytes_fp16"] == 2 * 4 * 2 * (13 + 9)
    # steps are linear in t: last - first = 2·d·L·(steps - 1) = 2·8·3·2
    assert cost["decode_step_last_macs"] - cost["decode_step_first_macs"] == 96


def test_sample_cost_one_generated_token_has_no_decode_and_no_image_has_no_vision():
    text_only = {"vision": [], "visual_delivered": 0, "llm": [4, 4, 4], "llm_visual": [0, 0, 0]}
    cost = flops.sample_cost(SMALL, text_only, generated_tokens=1, logits_positions=4)
    assert cost["vision_macs"] == 0 and cost["projector_macs"] == 0
    assert cost["decode_macs"] == 0 and cost["decode_steps"] == 0
    assert cost["prefill_lm_head_macs"] == 4 * 8 * 10
    assert cost["legacy_pdrop_macs"] == 0


def test_sample_cost_optional_keys_projector_tokens_and_overhead():
    counts = {**small_counts(), "projector_tokens": 4, "overhead_macs": 1000}
    cost = flops.sample_cost(SMALL, counts, generated_tokens=1)
    assert cost["projector_macs"] == 4 * 96
    assert cost["overhead_macs"] == 1000
    assert cost["total_with_overhead_macs"] == cost["total_macs"] + 1000


def test_sample_cost_is_json_able_floats():
    cost = flops.sample_cost(LLAVA_7B, flops.vanilla_counts(LLAVA_7B), generated_tokens=8)
    assert all(isinstance(value, float) for value in cost.values())
    assert json.loads(json.dumps(cost)) == cost


def test_sample_cost_rejects_bad_records():
    with pytest.raises(ValueError, match="lacks"):
        flops.sample_cost(SMALL, {"llm": [1, 1, 1]}, 1)
    with pytest.raises(ValueError, match="lists 2 layers; the model has 3"):
        flops.sample_cost(SMALL, {**small_counts(), "llm": [5, 5]}, 1)
    with pytest.raises(ValueError, match="generated_tokens"):
        flops.sample_cost(SMALL, small_counts(), -1)


@pytest.mark.parametrize("change, logits_positions, message", [
    ({"vision": [[0, 0], [0, 0]]}, 1, "a tower pass whose first layer ran on 0 tokens; valid: >= 1"),
    ({"vision": [[5, 5], [3, 4]]}, 1, r"counts\['vision'\]\[1\] = \[3, 4\]: its MLP ran on more tokens"),
    ({"vision": [[5, 5], [5, -1]]}, 1, r"counts\['vision'\] holds -1: token counts and MACs are whole numbers"),
    ({"llm": [5, 5, -3]}, 1, r"counts\['llm'\] holds -3"),
    ({"llm_visual": [3, 6, 1]}, 1, "LLM layer 1: 5 tokens, 6 of them visual"),
    ({"llm_mlp": [5, 50, 3]}, 1, "LLM layer 1: 5 tokens, 3 of them visual, 50 in its MLP"),
    ({"visual_delivered": 2}, 1, r"counts\['llm_visual'\]\[0\] = 3: more visual tokens in LLM layer 0 than the 2"),
    ({"llm": [5, 6, 3], "llm_visual": [3, 4, 1]}, 1, r"counts\['llm_visual'\]\[1\] = 4: more visual tokens in LLM "
                                                      "layer 1 than the 3 delivered"),
    ({"overhead_macs": 1.5}, 1, r"counts\['overhead_macs'\] holds 1.5"),
    ({"visual_delivered": True}, 1, r"counts\['visual_delivered'\] holds True"),
    ({}, 0, "logits_positions = 0: valid: 1 .generate. to the 3 positions"),
    ({}, 4, "logits_positions = 4: valid: 1 .generate. to the 3 positions"),
])
def test_sample_cost_refuses_counts_no_forward_can_have_run(change, logits_positions, message):
    """Each of these would cost a negative or an impossible amount (a patch embedding of -1 patches, an MLP
    on tokens the layer never held, an LM head on no position) without an error."""
    with pytest.raises(ValueError, match=message):
        flops.sample_cost(SMALL, {**small_counts(), **change}, 1, logits_positions=logits_positions)


# ------------------------------------------------------------------------------------------ records


def test_vanilla_counts_record():
    counts = flops.vanilla_counts(LLAVA_7B, text_tokens=60)
    assert counts["vision"] == [[577, 577]] * 23
    assert counts["visual_delivered"] == 576
    assert counts["llm"] == [636] * 32
    assert counts["llm_visual"] == [576] * 32


def test_counts_from_plan_uses_the_schedule():
    # FiCoCo-L at B=192 (methods.md §4): 576 for layers 0..3, then 460, 344, 228, 112, then 112
    counts = flops.counts_from_plan(LLAVA_7B, methods.get("ficoco-l").plan(LLAVA_7B, 192), 60)
    assert counts["llm_visual"] == [576] * 4 + [460, 344, 228, 112] + [112] * 24
    assert counts["llm"][:5] == [636, 636, 636, 636, 520]
    assert counts["visual_delivered"] == 576
    assert counts["vision"] == [[577, 577]] * 23
    cost = flops.sample_cost(LLAVA_7B, counts, 1)
    assert cost["visual_tokens_layer_average"] == 191.75           # (4·576 + 1144 + 24·112) / 32
    plan = Plan.from_schedule("custom", "vision", 2, {}, {"vision": None, "vision_counts": [[5, 5], [5, 3]],
                                                         "delivered": 2, "llm": None, "llm_visual": [2, 2, 2],
                                                         "layer_average": 2.0})
    assert flops.counts_from_plan(SMALL, plan, text_tokens=1) == {
        "vision": [[5, 5], [5, 3]], "visual_delivered": 2, "llm": [3, 3, 3], "llm_visual": [2, 2, 2]}
    with pytest.raises(ValueError, match="prumerge-adaptive: an adaptive method chooses its token count"):
        flops.counts_from_plan(LLAVA_7B, methods.get("prumerge-adaptive").plan(LLAVA_7B, None))


def test_a_schedule_with_a_key_no_plan_holds_is_refused():
    with pytest.raises(ValueError, match=r"custom: its schedule has keys \['delivered', 'extra_key'"):
        Plan.from_schedule("custom", "vision", None, {}, {"vision": None, "vision_counts": [], "delivered": 2,
                                                          "llm": None, "llm_visual": [2], "layer_average": 2.0,
                                                          "extra_key": 1})


def ficoco_v_pairs(discards):
    """[n_attn, n_mlp] for CLIP layers 0..22 when layers 12..22 discard `discards` (methods.md §3)."""
    pairs, patches = [[577, 577]] * 12, 576
    for discard in discards:
        pairs.append([1 + patches, 1 + patches - discard])
        patches -= discard
    return pairs, patches


def test_ficoco_v_192_vision_cost_by_hand():
    # FiCoCo-V B=192: discards 35 x10, 34 x1 over CLIP layers 12..22;
    # attention on 1 + N_{l-1}, MLP on 1 + N_l
    pairs, patches = ficoco_v_pairs([35] * 10 + [34])
    assert patches == 192
    counts = flops.counts_from_schedule(LLAVA_7B, 60, [192] * 32, vision=pairs, visual_delivered=192)
    cost = flops.sample_cost(LLAVA_7B, counts, 1)
    d, m = 1024, 4096

    def clip(n_in, n_out):
        return 4 * n_in * d * d + 2 * n_in * n_in * d + 2 * n_out * d * m

    assert cost["vision_layers_macs"] == 12 * clip(577, 577) + sum(clip(a, b) for a, b in pairs[12:])
    assert cost["projector_macs"] == 192 * (1024 * 4096 + 4096 * 4096)
    assert cost["legacy_nominal_tflops"] == pytest.approx(3.30, abs=0.005)


def test_planned_counts_from_the_methods_registry():
    # the registry's plans reproduce the spec's schedule tables (methods.md §3, §4)
    v_counts = flops.planned_counts(LLAVA_7B, "ficoco-v", 128, text_tokens=60)
    assert v_counts["vision"] == ficoco_v_pairs([41] * 8 + [40] * 3)[0]
    assert v_counts["llm"] == [188] * 32 and v_counts["visual_delivered"] == 128
    l_counts = flops.planned_counts(LLAVA_7B, "ficoco-l", 128, text_tokens=60)
    assert l_counts["llm_visual"] == [576] * 4 + [440, 305, 170, 35] + [35] * 24
    assert flops.planned_counts(LLAVA_7B, "vanilla", None) == flops.vanilla_counts(LLAVA_7B)


# ------------------------------------------------------------------------------------------ memory


def test_parameter_counts_match_a_built_hf_model():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    # vision width 16 differs from the LLM width 32; GQA 4 heads / 2 KV heads
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                              image_size=28, patch_size=7)
    text = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=5, vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(config)
    counted = sum(p.numel() for p in model.parameters())
    dims = ModelDims.from_config(config)
    assert flops.parameter_counts(dims)["total"] == counted
    assert flops.weight_memory_bytes(dims, "float16") == 2 * counted
    assert flops.weight_memory_bytes(dims, "int4") == 0.5 * counted


def test_weight_memory_llava_7b():
    params = flops.parameter_counts(LLAVA_7B)
    assert rel(params["llm"], 6.74e9) < 0.002                      # flops.md §2: ≈ 6.74 B
    # CLIP ViT-L/14-336: 24 layers of 12·1024² + 2·... ≈ 303.5 M
    assert rel(params["vision"], 303.5e6) < 0.001
    # projector 1024·4096 + 4096 + 4096·4096 + 4096
    assert params["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert rel(flops.weight_memory_bytes(LLAVA_7B, "fp16"), 14.13e9) < 0.001


def test_kv_cache_bytes_paper_numbers():
    # 2 (K, V) x 32 layers x 4096 x 2 B per token
    assert flops.kv_cache_bytes(LLAVA_7B, 1, 2) == 524_288
    assert rel(flops.kv_cache_bytes(LLAVA_7B, 636, 2) / 1e6, 333) < 0.005    # vanilla row: 333 MB
    assert rel(flops.kv_cache_bytes(LLAVA_7B, 124, 2) / 1e6, 65.0) < 0.005   # 64 + 60 tokens: 65.0 MB
    assert rel(flops.kv_cache_bytes(LLAVA_7B, 636, 1) / 1e6, 167) < 0.005    # INT8 row
    assert rel(flops.kv_cache_bytes(LLAVA_7B, 636, 0.5) / 1e6, 83.4) < 0.005  # INT4 row
    assert flops.kv_cache_bytes(SMALL, [5, 3, 2], 2) == 2 * 4 * 2 * 10
    with pytest.raises(ValueError, match="has 3 LLM layers"):
        flops.kv_cache_bytes(SMALL, [5, 3], 2)


def test_memory_access_by_hand_small():
    # SMALL: d=8, m=16, h=4, kv width 4, 3 layers, vocab 10; n=5, weights 2 B, activations 2 B, KV 1 B
    n, d, m, h, w, L, V = 5, 8, 16, 4, 4, 3, 10
    parts = flops.llm_viewer_memory_access_parts(SMALL, n, 2, 2, 1)
    assert parts["weights"] == L * (2 * d * d + 2 * d * w + 3 * d * m) * 2
    assert parts["lm_head"] == V * d * 2 + 1 * (d + V) * 2
    assert parts["linear_io"] == L * n * (6 * d + m + 3 * d + 2 * m) * 2   # loads 6nd + nm, stores 3nd + 2nm
    assert parts["kv_store"] == L * n * 2 * w * 1
    assert parts["attention_io"] == L * n * (2 * d * 2 + 2 * w * 1)       # Q in, A.V out; K, V from the cache
    assert parts["attention_scores"] == L * 4 * h * n * n * 2              # QK^T store, softmax load+store, A.V load
    assert parts["elementwise"] == L * n * (4 * d + 4 * d + 3 * d) * 2     # 2 norms, 2 adds, act (d wide)
    assert parts["total"] == sum(value for key, value in parts.items() if key != "total")
    assert flops.llm_viewer_memory_access_bytes(SMALL, n, 2, 2, 1) == parts["total"]
    exact = flops.llm_viewer_memory_access_parts(SMALL, n, 2, 2, 1, convention="exact")
    assert exact["elementwise"] == L * n * (4 * d + 6 * d + 3 * m) * 2     # adds load both inputs, act m wide
    # activation and KV widths default to the weight width; per-layer lengths sum layer by layer
    assert flops.llm_viewer_memory_access_bytes(SMALL, n, 1) == flops.llm_viewer_memory_access_bytes(SMALL, n, 1, 1, 1)
    per_layer = flops.llm_viewer_memory_access_parts(SMALL, [5, 3, 2], 2)
    assert per_layer["attention_scores"] == 4 * h * (25 + 9 + 4) * 2
    assert per_layer["kv_store"] == flops.kv_cache_bytes(SMALL, [5, 3, 2], 2)
    with pytest.raises(ValueError, match="has 3 LLM layers"):
        flops.llm_viewer_memory_access_bytes(SMALL, [5, 3], 2)
    with pytest.raises(ValueError, match="valid choices"):
        flops.llm_viewer_memory_access_bytes(SMALL, 5, 2, convention="fused")


def test_memory_access_reproduces_paper_memory():
    # flops.md §6.3 (LLM-Viewer theoretical values), decimal GB; n = visual + 60 text tokens
    vanilla = flops.llm_viewer_memory_access_bytes(LLAVA_7B, 576 + 60, 2) / 1e9
    assert rel(vanilla, 22.4) < 0.05                                                  # 22.21 GB
    assert rel(flops.llm_viewer_memory_access_bytes(LLAVA_7B, 64 + 60, 2) / 1e9, 14.4) < 0.05    # 14.45 GB
    assert rel(flops.llm_viewer_memory_access_bytes(LLAVA_7B, 576 + 60, 1) / 1e9, 11.2) < 0.05   # INT8: 11.10 GB
    # the score matrices and activations are what resident memory lacks: weights + KV is 35% short
    resident = (flops.weight_memory_bytes(LLAVA_7B, "fp16") + flops.kv_cache_bytes(LLAVA_7B, 636, 2)) / 1e9
    assert rel(resident, 22.4) > 0.3
    # counting adds' second inputs and the SwiGLU product m wide adds 1.18 GB: 23.38 GB, still within 5%
    assert rel(flops.llm_viewer_memory_access_bytes(LLAVA_7B, 636, 2, convention="exact") / 1e9, 22.4) < 0.05


def test_bytes_per_value_names_valid_choices():
    with pytest.raises(ValueError, match="dtype='fp8'.*valid choices"):
        flops.bytes_per_value("fp8")


# ------------------------------------------------------------------------------------------ spec references


def test_reference_clip_projector_lm_head_patch_embedding():
    # flops.md §3, each to the precision printed there (half a unit of the last digit)
    # CLIP layer at 577 = 7.94 GMAC; layers 0..22 = 0.183 TMAC; all 24 = 0.191 TMAC
    assert flops.clip_layer_macs(LLAVA_7B, 577) == pytest.approx(7.94e9, abs=0.005e9)
    vanilla = flops.sample_cost(LLAVA_7B, flops.vanilla_counts(LLAVA_7B), 1)
    assert vanilla["vision_layers_macs"] == pytest.approx(0.183e12, abs=0.0005e12)
    assert 24 * flops.clip_layer_macs(LLAVA_7B, 577) == pytest.approx(0.191e12, abs=0.0005e12)
    assert flops.patch_embedding_macs(LLAVA_7B) == pytest.approx(0.35e9, abs=0.005e9)     # ≈ 0.35 GMAC
    assert vanilla["projector_macs"] == pytest.approx(12.08e9, abs=0.005e9)               # 7B: 12.08 GMAC
    assert flops.projector_macs(LLAVA_13B, 576) == pytest.approx(18.12e9, abs=0.005e9)    # 13B: 18.12 GMAC
    assert flops.lm_head_macs(LLAVA_7B, 1) == pytest.approx(0.131e9, abs=0.0005e9)        # per position


def test_reference_decode_step_at_kv_636():
    # flops.md §4: vanilla 7B, kv = 636 -> ≈ 6.77 GMAC per generated token
    assert flops.decode_step_macs(LLAVA_7B, [635] * 32, 1) == pytest.approx(6.77e9, abs=0.005e9)


def test_reference_nominal_labels():
    # flops.md §6.1 / §6.2: 2 FLOPs/MAC x 32 x f(n), d = 4096, m = 11008
    assert flops.nominal_tflops(LLAVA_7B, 576, 60) == pytest.approx(8.45, abs=0.005)
    assert flops.nominal_tflops(LLAVA_7B, 576, 64) == pytest.approx(8.50, abs=0.005)
    assert flops.nominal_tflops(LLAVA_7B, 192, 60) == pytest.approx(3.30, abs=0.005)
    assert flops.nominal_tflops(LLAVA_7B, 128, 60) == pytest.approx(2.45, abs=0.005)
    assert flops.nominal_tflops(LLAVA_7B, 64, 60) == pytest.approx(1.61, abs=0.005)
    assert flops.nominal_tflops(LLAVA_7B, 192, 40) == pytest.approx(3.03, abs=0.005)
    assert flops.nominal_tflops(LLAVA_7B, 128, 40) == pytest.approx(2.19, abs=0.005)
    assert flops.nominal_tflops(LLAVA_7B, 64, 40) == pytest.approx(1.35, abs=0.005)
    # the paper's labels 8.5 / 3.3 / 2.4 within 3% with 60 text tokens
    for label, visual in ((8.5, 576), (3.3, 192), (2.4, 128)):
        assert rel(flops.nominal_tflops(LLAVA_7B, visual, 60), label) < 0.03
    # the vanilla prefill of our exact count equals the nominal one plus the LM head on one position
    vanilla = flops.sample_cost(LLAVA_7B, flops.vanilla_counts(LLAVA_7B), 1)
    assert vanilla["legacy_nominal_tflops"] == pytest.approx(8.45, abs=0.005)
    assert vanilla["prefill_layers_flops"] / 1e12 == pytest.approx(8.45, abs=0.005)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_paper(capsys):
    assert flops.main(["--paper"]) == 0
    out = capsys.readouterr().out
    for text in ("8.45", "8.50", "3.30", "2.45", "1.61", "1.35", "333.4", "65.0", "22.4", "22.21", "14.45", "-0.9%",
                 "524,288 B"):
        assert text in out, text
    memory = out[out.index("Memory, LLaVA-1.5-7B"):]
    for row in ("vanilla", "FiCoCo-V", "FiCoCo-L", "FiCoCo-VL"):        # paper, ours and % for every precision
        for precision in ("FP16", "INT8", "INT4"):
            assert re.search(rf"^ *{row} +{precision} .*%", memory, re.M), (row, precision)
    assert "NOT reproduced" in memory  # the rows no bit setting explains are stated, not fitted


def test_cli_table_for_a_config_file(tmp_path, capsys):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                              image_size=28, patch_size=7)
    text = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    LlavaConfig(vision_config=vision, text_config=text, image_token_id=5).save_pretrained(tmp_path)
    assert flops.main(["--model-config", str(tmp_path / "config.json"), "--text-tokens", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["method"] == "vanilla"
    # 16 patches + text 4 -> 20 tokens per LLM layer; 2 vision layers run (feature layer -2 of 3)
    assert rows[0]["prefill_tokens_layer_average"] == 20
    assert rows[0]["vision_layers_executed"] == 2


def test_cli_shape_table_and_errors(capsys):
    assert flops.main(["--shape", "llava-1.5-13b", "--generated", "2"]) == 0
    out = capsys.readouterr().out
    assert "vanilla" in out and "521.0" in out          # 13B KV: 2·40·5120·2 B · 636 = 521 MB
    with pytest.raises(SystemExit):
        flops.main(["--method", "ficoco-v"])           # a method needs --budgets
    # an unreachable budget: the reachable rows are printed, the infeasible one named, exit 2
    assert flops.main(["--method", "ficoco-l", "--budgets", "192", "64"]) == 2
    captured = capsys.readouterr()
    assert "191.75" in captured.out and "B=64 is infeasible" in captured.err
    with pytest.raises(ValueError, match="valid choices"):
        flops.dims_for(None, "llava-2")


def test_a_fixed_schedule_plans_its_own_counts_without_a_budget():
    """pdrop-official at budget None runs its published schedule, not the unreduced model."""
    counts = flops.planned_counts(LLAVA_7B, "pdrop-official", None)
    assert counts["llm_visual"] == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert flops.planned_counts(LLAVA_7B, "ficoco-v", None) == flops.vanilla_counts(LLAVA_7B)

"""FiCoCo-L's `placement="attention"` (the released code's): the reduction between a decoder layer's
attention and its MLP, scored on the probabilities that attention computed.

Independent references: the unpatched model (an in-layer step that keeps everything must change
nothing), float64 attention probabilities recomputed from the layer's input, the input placement's
schedule one layer later, a recompute without cache, and each prompt run alone.
"""
from __future__ import annotations

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from helpers_tiny import (IMAGE, float64_layer_probabilities, generate_batch_and_alone, images, left_padded,
                          n_placeholders, prompt, tiny_llava)

import ficoco
from ficoco import methods
from ficoco.budget import InfeasibleBudget
from ficoco.contract import LLMKept, LLMLayerStep
from ficoco.dims import ModelDims, llava_1_5_dims
from ficoco.methods.base import Method
from ficoco.methods.shared import vision_layer_counts
from ficoco.models.llama import float32_eager_attention

DIMS_7B = llava_1_5_dims("7b")


# ------------------------------------------------------------------------------------------------
# Plans


@pytest.mark.parametrize("budget", [192, 128])
def test_attention_placement_counts_the_attention_one_layer_later(budget):
    """The attention (and KV cache) of layer s+1.. sees what the input placement's layer s+1.. sees
    when it starts one layer later; each reducing layer's MLP already runs on its kept tokens."""
    after = methods.get("ficoco-l").check_budget(DIMS_7B, budget, start=3, placement="attention")
    at_input = methods.get("ficoco-l").check_budget(DIMS_7B, budget, start=4)
    assert after.llm_visual == at_input.llm_visual and after.layer_average <= budget
    assert after.llm.layers == [3, 4, 5, 6] and after.llm.discards == at_input.llm.discards
    expected_mlp = list(at_input.llm_visual)
    for layer in (3, 4, 5, 6):
        expected_mlp[layer] = at_input.llm_visual[layer + 1]
    assert after.llm_mlp_visual == expected_mlp
    assert at_input.llm_mlp_visual is None


def test_attention_placement_bounds_and_messages():
    with pytest.raises(ValueError, match=r"placement='attention': need 0 <= start <= 27 in the 32 LLM layers"):
        methods.get("ficoco-l").check_budget(DIMS_7B, 192, start=28, placement="attention")
    with pytest.raises(InfeasibleBudget, match=r"subtract 1 from the start layers named here"):
        methods.get("ficoco-l").check_budget(DIMS_7B, 64, placement="attention")
    with pytest.raises(ValueError, match=r"placement='middle' must be one of \['input', 'attention'\]"):
        methods.get("ficoco-l").check_budget(DIMS_7B, 192, placement="middle")
    with pytest.raises(ValueError, match="scores_from='previous' needs placement='input'"):
        LLMLayerStep(layers=(2,), reduce=None, tokens_out={2: 1}, overhead=None, scores_from="previous",
                     placement="attention")
    vl = methods.get("ficoco-vl").check_budget(DIMS_7B, 192, placement="attention")
    assert vl.llm_mlp_visual is not None and vl.llm.layers == [4, 5, 6, 7]


# ------------------------------------------------------------------------------------------------
# The in-layer forward


def probe_method(captured: list) -> Method:
    """An in-layer step at LLM layer 1 that keeps every visual token and records its score rows."""
    def reduce(layer, tokens, scores):
        queries = torch.cat([tokens.visual, tokens.instruction], dim=1)
        captured.append(scores.rows(queries, keys=tokens.visual))
        return LLMKept(hidden=tokens.hidden, visual=tokens.visual)

    def schedule(dims, budget, params):
        n = dims.visual_tokens
        return {"vision": None, "vision_counts": vision_layer_counts(dims, {}), "delivered": n,
                "llm": {"layers": [1], "discards": [0], "n0": n, "final": n, "visual_out": [n]},
                "llm_visual": [n] * dims.llm_layers, "layer_average": float(n), "llm_mlp_visual": [n] * dims.llm_layers}

    def build(plan):
        return (LLMLayerStep(layers=(1,), reduce=reduce, tokens_out={1: plan.delivered}, placement="attention",
                             overhead=lambda dims, shape: 0),)

    return Method(name="in-layer-probe", summary="test", phase="llm", acts_on=("llm",), needs_attention="rows",
                  stages={}, params={}, schedule=schedule, build=build)


def float64_probabilities(model, ids, pixels, layer_index: int) -> torch.Tensor:
    """Head-mean causal attention probabilities (L, L) of LLM layer `layer_index`, in float64."""
    return float64_layer_probabilities(model, ids, pixels, layer_index).mean(0)


def test_an_in_layer_step_that_keeps_everything_changes_nothing():
    model = tiny_llava(llm_layers=3, llm_kv_heads=2)
    ids = torch.tensor([prompt(n_placeholders(model), [10, 11], [12, 13, 14])])
    pixels = images(1, 28, seed=2)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
        expected_tokens = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    reference = float64_probabilities(model, ids, pixels, 1)
    captured = []
    with ficoco.apply(model, probe_method(captured)) as handle, torch.no_grad():
        got = model(input_ids=ids, pixel_values=pixels).logits
        counts = handle.last_counts()[0]
        got_tokens = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
        name = model.model.language_model.layers[1].self_attn.config._attn_implementation
        assert name.startswith("ficoco-float32-eager-") and ALL_ATTENTION_FUNCTIONS[name] is float32_eager_attention
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_tokens, expected_tokens)
    assert counts["llm_mlp"] == counts["llm"]
    # the step read the probabilities the layer's own attention computed
    visual = [p for p in range(ids.shape[1]) if ids[0, p] == IMAGE]
    queries = visual + list(range(visual[-1] + 1, ids.shape[1]))
    torch.testing.assert_close(captured[0][0].double(), reference[queries][:, visual], rtol=1e-5, atol=1e-7)
    # removed: the layer's own forward and SDPA again, outputs bit-identical to before
    layer = model.model.language_model.layers[1]
    assert "forward" not in layer.__dict__ and layer.self_attn.config._attn_implementation == "sdpa"
    assert name not in ALL_ATTENTION_FUNCTIONS                      # the patch's registration went with it
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, expected)


# ------------------------------------------------------------------------------------------------
# FiCoCo-L after attention, end to end


def _generate(model, ids, mask, pixels, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5,
                              do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)


def test_cache_equals_recompute_and_the_reducing_layer_caches_every_token():
    """β = γ = 1: the reduction depends only on tokens up to the image, so a recompute at every step
    (use_cache=False) reduces the same way. The reducing layer's cache holds every token its attention
    saw; later layers' only the kept ones."""
    model = tiny_llava(llm_layers=4, llm_kv_heads=2)
    n = n_placeholders(model)
    ids, mask = left_padded([prompt(n, [10, 11, 12], [13, 14, 15]), prompt(n, [16], [17, 18])])
    pixels = images(2, 28)
    settings = dict(start=0, window=2, beta=1.0, gamma=1.0, placement="attention")
    with ficoco.apply(model, "ficoco-l", 10, **settings) as handle:
        cached = _generate(model, ids, mask, pixels)
        recomputed = _generate(model, ids, mask, pixels, use_cache=False)
        kv_lengths = [layer.keys.shape[2] for layer in cached.past_key_values.layers]
        plan = handle.plan
    assert torch.equal(cached.sequences, recomputed.sequences)
    for step_cached, step_recomputed in zip(cached.logits, recomputed.logits):
        torch.testing.assert_close(step_cached, step_recomputed, rtol=1e-5, atol=1e-5)
    full, generated = ids.shape[1], cached.sequences.shape[1] - ids.shape[1] - 1
    assert kv_lengths == [full + generated - (n - visual) for visual in plan.llm_visual]
    assert kv_lengths[0] == full + generated and kv_lengths[-1] < kv_lengths[1] < kv_lengths[0]


def test_only_the_reducing_prefill_runs_the_explicit_attention(monkeypatch):
    """The reducing layers' decode steps run the model's own attention kernel, as every method's do (flops.md:
    latency with the same kernel for every method); the explicit float32 form is for the prefill's probabilities."""
    import ficoco.models.llama as llama

    queries = []

    def recording(module, query, *args, **kwargs):
        queries.append(query.shape[2])
        return float32_eager_attention(module, query, *args, **kwargs)

    monkeypatch.setattr(llama, "float32_eager_attention", recording)
    model = tiny_llava(llm_layers=4, llm_kv_heads=2)
    n = n_placeholders(model)
    ids, mask = left_padded([prompt(n, [10, 11, 12], [13, 14, 15]), prompt(n, [16], [17, 18])])
    with ficoco.apply(model, "ficoco-l", 10, start=0, window=2, placement="attention") as handle:
        out = _generate(model, ids, mask, images(2, 28))
        reducing = len(handle.llm_step.layers)
    assert out.sequences.shape[1] - ids.shape[1] >= 3                     # several decode steps ran
    # one prefill call per reducing layer (the later ones on the tokens the earlier kept), no 1-query decode call
    assert len(queries) == reducing and queries[0] == ids.shape[1] and min(queries) > 1


def test_batch_equals_alone_and_counts_equal_the_plan():
    model = tiny_llava(llm_layers=4, llm_kv_heads=2)
    n = n_placeholders(model)
    prompts = [prompt(n, [10, 11, 12], [13, 14, 15, 16]), prompt(n, [17], [18, 19])]
    with ficoco.apply(model, "ficoco-l", 10, start=0, window=2, placement="attention") as handle:
        _, _, batched_counts, _, _ = generate_batch_and_alone(model, handle, prompts, images(2, 28, seed=5))
        plan = handle.plan
    for row, tokens in enumerate(prompts):
        counts, text = batched_counts[row], len(tokens) - n
        assert counts["llm_visual"] == plan.llm_visual
        assert counts["llm_mlp"] == [text + visual for visual in plan.llm_mlp_visual]
        assert counts["overhead_macs"] > 0


def test_placements_differ_and_the_default_is_the_input():
    """The two placements are different reductions (on the same budget), and the default is the
    normative one (methods.md §4)."""
    model = tiny_llava(llm_layers=4)
    ids = torch.tensor([prompt(n_placeholders(model), [10, 11], [12, 13, 14])])
    pixels = images(1, 28, seed=7)
    assert methods.get("ficoco-l").defaults["placement"] == "input"
    outputs = {}
    for placement in ("input", "attention"):
        with ficoco.apply(model, "ficoco-l", 10, start=0, window=2, placement=placement) as handle, torch.no_grad():
            outputs[placement] = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
            assert ("llm_mlp" in handle.last_counts()[0]) == (placement == "attention")
    assert not torch.allclose(outputs["input"], outputs["attention"])
    assert ModelDims.from_config(model.config).llm_layers == 4


def test_the_in_layer_attention_is_float32_from_the_products_on():
    """spec methods.md §0: A in float32. transformers' eager attention takes q·k in the model's dtype and returns
    probabilities in it; the in-layer placement's attention takes the products in float32 and returns float32
    probabilities, equal to a float64 computation from the same bfloat16 q, k, v; the output in bfloat16."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaConfig, eager_attention_forward

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    module = LlamaAttention(config, layer_idx=0)
    q, k, v = ((3 * torch.randn(1, heads, 40, 16)).to(torch.bfloat16) for heads in (4, 2, 2))
    mask = torch.triu(torch.full((40, 40), torch.finfo(torch.bfloat16).min), diagonal=1)[None, None].to(torch.bfloat16)
    output, probs = float32_eager_attention(module, q, k, v, mask, scaling=0.25)
    k64, v64 = (x.double().repeat_interleave(2, dim=1) for x in (k, v))
    reference = (q.double() @ k64.transpose(2, 3) * 0.25 + mask.double()).softmax(-1)
    assert probs.dtype == torch.float32 and output.dtype == torch.bfloat16
    assert (probs.double() - reference).abs().max() < 1e-6
    _, rounded = eager_attention_forward(module, q, k, v, mask, scaling=0.25)          # transformers' own
    assert (rounded.double() - reference).abs().max() > 1e-3
    torch.testing.assert_close(output.double(), (reference @ v64).transpose(1, 2), rtol=1e-2, atol=1e-2)

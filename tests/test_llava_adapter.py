"""The LLaVA adapter: exact removal, per-call state, batching, placeholders, counts and generate."""
from __future__ import annotations

import pytest
import torch
from helpers_tiny import BOS, IMAGE, PAD, generate_batch_and_alone, images, n_placeholders, prompt, tiny_llava

import ficoco
from ficoco.contract import VisionLayerStep, VisionTokens
from ficoco.methods.base import Method
from ficoco.models.placeholders import collapse_placeholders

# method -> (budget, overrides) on the 16-patch tiny model with 4 vision layers (layers 0..2 run)
# and 4 LLM layers
SETTINGS = {
    "vanilla": (None, {}),
    "ficoco-v": (6, {"start": 0}),
    "ficoco-l": (8, {"start": 1, "window": 2}),
    "ficoco-vl": (6, {"v_start": 1, "l_start": 1, "l_window": 2}),
}


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def _single(model, before=(10, 11), after=(12, 13, 14), seed=1):
    ids = torch.tensor([prompt(n_placeholders(model), list(before), list(after))])
    return ids, torch.ones_like(ids), images(1, 28, seed=seed)


def _run(model, ids, mask, pixels):
    """Prefill logits and a short greedy generation with its per-step logits."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    return logits, out.sequences, torch.stack(out.logits, 1)


def _patched_state(model):
    """Everything an installed method could leave behind on the model."""
    modules = [m for m in model.modules()]
    return (sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules),
            sum("forward" in m.__dict__ for m in modules), "generate" in model.__dict__,
            hasattr(model, "_ficoco_handle"))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_remove_restores_bit_identical_outputs(model, name):
    ids, mask, pixels = _single(model)
    before = _run(model, ids, mask, pixels)
    state = _patched_state(model)
    budget, overrides = SETTINGS[name]
    handle = ficoco.apply(model, name, budget, **overrides)
    reduced = _run(model, ids, mask, pixels)
    handle.remove()
    after = _run(model, ids, mask, pixels)
    assert _patched_state(model) == state
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    if name != "vanilla":
        assert reduced[0].shape != before[0].shape                 # the method did reduce
    else:                                                           # vanilla (layer 3 skipped) is exact
        for a, b in zip(before, reduced):
            assert torch.equal(a, b)


def test_unused_vision_layers_do_not_run(model):
    calls = []
    probe = model.model.vision_tower.encoder.layers[3].mlp.register_forward_hook(lambda *a: calls.append(1))
    ids, mask, pixels = _single(model)
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pixels)
            assert calls == [1]                                      # the untouched model runs layer 3
            with ficoco.apply(model, "vanilla") as handle:
                model(input_ids=ids, pixel_values=pixels)
                counts = handle.last_counts()[0]
    finally:
        probe.remove()
    assert calls == [1]                                              # not again with a method installed
    assert counts["vision"] == [[17, 17]] * 3                        # executed layers 0..2 only


@pytest.mark.parametrize("name", ["ficoco-v", "ficoco-vl"])
def test_second_image_is_unaffected_by_the_first(model, name):
    budget, overrides = SETTINGS[name]
    first, second = _single(model, seed=1), _single(model, after=(20, 21), seed=2)
    with ficoco.apply(model, name, budget, **overrides):
        alone = _run(model, *second)
    with ficoco.apply(model, name, budget, **overrides):
        _run(model, *first)
        after_first = _run(model, *second)
    for a, b in zip(alone, after_first):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["vanilla", "ficoco-v", "ficoco-l", "ficoco-vl"])
def test_batch_of_two_left_padded_equals_each_alone(name):
    model = tiny_llava(llm_kv_heads=2, seed=4)
    budget, overrides = SETTINGS[name]
    n = n_placeholders(model)
    prompts = [prompt(n, [10, 11, 12, 13], [14, 15, 16]), prompt(n, [17], [18, 19, 20, 21, 22])]
    pixels = images(2, 28, seed=5)
    with ficoco.apply(model, name, budget, **overrides) as handle:
        _, _, batched_counts, _, _ = generate_batch_and_alone(model, handle, prompts, pixels, max_new_tokens=5)
    assert batched_counts[0]["llm"][0] == len(prompts[0]) - (n - handle.plan.delivered)


@pytest.mark.parametrize("name", ["ficoco-v", "ficoco-l", "ficoco-vl"])
def test_recorded_counts_equal_the_plan(model, name):
    budget, overrides = SETTINGS[name]
    ids, mask, pixels = _single(model)
    text = ids.shape[1] - n_placeholders(model)
    with ficoco.apply(model, name, budget, **overrides) as handle:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                           do_sample=False)
        counts, plan = handle.last_counts(), handle.plan
    assert len(counts) == 1
    assert counts[0]["vision"] == plan.vision_counts
    assert counts[0]["visual_delivered"] == plan.delivered
    assert counts[0]["llm_visual"] == plan.llm_visual
    assert counts[0]["llm"] == [text + visual for visual in plan.llm_visual]
    assert sum(counts[0]["llm_visual"]) / len(counts[0]["llm_visual"]) == plan.layer_average


def test_text_only_prompt_is_counted_and_left_alone(model):
    ids = torch.tensor([[BOS, 10, 11, 12]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with ficoco.apply(model, "ficoco-vl", *SETTINGS["ficoco-vl"][:1], **SETTINGS["ficoco-vl"][1]) as handle:
            got = model(input_ids=ids).logits
            counts = handle.last_counts()
    assert torch.equal(expected, got)
    assert counts == [{"vision": [], "visual_delivered": 0, "llm": [4] * 4, "llm_visual": [0] * 4, "overhead_macs": 0}]


def test_generate_returns_the_callers_prompt_and_the_kv_cache_is_reduced(model):
    ids, mask, pixels = _single(model)
    with ficoco.apply(model, "ficoco-vl", 6, v_start=1, l_start=1, l_window=2) as handle, torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                             do_sample=False, return_dict_in_generate=True)
        plan = handle.plan
    assert torch.equal(out.sequences[:, :ids.shape[1]], ids)          # `out[:, len(prompt):]` stays right
    text, generated = ids.shape[1] - 16, out.sequences.shape[1] - ids.shape[1] - 1
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == \
        [text + visual + generated for visual in plan.llm_visual]


@pytest.mark.parametrize("name", ["vanilla", "ficoco-v"])
def test_a_chunked_prefill_is_refused_not_counted_by_its_first_chunk(model, name):
    """generate(prefill_chunk_size=k) runs the prompt in chunks on one cache; the counts would be the first chunk's
    (the vision-side ones passing every other check), so the second chunk is refused."""
    ids, mask, pixels = _single(model)
    budget, overrides = SETTINGS[name]
    with ficoco.apply(model, name, budget, **overrides), torch.no_grad():
        with pytest.raises(ValueError, match=rf"{name}: a forward of \d+ tokens per row on a KV cache that already "
                                             "holds the prompt's first part"):
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=2,
                           do_sample=False, prefill_chunk_size=10)


def test_a_renamed_forward_keyword_is_refused_at_apply(model, monkeypatch):
    """The adapter reads and passes LlavaModel.forward's keywords by name; a transformers release renaming one (as
    5.24 renamed the cache's) would leave it reading None: padding counted as tokens, images never inserted."""
    def renamed(self, input_ids=None, pixel_values=None, mask=None, position_ids=None, cache=None,
                inputs_embeds=None, mm_encoder_outputs=None, **kwargs):
        raise AssertionError("never called")

    before = _patched_state(model)
    monkeypatch.setattr(type(model.model), "forward", renamed)
    for name in ("vanilla", "ficoco-v"):
        with pytest.raises(RuntimeError, match=r"LlavaModel.forward has no parameter 'attention_mask' \(it has "
                                               r"input_ids, pixel_values, mask, .*\); the ficoco adapter reads"):
            ficoco.apply(model, name, *SETTINGS[name][:1], **SETTINGS[name][1])
    assert _patched_state(model) == before                              # nothing left installed


def test_collapse_placeholders_per_image_and_positions():
    ids = torch.tensor([[PAD, BOS, IMAGE, IMAGE, IMAGE, 9, IMAGE, IMAGE, IMAGE, 8],
                        [BOS, 7, IMAGE, IMAGE, IMAGE, 9, IMAGE, IMAGE, IMAGE, 8]])
    mask = (ids != PAD).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = collapse_placeholders(ids, 4, IMAGE, full=3, kept=2, attention_mask=mask, position_ids=positions)
    assert out["input_ids"].tolist() == [[PAD, BOS, IMAGE, IMAGE, 9, IMAGE, IMAGE, 8],
                                         [BOS, 7, IMAGE, IMAGE, 9, IMAGE, IMAGE, 8]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1, 1, 1], [1] * 8]
    assert out["position_ids"].tolist() == [[0, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert collapse_placeholders(out["input_ids"], 4, IMAGE, full=3, kept=2) == {}     # already collapsed
    with pytest.raises(ValueError, match=r"hold 4 image tokens .* for 1 image\(s\); expected 3 per image"):
        collapse_placeholders(ids[:1, :7], 1, IMAGE, full=3, kept=2)
    # images with spans of their own (LLaVA-NeXT): 3 and 2 placeholders, then 3 and 3
    spans = torch.tensor([[BOS, IMAGE, IMAGE, IMAGE, 9, IMAGE, IMAGE, 8], [BOS, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, 8]])
    out = collapse_placeholders(spans, 4, IMAGE, full=[3, 2, 3, 3], kept=[1, 2, 2, 0])
    assert out["input_ids"].tolist() == [[BOS, IMAGE, 9, IMAGE, IMAGE, 8], [PAD, PAD, BOS, IMAGE, IMAGE, 8]]
    assert out["attention_mask"].tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match=r"kept=\[4, 1, 1, 1\]: need one count in \[0, full\]"):
        collapse_placeholders(spans, 4, IMAGE, full=[3, 2, 3, 3], kept=[4, 1, 1, 1])


def test_errors_name_the_problem(model):
    with pytest.raises(ValueError, match="valid parameters: beta, gamma, eps, k, placement, start, window"):
        ficoco.apply(model, "ficoco-l", 8, lam=0.5)
    with pytest.raises(ValueError, match="valid methods"):
        ficoco.apply(model, "no-such-method", 8)
    with pytest.raises(TypeError, match="supported: LlavaForConditionalGeneration"):
        ficoco.apply(torch.nn.Linear(2, 2), "vanilla")
    with ficoco.apply(model, "vanilla"):
        with pytest.raises(RuntimeError, match="already installed"):
            ficoco.apply(model, "vanilla")
    with ficoco.apply(model, "ficoco-l", 8, start=1, window=2):
        ids, _, pixels = _single(model)
        doubled = torch.cat([ids[:, :5], ids[:, 3:]], 1)                  # two image spans in one prompt
        with pytest.raises(ValueError, match=r"planned for 16 visual tokens .* \[18\]"):
            model(input_ids=doubled, pixel_values=torch.cat([pixels, pixels]))


def test_a_custom_step_with_a_key_bias_reaches_later_layers(model):
    """The boundary a ToMe-like method needs: a vision step may set a per-key logit bias that the
    adapter applies in every later layer. Reference: the same bias passed by hand as the mask."""
    bias_value = torch.zeros(1, 17)
    bias_value[0, 5] = 3.0

    def tag_keys(layer, tokens, scores):
        assert scores.probs().shape == (1, 17, 17)
        return VisionTokens(tokens.hidden, tokens.positions, bias_value.expand(tokens.hidden.shape[0], -1))

    def build(plan):
        return (VisionLayerStep(layers=(0,), reduce=tag_keys, tokens_out={0: 16}, overhead=lambda dims, shape: 0),)

    method = Method(name="key-bias-probe", summary="test", phase="vision", acts_on=("vision",),
                    needs_attention="full", stages={}, params={}, build=build,
                    schedule=lambda dims, budget, params: {"vision": None, "vision_counts": [], "delivered": 16,
                                                          "llm": None, "llm_visual": [16] * 4, "layer_average": 16.0})
    pixels = images(1, 28)
    tower = model.model.vision_tower
    with torch.no_grad():
        with ficoco.apply(model, method):
            got = tower(pixels, output_hidden_states=True).hidden_states[3]
        hooks = [layer.register_forward_pre_hook(
            lambda module, args, kwargs: ((args[0], bias_value[:, None, None, :]), kwargs), with_kwargs=True)
            for layer in tower.encoder.layers[1:3]]
        try:
            expected = tower(pixels, output_hidden_states=True).hidden_states[3]
        finally:
            for hook in hooks:
                hook.remove()
        unbiased = tower(pixels, output_hidden_states=True).hidden_states[3]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, unbiased, atol=1e-4)

"""In-LLM baselines (methods.md §8.3 FastV, §8.4 SparseVLM, §8.5 PDrop, §8.8 DART): schedules, behaviour.

Schedules are checked against the spec's tables. Behaviour is checked on a LLaVA-shaped tiny
model (576 image placeholders, 4 small LLM layers) against independent computations:
- FastV: the top-k of the last prompt token's row of layer K−1's eager attention
  (`output_attentions` on the unreduced model);
- PDrop: a float64 softmax of q_last·Kᵀ from each boundary layer's own input, on a model that
  keeps every token and hides the dropped ones as keys (platform-notes §4.2);
- DART: a Python loop over the unreduced model's cached layer-(K−1) keys and layer-K input;
- SparseVLM: raters from the input embeddings, eager attention of the pruning layer, and the
  mean of the recycled tokens (one cluster);
- generation: every decoding step against a full recompute without cache on the unmodified model
  with the dropped tokens hidden as keys from their layer on; a batch of 2 against each row alone.
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers_tiny import IMAGE, eager_attention, images, left_padded, llava_shaped, masked_forward, prompt
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import ficoco
from ficoco import methods
from ficoco.budget import InfeasibleBudget
from ficoco.dims import llava_1_5_dims

DIMS_7B = llava_1_5_dims("7b")
N_IMAGE = 576
PROMPTS = ([10, 11], [12, 13, 14, 15]), ([16], [17, 18, 19])       # (text before, instruction after) the image


# ------------------------------------------------------------------------------------------------
# Schedules (spec §8.3, §8.5, §8.8, §9.2)

@pytest.mark.parametrize("name", ["fastv", "dart"])
@pytest.mark.parametrize("budget, keep, average", [(192, 166, 191.6), (128, 98, 127.9), (64, 29, 63.2)])
def test_one_shot_keep_matches_spec(name, budget, keep, average):
    plan = methods.get(name).check_budget(DIMS_7B, budget)
    assert plan.llm.layers == [2] and plan.llm.visual_out == [keep]
    assert plan.llm_visual == [576, 576] + [keep] * 30
    assert round(plan.layer_average, 1) == average <= budget


@pytest.mark.parametrize("budget, average", [(192, 216), (128, 156), (64, 96)])
def test_fastv_keep_budget_reports_its_true_average(budget, average):
    plan = methods.get("fastv_keepB").check_budget(DIMS_7B, budget)
    assert plan.llm.visual_out == [budget] and plan.layer_average == average


@pytest.mark.parametrize("budget, lam, counts, average", [
    (192, 0.5597, [322, 180, 101], 191.88), (128, 0.4194, [242, 101, 42], 127.63), (64, 0.1918, [110, 21, 4], 63.88),
])
def test_pdrop_project_rule_matches_spec(budget, lam, counts, average):
    plan = methods.get("pdrop").check_budget(DIMS_7B, budget)
    assert plan.llm.details["lam"] == lam and plan.llm.layers == [2, 8, 16]
    assert plan.llm.visual_out == counts
    assert plan.llm_visual == [576] * 2 + [counts[0]] * 6 + [counts[1]] * 8 + [counts[2]] * 16
    assert abs(plan.layer_average - average) <= 0.005 + 1e-9


def test_pdrop_official_default_schedule():
    plan = methods.get("pdrop_official").check_budget(DIMS_7B, None)
    assert plan.llm.layers == [8, 16, 24] and plan.llm.visual_out == [288, 144, 72]
    assert plan.llm_visual == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert plan.layer_average == 270
    assert methods.get("pdrop-official").check_budget(DIMS_7B, 270).layer_average == 270
    with pytest.raises(InfeasibleBudget, match=r"B=192 .*270\.00.*smallest reachable budget is 270"):
        methods.get("pdrop-official").check_budget(DIMS_7B, 192)


@pytest.mark.parametrize("budget, visual_out, average, without_clusters", [
    (192, [309, 204, 113], 206.5, 202.8), (128, [312, 117, 39], 145.4, 140.8), (64, [82, 32, 18], 82.3, 79.2),
])
def test_sparsevlm_official_schedule_and_realised_average(budget, visual_out, average, without_clusters):
    plan = methods.get("sparsevlm").check_budget(DIMS_7B, budget)
    assert plan.llm.layers == [3, 7, 16]                      # pruning layers 2, 6, 15 prune their output
    assert plan.llm.visual_out == visual_out                   # schedule + ⌊(⌊0.3·d⌋ + 1)/10⌋ + 1 clusters
    assert plan.llm_visual[:3] == [576] * 3 and plan.llm_visual[16:] == [visual_out[2]] * 16
    assert abs(plan.layer_average - average) <= 0.05 + 1e-9
    plain = methods.get("sparsevlm").check_budget(DIMS_7B, budget, recycle=False)
    assert abs(plain.layer_average - without_clusters) <= 0.05 + 1e-9
    with pytest.raises(ValueError, match=r"budget 100 has no official v1.5 schedule; valid budgets: \[64, 128, 192\]"):
        methods.get("sparsevlm").check_budget(DIMS_7B, 100)
    with pytest.raises(ValueError, match=r"layers=\[2, 6, 31\]: every pruning layer must be in \[0, 30\]"):
        methods.get("sparsevlm").check_budget(DIMS_7B, 192, layers=[2, 6, 31])


def test_infeasible_budgets_name_the_smallest_reachable_one():
    # PDrop at [8, 16, 24]: 128 and 64 are out of reach (the first 8 layers alone average 144)
    with pytest.raises(InfeasibleBudget, match=r"pdrop: budget B=128 .*\[8, 16, 24\].*144\.00"):
        methods.get("pdrop").check_budget(DIMS_7B, 128, boundaries=[8, 16, 24])
    assert methods.get("pdrop").check_budget(DIMS_7B, 192, boundaries=[8, 16, 24]).llm.visual_out == [146, 37, 9]
    # FastV at K = 4: (576·4 + 28)/32 = 72.88 > 64; K <= 3 reaches it
    with pytest.raises(InfeasibleBudget, match=r"fastv: budget B=64 .*K=4.*72\.88.*K <= 3"):
        methods.get("fastv").check_budget(DIMS_7B, 64, layer=4)
    assert methods.get("fastv").check_budget(DIMS_7B, 64, layer=3).llm.visual_out == [11]   # ⌊320/29⌋
    # a solved λ whose last stage would keep nothing
    with pytest.raises(InfeasibleBudget, match=r"keep no image token.*smallest reachable budget"):
        methods.get("pdrop").check_budget(DIMS_7B, 40)


def test_overrides_are_validated_with_the_valid_choices():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['K'\]; valid parameters: layer"):
        methods.get("fastv").check_budget(DIMS_7B, 128, K=3)
    with pytest.raises(ValueError, match=r"dart: layer=0 must be an integer >= 1"):
        methods.get("dart").check_budget(DIMS_7B, 128, layer=0)
    with pytest.raises(ValueError, match=r"layer=32: need 1 <= layer <= 31"):
        methods.get("fastv-keepb").check_budget(DIMS_7B, 128, layer=32)
    with pytest.raises(ValueError, match="boundaries=.*strictly increasing"):
        methods.get("pdrop").check_budget(DIMS_7B, 128, boundaries=[8, 2, 16])
    with pytest.raises(ValueError, match=r"boundaries=\[2, 8, 32\]: every boundary must be in \[0, 31\]"):
        methods.get("pdrop").check_budget(DIMS_7B, 128, boundaries=[2, 8, 32])
    with pytest.raises(ValueError, match=r"lam=1.5 must be None .* or a number in \(0, 1\]"):
        methods.get("pdrop").check_budget(DIMS_7B, 128, lam=1.5)
    with pytest.raises(ValueError, match="scores_from='later'; valid choices are"):
        ficoco.methods.LLMLayerStep(layers=(2,), reduce=None, tokens_out={2: 1}, overhead=None,
                                    scores_from="later")


def test_registry_describes_the_in_llm_baselines():
    for name in ("fastv", "fastv-keepb", "pdrop", "pdrop-official", "dart", "sparsevlm"):
        method = methods.get(name)
        assert name in methods.names() and method.phase == "llm" and method.acts_on == ("llm",)
        assert set(method.stages) == {"filter", "correlate", "compress"} and method.needs_attention
    assert methods.get("fastv_keepB").name == "fastv-keepb"
    assert methods.get("fastv").defaults == {"layer": 2}
    assert methods.get("dart").defaults == {"layer": 2, "n_pivots": 4}
    assert methods.get("pdrop").defaults == {"boundaries": (2, 8, 16), "lam": None}
    assert methods.get("pdrop-official").defaults == {"boundaries": (8, 16, 24), "lam": 0.5}
    assert methods.get("sparsevlm").defaults == {"layers": (2, 6, 15), "keeps": None, "recycle": True, "seed": 0}
    assert methods.get("pdrop").check_budget(DIMS_7B, None).llm is None  # budget None = unreduced


# ------------------------------------------------------------------------------------------------
# A LLaVA-shaped model: 576 placeholders, 4 LLM layers, grouped-query attention

@pytest.fixture(scope="module")
def model():
    return llava_shaped(vision_layers=2, llm_layers=4, llm_kv_heads=2)


def _inputs(which: int = 0):
    before, after = PROMPTS[which]
    ids = torch.tensor([prompt(N_IMAGE, before, after)])
    return ids, images(1, 336, seed=which + 1)


def _run(model, name, budget, ids, pixels, mask=None, **overrides):
    with ficoco.apply(model, name, budget, **overrides) as handle, torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        return logits, handle.last_counts(), handle.last_trace()["llm"], handle.plan


def _largest_lambda(budget, boundaries, n_layers, n0=N_IMAGE):
    """Brute force over the 1e-4 grid: the largest λ whose per-layer counts average ≤ B."""
    best = None
    for i in range(10001):
        lam = i / 10000
        counts, current = [], n0
        for layer in range(n_layers):
            if layer in boundaries:
                current = math.floor(n0 * lam ** (boundaries.index(layer) + 1) + 0.5)
            counts.append(current)
        if sum(counts) / n_layers <= budget:
            best = (lam, counts)
    return best


@pytest.mark.parametrize("name, budget, overrides", [
    ("fastv", 300, {}), ("fastv", 200, {"layer": 1}), ("fastv-keepb", 100, {"layer": 3}), ("dart", 300, {}),
    ("pdrop", 200, {"boundaries": [1, 2, 3]}), ("pdrop-official", None, {"boundaries": [1, 2, 3]}),
    ("sparsevlm", 128, {"layers": [0, 1, 2], "keeps": [300, 100, 20]}),
])
def test_recorded_counts_reach_the_method_rule(model, name, budget, overrides):
    ids, pixels = _inputs()
    _, counts, trace, plan = _run(model, name, budget, ids, pixels, **overrides)
    recorded = counts[0]["llm_visual"]
    if name in ("fastv", "dart"):
        layer = overrides.get("layer", 2)
        keep = (4 * budget - N_IMAGE * layer) // (4 - layer)
        expected = [N_IMAGE] * layer + [keep] * (4 - layer)
    elif name == "fastv-keepb":
        expected = [N_IMAGE] * 3 + [budget]
    elif name == "pdrop":
        lam, expected = _largest_lambda(budget, [1, 2, 3], 4)
        assert plan.llm.details["lam"] == lam
    elif name == "sparsevlm":
        expected, n = [N_IMAGE], N_IMAGE
        for wanted in overrides["keeps"]:          # prune the output of layers 0, 1, 2; recycle into clusters
            keep = min(wanted, n - 1)
            n = keep + (math.floor(0.3 * (n - keep)) + 1) // 10 + 1
            expected.append(n)
    else:
        expected = [N_IMAGE, 288, 144, 72]
    assert recorded == expected == plan.llm_visual
    assert sum(recorded) / 4 == plan.layer_average
    if budget is not None and name not in ("fastv-keepb", "sparsevlm"):     # these two report a larger average
        assert plan.layer_average <= budget
    text = ids.shape[1] - N_IMAGE
    assert counts[0]["llm"] == [text + n for n in expected]
    for layer, kept in trace.items():                                      # original order, image span only
        positions = kept[0].tolist()
        assert positions == sorted(set(positions)) and all(ids[0, p] == IMAGE for p in positions)


def test_fastv_keeps_top_k_of_layer_k_minus_1_last_row_eager_attention(model):
    ids, pixels = _inputs()
    with eager_attention(model.model.language_model), torch.no_grad():
        reference = model(input_ids=ids, pixel_values=pixels, output_attentions=True)
    image = [p for p in range(ids.shape[1]) if ids[0, p] == IMAGE]
    for layer, budget in ((2, 300), (1, 200)):
        row = reference.attentions[layer - 1][0].double().mean(0)[-1]           # last prompt token, head mean
        keep = (4 * budget - N_IMAGE * layer) // (4 - layer)
        expected = sorted(sorted(image, key=lambda p: (-row[p].item(), p))[:keep])
        _, _, trace, _ = _run(model, "fastv", budget, ids, pixels, layer=layer)
        assert list(trace) == [layer] and trace[layer][0].tolist() == expected


def _pdrop_select(keep):
    """Layer b's own float64 softmax of the last token's query against every key still present."""
    def select(layer, hidden, kwargs, current, dropped):
        attn = layer.self_attn
        length = hidden.shape[1]
        normed = layer.input_layernorm(hidden)
        q = attn.q_proj(normed).view(1, length, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(1, length, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *kwargs["position_embeddings"])
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q[0, :, -1:].double() @ k[0].double().transpose(-1, -2))[:, 0] * attn.scaling   # (H, L)
        present = torch.tensor([p not in dropped for p in range(length)])
        probs = logits.masked_fill(~present, float("-inf")).softmax(-1).mean(0)              # (L,)
        return sorted(sorted(current, key=lambda p: (-probs[p].item(), p))[:keep[attn.layer_idx]])
    return select


def test_pdrop_kept_sets_and_logits_match_an_independent_softmax(model):
    ids, pixels = _inputs()
    logits, _, trace, plan = _run(model, "pdrop", 200, ids, pixels, boundaries=[1, 2, 3])
    keep = dict(zip(plan.llm.layers, plan.llm.visual_out))
    expected, kept_at, dropped = masked_forward(model, ids, pixels, select={b: _pdrop_select(keep) for b in keep})
    for layer in (1, 2, 3):
        assert trace[layer][0].tolist() == kept_at[layer]
    assert [len(kept_at[b]) for b in (1, 2, 3)] == plan.llm.visual_out
    survivors = [p for p in range(ids.shape[1]) if p not in dropped]
    torch.testing.assert_close(logits[0], expected[survivors], rtol=1e-4, atol=1e-5)


def test_dart_keeps_k_with_its_pivots_like_a_loop_reference(model):
    ids, pixels = _inputs()
    layer_k, budget, n_pivots = 2, 300, 4
    captured = {}
    probe = model.model.language_model.layers[layer_k].register_forward_pre_hook(
        lambda module, args: captured.update(hidden=args[0]))
    try:
        with torch.no_grad():
            cache = model(input_ids=ids, pixel_values=pixels, use_cache=True).past_key_values
    finally:
        probe.remove()
    keys = cache.layers[layer_k - 1].keys[0].double()                        # (H_kv, L, d) after RoPE
    key_norm = keys.abs().sum(dim=(0, 2))                                      # (L,)
    with torch.no_grad():
        normed = model.model.language_model.norm(captured["hidden"])[0].double()
    length = ids.shape[1]
    image = [p for p in range(length) if ids[0, p] == IMAGE]
    text = list(range(image[-1] + 1, length))
    keep = (4 * budget - N_IMAGE * layer_k) // (4 - layer_k)
    image_pivots = sorted(image, key=lambda p: (-key_norm[p].item(), p))[:n_pivots]
    text_pivots = sorted(text, key=lambda p: (-key_norm[p].item(), p))[:n_pivots]
    pivots = image_pivots + text_pivots
    base, extra = divmod(keep - len(image_pivots), len(pivots))
    quotas = [base + 1 if i < extra else base for i in range(len(pivots))]
    taken = set(image_pivots)
    for pivot, quota in zip(pivots, quotas):
        candidates = [p for p in image if p not in taken]
        cosine = {p: torch.nn.functional.cosine_similarity(normed[pivot], normed[p], dim=0).item() for p in candidates}
        taken.update(sorted(candidates, key=lambda p: (cosine[p], p))[:quota])

    _, counts, trace, _ = _run(model, "dart", budget, ids, pixels)
    kept = trace[layer_k][0].tolist()
    assert len(kept) == keep == counts[0]["llm_visual"][-1]
    assert set(image_pivots) <= set(kept) and not set(text_pivots) & set(kept)
    assert kept == sorted(taken)


def test_sparsevlm_keeps_rater_top_k_and_recycles_into_a_mean_token(model):
    """Pruning layer 1 keeps 550: d = 26 dropped, the 8 most important of them recycled into one
    cluster (its mean, at the slot of its first member). Reference: raters from the input
    embeddings, scores from layer 1's eager attention, the mean from the unreduced layer-2 input."""
    ids, pixels = _inputs()
    layers = model.model.language_model.layers
    captured = {}
    probes = [layers[i].register_forward_pre_hook(lambda module, args, i=i: captured.__setitem__(i, args[0]))
              for i in (0, 2)]
    try:
        with eager_attention(model.model.language_model), torch.no_grad():
            reference = model(input_ids=ids, pixel_values=pixels, output_attentions=True)
    finally:
        for probe in probes:
            probe.remove()
    length = ids.shape[1]
    image = [p for p in range(length) if ids[0, p] == IMAGE]
    text = list(range(image[-1] + 1, length))
    embeds = captured[0][0].double()
    relevance = (embeds[image] @ embeds[text].T).softmax(dim=1).mean(dim=0)          # over the instruction
    raters = [t for t, r in zip(text, relevance.tolist()) if r > relevance.mean().item()] or text
    attn = reference.attentions[1][0].double().mean(0)
    score = {v: sum(attn[t, v].item() for t in raters) / len(raters) for v in image}
    ranked = sorted(image, key=lambda v: (-score[v], v))
    kept, dropped = ranked[:550], ranked[550:]
    recycled = sorted(dropped, key=lambda v: (-score[v], v))[:math.floor(0.3 * 26) + 1]
    slot = min(recycled)
    expected_mean = captured[2][0, recycled].mean(0)

    reduced = {}
    with ficoco.apply(model, "sparsevlm", 128, layers=[1], keeps=[550]) as handle, torch.no_grad():
        probe = layers[2].register_forward_pre_hook(lambda module, args: reduced.__setitem__("hidden", args[0]))
        try:
            model(input_ids=ids, pixel_values=pixels)
        finally:
            probe.remove()
        trace, counts = handle.last_trace()["llm"], handle.last_counts()[0]
    assert trace[2][0].tolist() == sorted(kept + [slot]) and counts["llm_visual"] == [576, 576, 551, 551]
    present = [p for p in range(length) if p not in set(dropped) - {slot}]
    torch.testing.assert_close(reduced["hidden"][0, present.index(slot)], expected_mean, rtol=1e-5, atol=1e-6)
    untouched = present.index(kept[0])
    torch.testing.assert_close(reduced["hidden"][0, untouched], captured[2][0, kept[0]], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Generation: KV cache vs full recompute; batch vs alone

SPARSE = {"layers": [0, 1, 2], "keeps": [300, 100, 20]}                 # 9, 7 and 3 cluster tokens
CASES = [("fastv", 300, {}), ("dart", 300, {}), ("pdrop", 200, {"boundaries": [1, 2, 3]}),
         ("pdrop", 250, {"boundaries": [0, 2]}),                         # [0, 2]: the cache is reduced from layer 0
         ("sparsevlm", 128, SPARSE)]


def _generate(model, name, budget, ids, pixels, mask=None, inputs=None, **overrides):
    """Greedy generation with the method installed; `inputs` collects each layer's prefill input."""
    layers = model.model.language_model.layers
    with ficoco.apply(model, name, budget, **overrides) as handle, torch.no_grad():
        def record(index):
            def probe(module, args):
                inputs.setdefault(index, args[0])     # the first call is the prefill
            return probe

        # registered after the method's hooks, so they see each layer's reduced input
        probes = [] if inputs is None else [layer.register_forward_pre_hook(record(i))
                                            for i, layer in enumerate(layers)]
        try:
            out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
        finally:
            for probe in probes:
                probe.remove()
        return out, handle.last_trace()["llm"]


@pytest.mark.parametrize("name, budget, overrides", CASES)
def test_cached_generation_equals_full_recompute_without_cache(model, name, budget, overrides):
    """Every decoding step of the cached run against the unmodified model re-run on the whole
    sequence without a cache, with the prefill's dropped tokens hidden as keys from their layer on
    (SparseVLM: its cluster tokens are written in at the prefill's values of their slots)."""
    ids, pixels = _inputs()
    inputs = {}
    out, trace = _generate(model, name, budget, ids, pixels, inputs=inputs, **overrides)
    image = [p for p in range(ids.shape[1]) if ids[0, p] == IMAGE]
    hidden_from, overwrite, alive, present = {}, {}, set(image), list(range(ids.shape[1]))
    for layer in sorted(trace):
        kept = set(trace[layer][0].tolist())
        hidden_from[layer], alive = alive - kept, kept
        present = [p for p in present if p not in hidden_from[layer]]
        if name == "sparsevlm":                   # the surviving image tokens as the reduced prefill holds them
            overwrite[layer] = {p: inputs[layer][0, present.index(p)] for p in kept}
    sequence = out.sequences[0]
    for step, step_logits in enumerate(out.logits):
        prefix = sequence[: ids.shape[1] + step][None]
        recomputed, _, _ = masked_forward(model, prefix, pixels, hidden_from=hidden_from, overwrite=overwrite)
        torch.testing.assert_close(step_logits[0], recomputed[-1], rtol=1e-4, atol=1e-5)
        assert int(recomputed[-1].argmax()) == int(sequence[ids.shape[1] + step])


@pytest.mark.parametrize("name, budget, overrides", CASES)
def test_batch_of_two_equals_each_row_alone(model, name, budget, overrides):
    rows = [prompt(N_IMAGE, *PROMPTS[0]), prompt(N_IMAGE, *PROMPTS[1])]
    ids, mask = left_padded(rows)
    pixels = torch.cat([_inputs(0)[1], _inputs(1)[1]])
    batch, batch_trace = _generate(model, name, budget, ids, pixels, mask, **overrides)
    for row, tokens in enumerate(rows):
        pad = ids.shape[1] - len(tokens)
        alone, alone_trace = _generate(model, name, budget, torch.tensor([tokens]), pixels[row:row + 1],
                                       **overrides)
        assert batch.sequences[row, pad:].tolist() == alone.sequences[0].tolist()
        for step_batch, step_alone in zip(batch.logits, alone.logits):
            torch.testing.assert_close(step_batch[row], step_alone[0], rtol=1e-4, atol=1e-5)
        assert sorted(batch_trace) == sorted(alone_trace)
        for layer in alone_trace:
            assert (batch_trace[layer][row] - pad).tolist() == alone_trace[layer][0].tolist()


def test_prompt_without_instruction_is_left_unreduced_by_fastv_but_not_by_dart(model):
    """FastV and PDrop rank by the last prompt token after the image; DART also runs on image pivots only."""
    ids = torch.tensor([prompt(N_IMAGE, [10, 11], [])])
    pixels = _inputs()[1]
    _, counts, trace, _ = _run(model, "fastv", 300, ids, pixels)
    assert trace == {} and counts[0]["llm_visual"] == [N_IMAGE] * 4
    _, counts, trace, _ = _run(model, "dart", 300, ids, pixels)
    assert counts[0]["llm_visual"] == [N_IMAGE, N_IMAGE, 24, 24] and trace[2].shape == (1, 24)


def test_removal_restores_the_model_exactly(model):
    ids, pixels = _inputs()
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels).logits
        for name, budget, overrides in CASES:
            _run(model, name, budget, ids, pixels, **overrides)
        after = model(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(before, after)
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)

"""FiCoCo-V / -L / -VL: schedules, budgets, and behaviour on tiny random LLaVA models.

Reference checks compare against independent computations: the spec's tables, float64 loops over
eager attention probabilities, and a keep-everything model whose dropped tokens are masked out as
keys (platform-notes §4.2).
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers_tiny import IMAGE, eager_attention, images, left_padded, llava_shaped, n_placeholders, prompt, tiny_llava

import ficoco
from ficoco import methods
from ficoco.budget import InfeasibleBudget
from ficoco.dims import ModelDims, llava_1_5_dims
from ficoco.contract import VisionTokens
from ficoco.methods.shared import FicocoVisionReduce

DIMS_7B = llava_1_5_dims("7b")


# ------------------------------------------------------------------------------------------------
# Schedules (methods.md §3-§5, §9.2) — numbers copied from the spec tables

@pytest.mark.parametrize("budget, discards", [
    (192, [35] * 10 + [34]),
    (128, [41] * 8 + [40] * 3),
    (64, [47] * 6 + [46] * 5),
])
def test_ficoco_v_schedule_matches_spec(budget, discards):
    plan = methods.get("ficoco-v").check_budget(DIMS_7B, budget)
    assert plan.vision.layers == list(range(12, 23))
    assert plan.vision.discards == discards
    assert plan.delivered == budget and plan.layer_average == budget
    # attention runs on 1 + N_{l-1}, the MLP on 1 + N_l; layer 23 is not executed
    assert len(plan.vision_counts) == 23
    assert plan.vision_counts[12] == [577, 577 - discards[0]]
    assert plan.vision_counts[22] == [1 + budget + discards[-1], 1 + budget]


@pytest.mark.parametrize("budget, final, discards, average", [
    (192, 112, [116, 116, 116, 116], 191.75),
    (128, 35, [136, 135, 135, 135], 127.94),
])
def test_ficoco_l_schedule_matches_spec(budget, final, discards, average):
    plan = methods.get("ficoco-l").check_budget(DIMS_7B, budget)
    assert plan.llm.layers == [4, 5, 6, 7]
    assert plan.llm.final == final and plan.llm.discards == discards
    assert plan.llm_visual[:4] == [576] * 4 and plan.llm_visual[8:] == [final] * 24
    assert round(plan.layer_average, 2) == average


@pytest.mark.parametrize("budget, vision_out, final, average", [
    (192, 384, 152, 191.88), (128, 256, 101, 127.59), (64, 128, 50, 63.34),
])
def test_ficoco_vl_schedule_matches_spec(budget, vision_out, final, average):
    plan = methods.get("ficoco-vl").check_budget(DIMS_7B, budget)
    assert plan.delivered == vision_out and plan.llm.final == final
    assert round(plan.layer_average, 2) == average


def test_ficoco_v_official_delivers_114():
    plan = methods.get("ficoco_v_official").check_budget(DIMS_7B, None)
    assert plan.vision.discards == [42] * 11 and plan.delivered == 114
    with pytest.raises(ValueError, match="114"):
        methods.get("ficoco-v-official").check_budget(DIMS_7B, 64)


def test_infeasible_budget_names_minimum_and_feasible_start():
    with pytest.raises(InfeasibleBudget) as error:
        methods.get("ficoco-l").check_budget(DIMS_7B, 64)
    message = str(error.value)
    assert "ficoco-l" in message and "B=64" in message and "s=4" in message
    assert "72.88" in message                  # spec §4: minimum over all schedules ≈ 72.9
    assert "s <= 3" in message                 # spec §2.1: 64 needs s ≤ 3
    # the start the message suggests is indeed feasible, the configured one is not
    assert methods.get("ficoco-l").check_budget(DIMS_7B, 64, start=2).llm.final == 1
    assert methods.get("ficoco-l").check_budget(DIMS_7B, 64, start=3, window=1).llm.final == 11


def test_infeasible_budget_fails_before_touching_the_model():
    model = tiny_llava(llm_layers=4)
    with pytest.raises(InfeasibleBudget):
        ficoco.apply(model, "ficoco-l", 2, start=2, window=2)
    assert not hasattr(model, "_ficoco_handle")
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_overrides_are_validated():
    method = methods.get("ficoco-v")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['lamda'\]; valid parameters: lam, coef"):
        method.check_budget(DIMS_7B, 64, lamda=0.5)
    with pytest.raises(ValueError, match=r"lam=1.5 must be a number in \[0, 1\]"):
        method.check_budget(DIMS_7B, 64, lam=1.5)
    with pytest.raises(ValueError, match="start=23, end=22"):
        method.check_budget(DIMS_7B, 64, start=23)
    plan = method.check_budget(DIMS_7B, 64, lam=0.5, start=3)
    assert plan.params["lam"] == 0.5 and plan.vision.layers == list(range(3, 23))
    with pytest.raises(ValueError, match="valid methods: vanilla, ficoco-v, ficoco-l, ficoco-vl"):
        methods.get("no-such-method")


def test_registry_is_fixed_and_describes_every_method():
    names = methods.names()
    assert names[:5] == ["vanilla", "ficoco-v", "ficoco-l", "ficoco-vl", "ficoco-v-official"]   # baselines follow
    names.append("x")
    assert "x" not in methods.names()
    assert methods.get("ficoco-v").defaults == {"lam": 0.35, "coef": 2.0, "penalty_window": 2, "eps": 0.998,
                                                "k": None, "semantic": "cls", "start": 12, "end": None}
    assert methods.get("ficoco-l").defaults == {"beta": 0.6, "gamma": 0.6, "eps": 0.998, "k": None, "start": 4,
                                                "window": 4, "placement": "input"}
    assert methods.get("ficoco-vl").defaults["vision_factor"] == 2
    assert {methods.get(n).phase for n in methods.names()[:5]} == {"none", "vision", "llm", "both"}


def test_methods_cli_lists_sites_attention_stages_parameters(capsys):
    from ficoco.methods.cli import main

    assert main([]) == 0
    out = capsys.readouterr().out
    for name in methods.names():
        assert name in out
    assert "LLM layers" in out and "vision encoder layers" in out
    assert "lam = 0.35" in out and "beta = 0.6" in out and "vision_factor = 2" in out
    assert "filter" in out and "correlate" in out and "compress" in out


# ------------------------------------------------------------------------------------------------
# FiCoCo-V step: a float64 loop reference of methods.md §3 for one layer

def _reference_vision_layer(x, attn, positions, n_discard, grid_w, lam=0.35, coef=2.0, eps=0.998, semantic=None):
    """One FiCoCo-V layer for one image, written from the spec with Python loops in float64.

    semantic: the semantic term per patch (default: CLS attention, attn[0, i])."""
    x, attn = x.double(), attn.double()
    n = attn.shape[0] - 1
    semantic = [attn[0, i].item() for i in range(1, n + 1)] if semantic is None else semantic
    scores = []
    for i in range(1, n + 1):
        received = sum(attn[j, i].item() for j in range(1, n + 1) if j != i) / (n - 1)
        scores.append(lam * received - (1 - lam) * semantic[i - 1])
    windows = {}
    for index, position in enumerate(positions):
        key = (position // grid_w // 2, position % grid_w // 2)
        best = windows.get(key)
        if best is None or scores[index] > scores[best] or (scores[index] == scores[best] and position < positions[best]):
            windows[key] = index
    for index in windows.values():
        scores[index] *= coef
    order = sorted(range(n), key=lambda i: (-scores[i], positions[i]))
    sources, targets = sorted(order[:n_discard]), sorted(order[n_discard:])
    merged = {t: (x[1 + t].clone(), 1.0) for t in targets}
    for s in sources:
        row = [attn[1 + s, 1 + t].item() for t in targets]
        ranked = sorted(row)
        h = (len(row) - 1) * eps
        lo = math.floor(h)
        tau = ranked[lo] + (h - lo) * (ranked[min(lo + 1, len(row) - 1)] - ranked[lo])
        chosen = [t for t, c in zip(targets, row) if c >= tau]
        total = sum(attn[1 + s, 1 + t].item() for t in chosen)
        for t in chosen:
            alpha = attn[1 + s, 1 + t].item() / total
            value, weight = merged[t]
            merged[t] = (value + alpha * x[1 + s], weight + alpha)
    out = torch.stack([x[0]] + [merged[t][0] / merged[t][1] for t in targets])
    return out, [positions[t] for t in targets]


def test_ficoco_v_step_matches_float64_reference_and_never_touches_cls():
    generator = torch.Generator().manual_seed(0)
    n, width, grid = 36, 8, (6, 6)
    logits = torch.randn(1, 1 + n, 1 + n, generator=generator) * 3
    logits[:, 1:, 0] += 6.0                       # every patch attends mostly to CLS: CLS must still not be a target
    attn = logits.softmax(-1)
    x = torch.randn(1, 1 + n, width, generator=generator)
    positions = torch.arange(n)[None]

    class Scores:
        def probs(self):
            return attn

    step = FicocoVisionReduce(discards={0: 20}, grid_hw=grid, lam=0.35, coef=2.0, penalty_window=2, eps=0.998,
                              k=None)
    out = step(0, VisionTokens(x, positions), Scores())
    expected, kept = _reference_vision_layer(x[0], attn[0], positions[0].tolist(), 20, grid[1])
    assert out.positions[0].tolist() == kept and kept == sorted(kept) and len(kept) == n - 20
    assert torch.equal(out.hidden[0, 0], x[0, 0])                     # CLS kept and unchanged
    torch.testing.assert_close(out.hidden[0].double(), expected, rtol=1e-5, atol=1e-6)


def _reference_key_mean(keys):
    """−cos(μ, P_i) for one image in float64 loops: P_i = patch i's key averaged over heads, μ = mean P_i."""
    heads, tokens, width = keys.shape
    patch_keys = [[sum(keys[h, i, c].item() for h in range(heads)) / heads for c in range(width)]
                  for i in range(1, tokens)]
    mean = [sum(key[c] for key in patch_keys) / len(patch_keys) for c in range(width)]
    mean_norm = math.sqrt(sum(v * v for v in mean))
    return [-sum(a * b for a, b in zip(key, mean)) / (math.sqrt(sum(a * a for a in key)) * mean_norm)
            for key in patch_keys]


def test_ficoco_v_key_mean_step_matches_float64_reference():
    """The CLS-free semantic term (v4 App. Table 9): the step's sources and merges follow the spec's layer
    with a_i = −cos(μ, P_i) in place of CLS attention, and differ from the CLS step's."""
    generator = torch.Generator().manual_seed(1)
    n, width, grid = 36, 8, (6, 6)
    attn = (torch.randn(1, 1 + n, 1 + n, generator=generator) * 3).softmax(-1)
    keys = torch.randn(1, 4, 1 + n, 5, generator=generator) + torch.randn(1, 1, 1, 5, generator=generator)
    x = torch.randn(1, 1 + n, width, generator=generator)
    positions = torch.arange(n)[None]

    class Scores:
        def probs(self):
            return attn

        def keys(self):
            return keys

    settings = dict(discards={0: 20}, grid_hw=grid, lam=0.35, coef=2.0, penalty_window=2, eps=0.998, k=None)
    out = FicocoVisionReduce(**settings, semantic="key-mean")(0, VisionTokens(x, positions), Scores())
    expected, kept = _reference_vision_layer(x[0], attn[0], positions[0].tolist(), 20, grid[1],
                                             semantic=_reference_key_mean(keys[0]))
    assert out.positions[0].tolist() == kept
    torch.testing.assert_close(out.hidden[0].double(), expected, rtol=1e-5, atol=1e-6)
    with_cls = FicocoVisionReduce(**settings)(0, VisionTokens(x, positions), Scores())
    assert with_cls.positions[0].tolist() != kept


# ------------------------------------------------------------------------------------------------
# FiCoCo-V on a LLaVA-shaped model (336 px / patch 14: 577 vision tokens, 576 placeholders)

@pytest.fixture(scope="module")
def shaped():
    return llava_shaped(vision_layers=5, llm_layers=2)          # executed vision layers 0..3


def _shaped_inputs(model, after=(12, 13, 14)):
    ids = torch.tensor([prompt(n_placeholders(model), [10, 11], list(after))])
    return ids, torch.ones_like(ids), images(1, 336)


def test_ficoco_v_delivers_budget_in_order_on_llava_shape(shaped):
    ids, mask, pixels = _shaped_inputs(shaped)
    seen = {}
    probe = shaped.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with ficoco.apply(shaped, "ficoco-v", 64, start=1) as handle, torch.no_grad():
            shaped(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            trace = handle.last_trace()["vision"]
            counts = handle.last_counts()[0]
    finally:
        probe.remove()
    text_tokens = ids.shape[1] - 576
    assert seen["embeds"].shape[1] == text_tokens + 64                 # exactly B image tokens reach the LLM
    assert counts["visual_delivered"] == 64 and counts["llm_visual"] == [64, 64]
    assert sorted(trace) == [1, 2, 3]
    previous = set(range(576))
    for layer in (1, 2, 3):
        kept = trace[layer][0].tolist()
        assert kept == sorted(kept) and len(set(kept)) == len(kept)    # original order preserved
        assert set(kept) <= previous                                   # a discarded patch never comes back
        previous = set(kept)
    assert len(previous) == 64
    assert counts["vision"] == [[577, 577], [577, 406], [406, 235], [235, 65]]   # spread(512, 3); CLS kept


def test_ficoco_v_key_mean_runs_on_the_model_at_its_budget(shaped):
    ids, mask, pixels = _shaped_inputs(shaped)
    kept = {}
    for semantic in ("cls", "key-mean"):
        with ficoco.apply(shaped, "ficoco-v", 64, start=1, semantic=semantic) as handle, torch.no_grad():
            shaped(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            counts = handle.last_counts()[0]
            kept[semantic] = handle.last_trace()["vision"][3][0].tolist()
        assert counts["visual_delivered"] == 64 and counts["llm_visual"] == [64, 64]
    assert len(kept["key-mean"]) == 64 and kept["key-mean"] != kept["cls"]
    with pytest.raises(ValueError, match="semantic"):
        methods.get("ficoco-v").check_budget(llava_1_5_dims("7b"), 64, semantic="mean")


def test_ficoco_v_pruning_keeps_vanilla_features_at_reference_positions(shaped):
    """k=0 at the last executed layer: the delivered features are the unreduced layer output at the
    positions an independent float64 scoring of that layer's eager attention selects."""
    ids, mask, pixels = _shaped_inputs(shaped)
    tower = shaped.model.vision_tower
    with eager_attention(tower), torch.no_grad():
        reference = tower(pixels, output_hidden_states=True, output_attentions=True)
    attn = reference.attentions[3][0].double().mean(0)             # layer 3, head mean, (577, 577)
    features = reference.hidden_states[4][0, 1:]                    # layer-3 output patches (576, D)
    n = 576
    received = (attn[1:, 1:].sum(0) - attn[1:, 1:].diagonal()) / (n - 1)
    scores = (0.35 * received - 0.65 * attn[0, 1:]).tolist()
    for r in range(0, 24, 2):                                       # 2x2 windows on the 24x24 grid
        for c in range(0, 24, 2):
            cells = [(rr * 24 + cc) for rr in (r, r + 1) for cc in (c, c + 1)]
            best = max(cells, key=lambda p: (scores[p], -p))
            scores[best] *= 2.0
    expected_kept = sorted(sorted(range(n), key=lambda p: (-scores[p], p))[512:])

    captured = {}
    probe = shaped.model.multi_modal_projector.register_forward_pre_hook(
        lambda module, args: captured.update(features=args[0]))
    try:
        with ficoco.apply(shaped, "ficoco-v", 64, start=3, end=3, k=0) as handle, torch.no_grad():
            shaped(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            kept = handle.last_trace()["vision"][3][0].tolist()
    finally:
        probe.remove()
    assert kept == expected_kept
    torch.testing.assert_close(captured["features"][0], features[kept], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# FiCoCo-L: KV cache vs full recompute; pruning vs a masked-attention reference

def _generate(model, ids, mask, pixels, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6,
                              do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("start", [0, 1])
def test_ficoco_l_cache_equals_recompute_without_cache(start):
    """β = γ = 1 makes the reduction depend only on the tokens up to the image, so a recompute of the
    whole sequence at every step (use_cache=False) applies exactly the same reduction."""
    model = tiny_llava(llm_layers=4, llm_kv_heads=2)
    n = n_placeholders(model)
    ids, mask = left_padded([prompt(n, [10, 11, 12], [13, 14, 15]), prompt(n, [16], [17, 18])])
    pixels = images(2, 28)
    with ficoco.apply(model, "ficoco-l", 8, start=start, window=2, beta=1.0, gamma=1.0):
        cached = _generate(model, ids, mask, pixels)
        recomputed = _generate(model, ids, mask, pixels, use_cache=False)
        kv_lengths = [layer.keys.shape[2] for layer in cached.past_key_values.layers]
    assert torch.equal(cached.sequences, recomputed.sequences)
    for step_cached, step_recomputed in zip(cached.logits, recomputed.logits):
        torch.testing.assert_close(step_cached, step_recomputed, rtol=1e-5, atol=1e-5)
    # the cache of layers >= s holds only kept positions (+ the generated tokens)
    full, generated = ids.shape[1], cached.sequences.shape[1] - ids.shape[1] - 1
    plan = methods.get("ficoco-l").check_budget(ModelDims.from_config(model.config), 8, start=start, window=2)
    expected = [full + generated - (n - visual) for visual in plan.llm_visual]
    assert kv_lengths == expected and kv_lengths[-1] < full


def _masked_reference_logits(model, ids, pixels, start, discards, beta=0.6):
    """Keep every token; at each reducing layer choose the discards with float64 scores computed
    from the layer's own q/k, and hide dropped tokens as keys with a boolean 4-D mask."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    length = ids.shape[1]
    visual = [p for p in range(length) if ids[0, p] == IMAGE]
    instruction = list(range(visual[-1] + 1, length))
    dropped: set[int] = set()

    def mask_now():
        allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))
        for p in dropped:
            allowed[:, p] = False
            allowed[p, p] = True                     # a dropped query still sees itself (its output is unused)
        return allowed[None, None]

    def hook_for(index, layer):
        def pre_hook(module, args, kwargs):
            if index in discards:
                attn_module = layer.self_attn
                hidden = layer.input_layernorm(args[0])
                q = attn_module.q_proj(hidden).view(1, length, -1, attn_module.head_dim).transpose(1, 2)
                k = attn_module.k_proj(hidden).view(1, length, -1, attn_module.head_dim).transpose(1, 2)
                cos, sin = kwargs["position_embeddings"]
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                logits = (q.double() @ k.double().transpose(-1, -2)) * attn_module.scaling
                logits = logits.masked_fill(~mask_now(), float("-inf"))
                probs = logits.softmax(-1).mean(1)[0]                    # (L, L)
                current = [p for p in visual if p not in dropped]
                score = {}
                for i in current:
                    received = sum(probs[j, i].item() for j in current if j != i) / (len(current) - 1)
                    from_instruction = sum(probs[k_, i].item() for k_ in instruction) / len(instruction)
                    score[i] = beta * received - (1 - beta) * from_instruction
                dropped.update(sorted(current, key=lambda p: (-score[p], p))[:discards[index]])
            if dropped:
                return args, {**kwargs, "attention_mask": mask_now()}
            return None
        return pre_hook

    layers = model.model.language_model.layers
    hooks = [layer.register_forward_pre_hook(hook_for(i, layer), with_kwargs=True)
             for i, layer in enumerate(layers) if i >= start]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixels).logits[0]
    finally:
        for hook in hooks:
            hook.remove()
    kept = [p for p in range(length) if p not in dropped]
    return logits[kept], kept


def test_ficoco_l_pruning_equals_masked_attention_reference():
    model = tiny_llava(llm_layers=4, llm_kv_heads=2, vision_layers=3)
    n = n_placeholders(model)
    ids = torch.tensor([prompt(n, [10, 11], [12, 13, 14, 15])])
    pixels = images(1, 28, seed=3)
    with ficoco.apply(model, "ficoco-l", 8, start=1, window=2, k=0) as handle, torch.no_grad():
        reduced = model(input_ids=ids, pixel_values=pixels).logits[0]
        plan, trace = handle.plan, handle.last_trace()["llm"]
    discards = dict(zip(plan.llm.layers, plan.llm.discards))
    expected, kept = _masked_reference_logits(model, ids, pixels, 1, discards)
    assert trace[2][0].tolist() == [p for p in kept if ids[0, p] == IMAGE]
    assert reduced.shape == expected.shape
    torch.testing.assert_close(reduced, expected, rtol=1e-4, atol=1e-5)


def test_ficoco_l_merging_changes_only_what_it_should():
    """Default (adaptive merging) keeps the same token count as pruning, and the text before the
    image is untouched by the reduction at every position."""
    model = tiny_llava(llm_layers=4, vision_layers=3)
    n = n_placeholders(model)
    ids = torch.tensor([prompt(n, [10, 11, 12], [13, 14, 15])])
    pixels = images(1, 28)
    with torch.no_grad():
        vanilla = model(input_ids=ids, pixel_values=pixels).logits[0]
        with ficoco.apply(model, "ficoco-l", 8, start=1, window=2) as handle:
            merged = model(input_ids=ids, pixel_values=pixels).logits[0]
            final = handle.plan.llm.final
        with ficoco.apply(model, "ficoco-l", 8, start=1, window=2, k=0):
            pruned = model(input_ids=ids, pixel_values=pixels).logits[0]
    assert merged.shape == pruned.shape == (ids.shape[1] - (16 - final), vanilla.shape[1])
    torch.testing.assert_close(merged[:4], vanilla[:4], rtol=0, atol=1e-6)      # BOS + text before the image
    assert not torch.allclose(merged[-1], pruned[-1])                           # merging moved information


def test_bench_reports_every_configuration_with_predictions(tmp_path, capsys):
    """`ficoco bench` end to end on a small LLaVA-shaped model (no timing assertions)."""
    import json

    from ficoco.bench import main

    out = tmp_path / "bench.json"
    assert main(["--repeats", "5", "--warmup", "0", "--step-repeats", "1", "--vision-layers", "4",
                 "--vision-hidden", "64", "--llm-layers", "8", "--llm-hidden", "64", "--llm-mlp", "128",
                 "--threads", "1", "--no-llava-scale", "--methods", "ficoco-v", "ficoco-l", "ficoco-vl",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {(row["method"], row["budget"]): row for row in result["rows"]}
    assert len(rows) == 10 and rows[("vanilla", None)]["predicted_speedup"] == 1.0
    for (method, budget), row in rows.items():
        assert len(row["prefill_ms"]) == 5
        if method != "vanilla":
            assert row["visual_average"] <= budget and row["predicted_speedup"] > 1.0
            assert row["step_share"] and f"| {method} | {budget} |" in table
    assert rows[("ficoco-v", 64)]["overrides"] == {"start": 2, "end": None}   # 12/23 of the 3 executed layers
    assert rows[("ficoco-l", 192)]["overrides"] == {"start": 1, "window": 1}
    assert rows[("ficoco-l", 64)]["overrides"] == {"start": 0, "window": 1}  # start 1 cannot reach 64


def test_the_clip_attention_matrix_is_float32_in_a_half_precision_tower():
    """methods.md §0: A is computed in float32. In a bfloat16 tower the scores' q·k products are taken in
    float32 too: the head-mean probabilities match a float64 computation from the same q and k to float32
    precision, where bfloat16 products would be off by about 1e-3."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPAttention

    from ficoco.models.clip import clip_attention

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=256, num_attention_heads=4, intermediate_size=512)
    attn = CLIPAttention(config).to(torch.bfloat16).eval()
    x = (3 * torch.randn(1, 50, 256)).to(torch.bfloat16)
    with torch.no_grad():
        _, q, k, head_mean = clip_attention(attn, x, None, with_probs=True)
    reference = (q.double() @ k.double().transpose(-1, -2) * attn.scale).softmax(-1).mean(1)
    assert head_mean.dtype == torch.float32
    error = (head_mean.double() - reference).abs().max().item()
    rounded = (q @ k.transpose(-1, -2) * attn.scale).float().softmax(-1).mean(1)      # the products in bfloat16
    assert error < 1e-6 < (rounded.double() - reference).abs().max().item()

"""Baselines after the vision tower (VisionZip, PruMerge, PruMerge+, TopK-CLS, Random, pooling) and on
the projector output (DivPrune): schedules, errors, and behaviour on a LLaVA-shaped model.

The model has LLaVA-1.5's token geometry (336 px / patch 14: 577 vision tokens, 576 placeholders)
with 3 small CLIP layers (LLaVA reads layer 1's output, layer 2 is "the next layer") and one LLM
layer. References are independent: eager attention probabilities of the untouched tower, the
layer weights applied by hand, and float64 Python loops written from the spec.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers_tiny import (IMAGE, eager_attention, generate_batch_and_alone, images, llava_shaped, n_placeholders,
                          one_image_prompt, prompt)

import ficoco
from ficoco import methods
from ficoco.dims import llava_1_5_dims

DIMS_7B = llava_1_5_dims("7b")
SHAPE = dict(vision_layers=3, vision_hidden=32, vision_heads=2, vision_mlp=64, llm_layers=1, llm_hidden=32,
             llm_heads=2, llm_mlp=64)
FEATURE_LAYER = 1            # hidden_states[-2] of 3 layers = the output of layer 1
BUDGET = 64
BEFORE, AFTER = [10, 11], [12, 13, 14]
TEXT = 1 + len(BEFORE) + len(AFTER)
IMAGE_START = 1 + len(BEFORE)

# test id -> (method, overrides)
CONFIGS = {
    "visionzip": ("visionzip", {}),
    "prumerge": ("prumerge", {}),
    "prumerge-plus": ("prumerge-plus", {}),
    "topk-cls": ("topk-cls", {}),
    "random": ("random", {}),
    "pooling": ("pooling", {}),
    "divprune": ("divprune", {}),
    "divprune-original": ("divprune", {"positions": "original"}),
}
NEW_METHODS = ["visionzip", "prumerge", "prumerge-plus", "topk-cls", "random", "pooling", "divprune"]


# ------------------------------------------------------------------------------------------------
# Schedules and errors (no model) — numbers copied from the spec (§8.6, §8.7, §8.12, §9.2)

@pytest.mark.parametrize("budget, dominant, contextual", [(64, 54, 10), (128, 108, 20), (192, 162, 30)])
def test_visionzip_split_matches_spec(budget, dominant, contextual):
    post = methods.get("visionzip").check_budget(DIMS_7B, budget).post_vision.details
    assert (post["dominant"], post["contextual"]) == (dominant, contextual)
    post = methods.get("visionzip").check_budget(DIMS_7B, 100, contextual=7).post_vision.details
    assert (post["dominant"], post["contextual"]) == (93, 7)                   # any other split: D = B − C


@pytest.mark.parametrize("budget, important, raster", [(192, 48, 143), (128, 32, 95), (64, 16, 47)])
def test_prumerge_plus_split_matches_spec(budget, important, raster):
    post = methods.get("prumerge-plus").check_budget(DIMS_7B, budget).post_vision.details
    assert (post["important"], post["raster"], post["extra"], post["knn"]) == (important, raster, 1, 32)
    post = methods.get("prumerge").check_budget(DIMS_7B, budget).post_vision.details
    assert (post["important"], post["raster"], post["extra"]) == (budget - 1, 0, 1)


@pytest.mark.parametrize("budget, grid", [(192, [12, 16]), (128, [8, 16]), (64, [8, 8])])
def test_pooling_grid_matches_spec(budget, grid):
    assert methods.get("pooling").check_budget(DIMS_7B, budget).post_vision.details["out_hw"] == grid


@pytest.mark.parametrize("name", NEW_METHODS)
@pytest.mark.parametrize("budget", [192, 128, 64])
def test_every_post_vision_method_delivers_b_in_every_layer(name, budget):
    plan = methods.get(name).check_budget(DIMS_7B, budget)
    assert plan.delivered == budget and plan.llm_visual == [budget] * 32 and plan.layer_average == budget
    assert plan.vision_counts == [[577, 577]] * 23                        # the encoder itself is unreduced
    unreduced = methods.get(name).check_budget(DIMS_7B, None)
    assert unreduced.delivered == 576 and methods.get(name).steps(unreduced) == ()


def test_divprune_original_positions_reduce_at_llm_layer_0():
    plan = methods.get("divprune").check_budget(DIMS_7B, 64, positions="original")
    assert plan.delivered == 576 and plan.llm.layers == [0] and plan.llm.final == 64
    assert plan.llm_visual == [64] * 32 and plan.layer_average == 64
    assert plan.params["positions"] == "original"                          # the choice is logged


def test_registry_describes_the_new_methods():
    assert set(NEW_METHODS) <= set(methods.names())
    sites = {name: (methods.get(name).phase, methods.get(name).acts_on) for name in NEW_METHODS}
    assert sites["divprune"] == ("projector", ("projector",))
    assert all(sites[name] == ("vision", ("vision",)) for name in NEW_METHODS if name != "divprune")
    for name in NEW_METHODS:
        method = methods.get(name)
        assert set(method.stages) == {"filter", "correlate", "compress"} and method.needs_attention
    assert methods.get("random").defaults == {"seed": 0}
    assert methods.get("prumerge_plus").defaults == {"knn": 32}
    assert methods.get("divprune").defaults == {"positions": "contiguous"}
    assert methods.get("visionzip").defaults == {"contextual": None}
    assert "CLS row" in methods.get("topk-cls").needs_attention and methods.get("pooling").needs_attention == "none"


def test_bad_budgets_and_overrides_name_the_problem():
    with pytest.raises(ValueError, match="pooling: budget 67 has no factor pair"):
        methods.get("pooling").check_budget(DIMS_7B, 67)
    with pytest.raises(ValueError, match=r"visionzip: contextual=64 leaves 0 dominant tokens .* contextual <= 63"):
        methods.get("visionzip").check_budget(DIMS_7B, 64, contextual=64)
    with pytest.raises(ValueError, match=r"positions='gappy' must be one of \['contiguous', 'original'\]"):
        methods.get("divprune").check_budget(DIMS_7B, 64, positions="gappy")
    with pytest.raises(ValueError, match="seed=-1 must be an integer >= 0"):
        methods.get("random").check_budget(DIMS_7B, 64, seed=-1)
    with pytest.raises(ValueError, match="prumerge: budget 1 must be >= 2"):
        methods.get("prumerge").check_budget(DIMS_7B, 1)
    with pytest.raises(ValueError, match="knn=600 must be <= 575"):
        methods.get("prumerge-plus").check_budget(DIMS_7B, 64, knn=600)
    with pytest.raises(ValueError, match=r"layer after the feature layer \(23\)"):
        methods.get("prumerge").check_budget(dataclasses.replace(DIMS_7B, feature_layer=-1), 64)
    with pytest.raises(ValueError, match="this method has no parameters"):
        methods.get("topk-cls").check_budget(DIMS_7B, 64, k=3)


# ------------------------------------------------------------------------------------------------
# On the LLaVA-shaped model: one reduced forward per configuration, probed at the projector and LLM

@pytest.fixture(scope="module")
def model():
    return llava_shaped(**SHAPE)


@pytest.fixture(scope="module")
def inputs(model):
    return one_image_prompt(model, BEFORE, AFTER)


@pytest.fixture(scope="module")
def reference(model, inputs):
    """The untouched tower with eager attention, and the feature layer's keys from its weights."""
    tower = model.model.vision_tower
    with torch.no_grad():
        with eager_attention(tower):
            out = tower(inputs[2], output_hidden_states=True, output_attentions=True)
        layer = tower.encoder.layers[FEATURE_LAYER]
        attn = layer.self_attn
        keys = attn.k_proj(layer.layer_norm1(out.hidden_states[FEATURE_LAYER][0]))              # (577, D)
        features = out.hidden_states[FEATURE_LAYER + 1][0]                                      # (577, D)
        projected = model.model.multi_modal_projector(features[1:])                            # (576, D_llm)
    return {
        "cls_row": out.attentions[FEATURE_LAYER][0, :, 0].double().mean(0),                   # (577,)
        "keys_mean": keys.view(577, attn.num_heads, attn.head_dim).mean(1).double(),           # (577, d)
        "features": features.double(),
        "projected": projected.double(),
    }


def _run(model, inputs, name, overrides, budget=BUDGET):
    """One reduced forward; what reached the projector and the LLM, the counts, trace and plan."""
    seen = {}
    projector = model.model.multi_modal_projector
    before = projector.register_forward_hook(lambda module, args, out: seen.update(projected_full=out))
    try:
        with ficoco.apply(model, name, budget, **overrides) as handle, torch.no_grad():
            probes = [
                projector.register_forward_pre_hook(lambda module, args: seen.update(projector_input=args[0])),
                projector.register_forward_hook(lambda module, args, out: seen.update(projected=out)),
                model.model.language_model.register_forward_pre_hook(
                    lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True),
            ]
            try:
                ids, mask, pixels = inputs
                model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            finally:
                for probe in probes:
                    probe.remove()
            seen.update(counts=handle.last_counts()[0], trace=handle.last_trace(), plan=handle.plan)
    finally:
        before.remove()
    return seen


@pytest.fixture(scope="module")
def runs(model, inputs):
    return {config: _run(model, inputs, *CONFIGS[config]) for config in CONFIGS}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_llm_receives_exactly_the_budget(runs, config):
    run = runs[config]
    counts, plan = run["counts"], run["plan"]
    assert counts["vision"] == [[577, 577]] * 2 == plan.vision_counts      # executed CLIP layers 0..1
    assert counts["llm_visual"] == [BUDGET] and counts["llm"] == [TEXT + BUDGET]
    if config == "divprune-original":                                       # all embedded, layer 0 keeps B
        assert run["embeds"].shape[1] == TEXT + 576 and counts["visual_delivered"] == 576
    else:
        assert run["embeds"].shape[1] == TEXT + BUDGET and counts["visual_delivered"] == BUDGET
        image_span = run["embeds"][0, IMAGE_START:IMAGE_START + BUDGET]
        torch.testing.assert_close(image_span, run["projected"][0])          # the reduced tokens, contiguous


def _top(scores: list[float], k: int) -> list[int]:
    """Positions of the k highest scores (ties to the lower position), ascending."""
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def test_topk_cls_keeps_the_top_k_of_the_cls_row(runs, reference):
    kept = _top(reference["cls_row"][1:].tolist(), BUDGET)
    assert runs["topk-cls"]["trace"]["vision"][FEATURE_LAYER][0].tolist() == kept
    torch.testing.assert_close(runs["topk-cls"]["projector_input"][0].double(), reference["features"][1:][kept],
                               rtol=1e-4, atol=1e-5)


def test_visionzip_dominant_and_contextual_tokens(runs, reference):
    dominant, contextual = 54, 10
    post = runs["visionzip"]["plan"].post_vision.details
    assert (post["dominant"], post["contextual"]) == (dominant, contextual)
    x, keys = reference["features"][1:], reference["keys_mean"][1:]
    top = _top(reference["cls_row"][1:].tolist(), dominant - 1)
    rest = [p for p in range(576) if p not in set(top)]
    step = len(rest) // contextual
    anchors = [rest[i * step] for i in range(contextual)]
    members = {anchor: [] for anchor in anchors}
    unit = keys / keys.norm(dim=-1, keepdim=True)
    for p in rest:
        if p not in members:
            best = max(anchors, key=lambda a: (float(unit[p] @ unit[a]), -a))
            members[best].append(p)
    assert sum(map(len, members.values())) == 576 - (dominant - 1) - contextual
    context = [x[a] + (torch.stack([x[p] for p in members[a]]).mean(0) if members[a] else 0) for a in anchors]
    expected = torch.stack([reference["features"][0], *[x[p] for p in top], *context])
    delivered = runs["visionzip"]["projector_input"][0].double()
    assert delivered.shape[0] == dominant + contextual == BUDGET
    torch.testing.assert_close(delivered[0], reference["features"][0], rtol=1e-4, atol=1e-5)   # CLS kept first
    torch.testing.assert_close(delivered, expected, rtol=1e-4, atol=1e-4)
    assert runs["visionzip"]["trace"]["vision"][FEATURE_LAYER][0].tolist() == sorted(top + anchors)


def _prumerge_reference(model, features, important, raster, knn=32):
    """PruMerge(+) from the spec in float64 loops, with the next layer's norm and q/k applied by hand."""
    layer = model.model.vision_tower.encoder.layers[FEATURE_LAYER + 1]
    with torch.no_grad():
        normed = layer.layer_norm1(features.float())
        q, k = layer.self_attn.q_proj(normed[:1]).double(), layer.self_attn.k_proj(normed).double()
    a = ((q @ k.T) / k.shape[-1] ** 0.5).softmax(-1)[0, 1:].tolist()          # CLS -> patches, not renormalised
    kept = _top(a, important)
    rest = [p for p in range(576) if p not in set(kept)]
    kept = sorted(kept + [rest[i * len(rest) // raster] for i in range(raster)]) if raster else kept
    unit = k[1:] / k[1:].norm(dim=-1, keepdim=True)
    x = features[1:]
    out = []
    for i in kept:
        cosine = (unit @ unit[i]).tolist()
        nearest = sorted((j for j in range(576) if j != i), key=lambda j: (-cosine[j], j))[:knn]
        out.append(x[i] + sum(a[j] * x[j] for j in nearest))
    out.append(sum(a[j] * x[j] for j in range(576) if j not in set(kept)))
    return kept, torch.stack(out)


@pytest.mark.parametrize("config, important, raster", [("prumerge", 63, 0), ("prumerge-plus", 16, 47)])
def test_prumerge_matches_float64_reference(model, runs, reference, config, important, raster):
    kept, expected = _prumerge_reference(model, reference["features"], important, raster)
    assert runs[config]["trace"]["vision"][FEATURE_LAYER][0].tolist() == kept
    torch.testing.assert_close(runs[config]["projector_input"][0].double(), expected, rtol=1e-4, atol=1e-4)


def test_pooling_equals_the_manual_cell_mean(runs, reference):
    grid = reference["features"][1:].view(24, 24, -1)
    delivered = runs["pooling"]["projector_input"][0].double()                # 8x8 cells of 3x3 patches
    for i in range(8):
        for j in range(8):
            cell = [grid[r, c] for r in range(3 * i, 3 * i + 3) for c in range(3 * j, 3 * j + 3)]
            torch.testing.assert_close(delivered[8 * i + j], sum(cell) / 9, rtol=1e-4, atol=1e-5)


def _greedy_max_min(x: torch.Tensor, k: int) -> list[int]:
    """DivPrune's selection as a plain loop: distance 1 − cosine, float64."""
    unit = x.double() / x.double().norm(dim=-1, keepdim=True)
    distance = (1 - unit @ unit.T).tolist()
    n = len(distance)
    nearest = [min(distance[i][j] for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    to_chosen = list(distance[chosen[0]])
    while len(chosen) < k:
        pick = max((i for i in range(n) if i not in chosen), key=lambda i: (to_chosen[i], -i))
        chosen.append(pick)
        to_chosen = [min(a, b) for a, b in zip(to_chosen, distance[pick])]
    return sorted(chosen)


def test_divprune_equals_brute_force_greedy_on_the_projected_tokens(runs, reference):
    projected = runs["divprune"]["projected_full"][0]                           # captured before the step
    torch.testing.assert_close(projected.double(), reference["projected"], rtol=1e-4, atol=1e-5)
    kept = _greedy_max_min(projected, BUDGET)
    assert runs["divprune"]["trace"]["vision"]["projector"][0].tolist() == kept
    assert torch.equal(runs["divprune"]["projected"][0], projected[kept])
    # original positions: the same set, chosen at LLM layer 0 from the image span of the input embeddings
    original = runs["divprune-original"]["trace"]["llm"][0][0] - IMAGE_START
    assert original.tolist() == kept


def test_random_is_reproducible_from_its_seed(model, inputs, runs, reference):
    first = runs["random"]["trace"]["vision"][FEATURE_LAYER][0].tolist()
    again = _run(model, inputs, "random", {"seed": 0})["trace"]["vision"][FEATURE_LAYER][0].tolist()
    other = _run(model, inputs, "random", {"seed": 1})["trace"]["vision"][FEATURE_LAYER][0].tolist()
    assert first == again and first != other
    assert len(set(first)) == BUDGET and first == sorted(first)
    torch.testing.assert_close(runs["random"]["projector_input"][0].double(), reference["features"][1:][first],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_batch_of_two_left_padded_equals_each_alone_under_generate(model, config):
    name, overrides = CONFIGS[config]
    n = n_placeholders(model)
    prompts = [prompt(n, [10, 11, 12, 13], [14, 15, 16]), prompt(n, [17], [18, 19, 20, 21, 22])]
    pixels = images(2, 336, seed=5)
    with ficoco.apply(model, name, BUDGET, **overrides) as handle:
        ids, batched, batched_counts, _, _ = generate_batch_and_alone(model, handle, prompts, pixels)
    for row, tokens in enumerate(prompts):
        assert torch.equal(batched.sequences[row, :ids.shape[1]], ids[row])           # the caller's prompt
        assert batched_counts[row]["llm_visual"] == [BUDGET]
        assert batched_counts[row]["llm"] == [len(tokens) - n + BUDGET]


def test_remove_restores_the_model(model):
    def state():
        modules = list(model.modules())
        return (sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules),
                sum("forward" in m.__dict__ for m in modules), "generate" in model.__dict__)

    before = state()
    for name, overrides in CONFIGS.values():
        handle = ficoco.apply(model, name, BUDGET, **overrides)
        assert state() != before
        handle.remove()
        assert state() == before and not hasattr(model, "_ficoco_handle")


def test_text_only_prompt_is_left_alone(model):
    ids = torch.tensor([[1, 10, 11, 12]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with ficoco.apply(model, "visionzip", BUDGET) as handle:
            got = model(input_ids=ids).logits
            counts = handle.last_counts()
    assert torch.equal(expected, got)
    assert counts == [{"vision": [], "visual_delivered": 0, "llm": [4], "llm_visual": [0], "overhead_macs": 0}]


def test_ids_must_hold_the_processors_placeholders(model, inputs):
    ids, mask, pixels = inputs
    short = torch.cat([ids[:, :IMAGE_START + 100], ids[:, IMAGE_START + 576:]], dim=1)
    assert int((short == IMAGE).sum()) == 100
    with ficoco.apply(model, "topk-cls", BUDGET), torch.no_grad():
        with pytest.raises(ValueError, match="hold 100 image tokens .* expected 576 per image"):
            model(input_ids=short, pixel_values=pixels)

"""In-CLIP baselines (methods.md §8.1 ToMe, §8.2 EViT, §8.13 image downsampling).

Schedules are checked against the spec's numbers; behaviour on a LLaVA-shaped model (336 px /
patch 14: 577 vision tokens, 576 placeholders; vision layers 0..3 run) against independent float64
references that re-run every layer from its own weights with Python loops for the selections,
and against PIL for the resize. Every method: the budget reaches the LLM, a batch of two equals
each prompt alone, and `remove()` restores the model.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from helpers_tiny import generate_batch_and_alone, images, llava_shaped, prompt

import ficoco
from ficoco import methods
from ficoco.budget import InfeasibleBudget
from ficoco.dims import ModelDims, llava_1_5_dims
from ficoco.contract import VisionTokens
from ficoco.methods.downsample import SquareResize
from ficoco.methods.evit import EvitReduce

DIMS_7B = llava_1_5_dims("7b")
N_PATCHES = 576

# method -> (budget, overrides) on the shaped model (4 executed vision layers)
SETTINGS = {
    "tome": (128, {}),                        # 64 is out of reach with 4 merging layers (smallest: 115)
    "evit": (64, {"layers": [1, 2, 3]}),
    "downsample": (64, {}),
}


@pytest.fixture(scope="module")
def shaped():
    return llava_shaped(vision_layers=5, llm_layers=2)          # LLaVA reads layer 3: layers 0..3 run


@pytest.fixture(scope="module")
def shaped_dims(shaped):
    return ModelDims.from_config(shaped.config)


def _inputs(model, n_images=1, seed=1, placeholders=N_PATCHES):
    ids = torch.tensor([prompt(placeholders, [10, 11], [12, 13, 14])] * n_images)
    return ids, torch.ones_like(ids), images(n_images, 336, seed=seed)


# ------------------------------------------------------------------------------------------------
# Schedules and registry (numbers copied from methods.md §8.1, §8.2, §8.13, §9.2)

@pytest.mark.parametrize("budget, merges", [
    (192, [17] * 16 + [16] * 7), (128, [20] * 11 + [19] * 12), (64, [23] * 6 + [22] * 17),
])
def test_tome_schedule_matches_spec(budget, merges):
    plan = methods.get("tome").check_budget(DIMS_7B, budget)
    assert plan.vision.layers == list(range(23)) and plan.vision.discards == merges
    assert plan.delivered == budget and plan.layer_average == budget
    assert plan.vision_counts[0] == [577, 577 - merges[0]] and plan.vision_counts[22][1] == 1 + budget


@pytest.mark.parametrize("budget, totals", [(192, [399, 277, 192]), (128, [349, 211, 128]), (64, [277, 133, 64])])
def test_evit_schedule_matches_spec(budget, totals):
    plan = methods.get("evit").check_budget(DIMS_7B, budget)
    assert plan.vision.layers == [7, 13, 19] and plan.vision.patches_out == totals
    assert plan.delivered == budget and plan.layer_average == budget
    # the fused token counts: attention runs on 1 + n_{k-1}, the MLP on 1 + n_k (CLS included)
    assert [plan.vision_counts[layer] for layer in (7, 13, 19)] == [[577, 1 + totals[0]],
                                                                      [1 + totals[0], 1 + totals[1]],
                                                                      [1 + totals[1], 1 + totals[2]]]


@pytest.mark.parametrize("budget, g, side", [(192, 13, 182), (128, 11, 154), (64, 8, 112)])
def test_downsample_schedule_matches_spec(budget, g, side):
    plan = methods.get("downsample").check_budget(DIMS_7B, budget)
    assert plan.vision.image_side == side and plan.vision.grid_hw == [g, g]
    assert plan.delivered == g * g and plan.layer_average == g * g
    assert plan.vision_counts == [[1 + g * g, 1 + g * g]] * 23


def test_registry_describes_the_in_clip_baselines():
    tome, evit, downsample = (methods.get(name) for name in ("tome", "evit", "downsample"))
    assert {m.phase for m in (tome, evit, downsample)} == {"vision"}
    assert tome.acts_on == evit.acts_on == downsample.acts_on == ("vision",)
    assert "keys" in tome.needs_attention and "CLS attention row" in evit.needs_attention
    assert downsample.needs_attention == "none"
    assert tome.defaults == {"start": 0, "end": None, "order": "authors"} and evit.defaults == {"layers": (7, 13, 19)}
    for method in (tome, evit, downsample):
        assert set(method.stages) == {"filter", "correlate", "compress"}


def test_budget_errors_name_the_problem(shaped_dims):
    with pytest.raises(InfeasibleBudget) as error:                   # the ⌊(#tokens − 1)/2⌋ cap binds
        methods.get("tome").check_budget(shaped_dims, 64)
    message = str(error.value)
    assert "tome" in message and "B=64" in message and "smallest reachable budget is 115" in message
    methods.get("tome").check_budget(shaped_dims, 115)              # ... and 115 is reachable
    with pytest.raises(InfeasibleBudget):
        methods.get("tome").check_budget(shaped_dims, 114)
    with pytest.raises(ValueError, match=r"layers=\[7, 13, 19\] must lie in 0..3"):
        methods.get("evit").check_budget(shaped_dims, 64)
    with pytest.raises(ValueError, match="strictly increasing"):
        methods.get("evit").check_budget(DIMS_7B, 64, layers=[13, 7])
    with pytest.raises(ValueError, match="valid parameters: none"):
        methods.get("downsample").check_budget(DIMS_7B, 64, side=112)


# ------------------------------------------------------------------------------------------------
# Budget, counts, exact removal and generate on the LLaVA-shaped model

@pytest.mark.parametrize("name", list(SETTINGS))
def test_delivers_budget_records_plan_and_removes_exactly(shaped, name):
    budget, overrides = SETTINGS[name]
    ids, mask, pixels = _inputs(shaped)
    seen = []
    with torch.no_grad():
        before = shaped(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        probe = shaped.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
        try:
            with ficoco.apply(shaped, name, budget, **overrides) as handle:
                out = shaped.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=2,
                                      do_sample=False)
                counts, plan = handle.last_counts()[0], handle.plan
        finally:
            probe.remove()
        after = shaped(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    delivered = 8 * 8 if name == "downsample" else budget               # downsampling: g = 8, g² <= 64
    assert plan.delivered == delivered
    assert seen[0] == ids.shape[1] - N_PATCHES + delivered               # the prefill: exactly that many reach the LLM
    assert counts["visual_delivered"] == delivered and counts["llm_visual"] == [delivered] * 2
    assert counts["vision"] == plan.vision_counts and len(counts["vision"]) == 4
    assert counts["vision"][-1][1] == 1 + delivered                     # CLS + the delivered tokens
    assert torch.equal(out[:, :ids.shape[1]], ids)                       # the caller's prompt comes back
    assert torch.equal(before, after)                                    # remove() restores the model


@pytest.mark.parametrize("name", list(SETTINGS))
def test_batch_of_two_equals_each_alone(shaped, name):
    budget, overrides = SETTINGS[name]
    prompts = [prompt(N_PATCHES, [10, 11, 12], [14, 15]), prompt(N_PATCHES, [17], [18, 19, 20, 21])]
    pixels = images(2, 336, seed=7)
    with ficoco.apply(shaped, name, budget, **overrides) as handle:
        generate_batch_and_alone(shaped, handle, prompts, pixels)


# ------------------------------------------------------------------------------------------------
# Independent float64 references, layer by layer, from the layers' own weights

@contextmanager
def _capture(model):
    """Pre-hooks recording each vision layer's input and the projector's input (the LLM features);
    yields the dict they fill and removes them on exit."""
    captured: dict = {}

    def layer_input(index):
        def hook(module, args, kwargs):
            captured.setdefault(index, args[0] if args else kwargs["hidden_states"])
        return hook

    def features(module, args):
        captured.setdefault("features", args[0])

    layers = model.model.vision_tower.encoder.layers
    hooks = [layer.register_forward_pre_hook(layer_input(index), with_kwargs=True) for index, layer in enumerate(layers)]
    hooks.append(model.model.multi_modal_projector.register_forward_pre_hook(features))
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


def _attention(layer, x, key_bias=None):
    """x (T, D) float64 -> (x + attention(x), head-mean probabilities (T, T)); key_bias (T,) added to logits."""
    attn = layer.self_attn
    heads, dim = attn.num_heads, attn.head_dim
    h = layer.layer_norm1(x)
    q, k, v = (proj(h).view(-1, heads, dim).transpose(0, 1) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    logits = q @ k.transpose(-1, -2) * attn.scale
    if key_bias is not None:
        logits = logits + key_bias
    probs = logits.softmax(-1)
    out = attn.out_proj((probs @ v).transpose(0, 1).reshape(x.shape[0], -1))
    return x + out, probs.mean(0), k.mean(0)          # residual, head-mean A, head-mean keys (T, d)


def _mlp(layer, x):
    return x + layer.mlp(layer.layer_norm2(x))


def _reference_tome_layer(layer, x, sizes, positions, r, hand_on):
    """One ToMe layer for one image, written from methods.md §8.1 with loops for matching and merging.

    hand_on: "authors" ([unmerged A ; B] as facebookresearch/ToMe's `merge.py` concatenates them, CLS
    first) or "positional" (raster order, a merged token at its destination's position)."""
    residual, _, keys = _attention(layer, x, key_bias=torch.tensor(sizes, dtype=torch.float64).log())
    unit = keys / keys.norm(dim=-1, keepdim=True)
    n = x.shape[0]
    a_tokens, b_tokens = list(range(2, n, 2)), list(range(1, n, 2))      # CLS (index 0) is protected
    best, score = {}, {}
    for a in a_tokens:
        for b in b_tokens:
            cosine = float(unit[a] @ unit[b])
            if a not in score or cosine > score[a]:                      # ties keep the lower b
                best[a], score[a] = b, cosine
    sources = sorted(a_tokens, key=lambda a: (-score[a], a))[:r]
    total = {t: residual[t] * sizes[t] for t in range(n) if t not in sources}
    size = {t: sizes[t] for t in total}
    for a in sources:
        total[best[a]] = total[best[a]] + residual[a] * sizes[a]
        size[best[a]] += sizes[a]
    position = {t: positions[t - 1] for t in total if t > 0}
    if hand_on == "authors":
        kept = [t for t in sorted(total) if t % 2 == 0] + [t for t in sorted(total) if t % 2 == 1]
    else:
        kept = [0] + sorted(position, key=position.get)
    merged = torch.stack([total[t] / size[t] for t in kept])
    return _mlp(layer, merged), [size[t] for t in kept], [position[t] for t in kept[1:]]


@pytest.mark.parametrize("order", ["authors", "positional"])
def test_tome_matches_brute_force_bipartite_reference_in_a_real_forward(shaped, order):
    budget, _ = SETTINGS["tome"]
    reference_layers = [copy.deepcopy(layer).double() for layer in shaped.model.vision_tower.encoder.layers[:4]]
    ids, mask, pixels = _inputs(shaped, seed=3)
    with (_capture(shaped) as captured, ficoco.apply(shaped, "tome", budget, order=order) as handle,
          torch.no_grad()):
        shaped(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        merges = dict(zip(handle.plan.vision.layers, handle.plan.vision.discards))
        trace = handle.last_trace()["vision"]
    x, sizes, positions = captured[0][0].double(), [1.0] * 577, list(range(N_PATCHES))
    with torch.no_grad():
        for index, layer in enumerate(reference_layers):
            last = index == len(reference_layers) - 1
            x, sizes, positions = _reference_tome_layer(layer, x, sizes, positions, merges[index],
                                                        "positional" if last else order)
            assert trace[index][0].tolist() == positions                 # same sources, destinations and order
            produced = captured[index + 1][0] if index < 3 else None
            if produced is not None:
                torch.testing.assert_close(produced.double(), x, rtol=1e-4, atol=1e-5)
    assert sum(sizes) == 577 and max(sizes) > 2                          # sizes carried across layers
    assert positions == sorted(positions)                                # positional order for the projector
    torch.testing.assert_close(captured["features"][0].double(), x[1:], rtol=1e-4, atol=1e-5)


def test_the_authors_order_merges_other_tokens_than_the_positional_order_from_the_second_layer(shaped):
    """Over several layers the two orders differ (the issue's Jaccard 0.14-0.91), so the option matters."""
    budget, _ = SETTINGS["tome"]
    ids, mask, pixels = _inputs(shaped, seed=3)
    traces = {}
    for order in ("authors", "positional"):
        with ficoco.apply(shaped, "tome", budget, order=order) as handle, torch.no_grad():
            shaped(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            traces[order] = handle.last_trace()["vision"]
    assert sorted(traces["authors"][0][0].tolist()) == sorted(traces["positional"][0][0].tolist())   # layer 0
    assert set(traces["authors"][3][0].tolist()) != set(traces["positional"][3][0].tolist())


@pytest.mark.parametrize("later_layer, r", [(False, 16), (True, 6), (True, 144)])
def test_one_tome_step_equals_the_authors_merge_tokens_sizes_and_order(later_layer, r):
    """`ficoco bench-tome`'s reference: facebookresearch/ToMe's bipartite_soft_matching + merge_wavg
    (class token), re-implemented in ficoco/bench_tome.py; ours in the authors' order must match it."""
    from ficoco import bench_tome

    from ficoco.contract import VisionTokens
    from ficoco.methods.tome import TomeReduce

    x, keys, sizes = bench_tome.inputs(seed=4, later_layer=later_layer)
    bench_tome.check_same(x, keys, sizes, r)                             # raises on any difference
    theirs, _ = bench_tome.authors_merge(x, keys.mean(dim=1), sizes, r)
    ours = bench_tome.our_step(r)(x, keys, sizes).hidden
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    class Keys:
        def keys(self):
            return keys

    tokens = VisionTokens(hidden=x, positions=torch.arange(576)[None], key_bias=sizes[..., 0].log())
    positional = TomeReduce(merges={0: r}, authors=False)(0, tokens, Keys()).hidden
    assert not torch.allclose(positional, theirs)                        # same tokens, other order
    torch.testing.assert_close(positional.sum(dim=1), theirs.sum(dim=1), rtol=1e-4, atol=1e-3)


def test_tome_refuses_an_unknown_order_naming_the_valid_ones():
    with pytest.raises(ValueError, match="order.*authors.*positional"):
        methods.get("tome").check_budget(DIMS_7B, 192, order="sorted")


def _reference_evit_layer(layer, x, positions, total):
    """One EViT stage for one image (methods.md §8.2): loops for the ranking and the fused sum."""
    residual, attn, _ = _attention(layer, x)
    cls_row = attn[0]
    n = x.shape[0] - 1
    ranked = sorted(range(n), key=lambda i: (-float(cls_row[1 + i]), i))
    kept, sources = sorted(ranked[:total - 1]), sorted(ranked[total - 1:])
    fused = torch.zeros_like(residual[0])
    for i in sources:
        fused = fused + float(cls_row[1 + i]) * residual[1 + i]
    out = torch.cat([residual[:1], residual[[1 + i for i in kept]], fused[None]])
    return _mlp(layer, out), [positions[i] for i in kept] + [-1]


def test_evit_fused_token_is_the_cls_attention_weighted_sum_in_a_real_forward(shaped):
    budget, overrides = SETTINGS["evit"]
    reference_layers = [copy.deepcopy(layer).double() for layer in shaped.model.vision_tower.encoder.layers[:4]]
    ids, mask, pixels = _inputs(shaped, seed=4)
    with _capture(shaped) as captured, ficoco.apply(shaped, "evit", budget, **overrides) as handle, torch.no_grad():
        shaped(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        totals = dict(zip(handle.plan.vision.layers, handle.plan.vision.patches_out))
        trace = handle.last_trace()["vision"]
    assert totals == {1: 277, 2: 133, 3: 64}
    x, positions = captured[1][0].double(), list(range(N_PATCHES))        # layer 0 does not reduce
    with torch.no_grad():
        for index in (1, 2, 3):
            x, positions = _reference_evit_layer(reference_layers[index], x, positions, totals[index])
            assert trace[index][0].tolist() == positions
            if index < 3:
                torch.testing.assert_close(captured[index + 1][0].double(), x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(captured["features"][0].double(), x[1:], rtol=1e-4, atol=1e-5)


def test_evit_earlier_fused_token_is_a_candidate():
    """A fused token with high CLS attention survives the next stage (two fused tokens at the end);
    with low attention it is folded into the new one with its weight."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1 + 6, 4, generator=generator)                      # CLS, 5 patches, 1 fused
    positions = torch.tensor([[0, 2, 3, 5, 7, -1]])
    for fused_attention, expect_kept in ((0.5, True), (0.001, False)):
        row = torch.tensor([[0.1, 0.05, 0.2, 0.03, 0.1, 0.011, fused_attention]])

        class Scores:
            def rows(self, queries):
                assert queries.tolist() == [[0]]
                return row[:, None, :]

        out = EvitReduce(keep={0: 3})(0, VisionTokens(x, positions), Scores())
        ranked = sorted(range(6), key=lambda i: (-float(row[0, 1 + i]), i))
        kept, sources = sorted(ranked[:3]), sorted(ranked[3:])
        assert (5 in kept) == expect_kept
        assert out.positions[0].tolist() == [positions[0, i].item() for i in kept] + [-1]
        expected = sum(float(row[0, 1 + i]) * x[0, 1 + i] for i in sources)
        torch.testing.assert_close(out.hidden[0, -1], expected)
        assert torch.equal(out.hidden[0, 0], x[0, 0])                   # CLS untouched, first


# ------------------------------------------------------------------------------------------------
# Image downsampling: PIL's bicubic resize and the untouched tower with interpolated positions

def _pil_resize(pixels, side):
    """(C, H, W) float -> (C, side, side) with PIL's bicubic (antialiased) resize on float images."""
    from PIL import Image

    channels = [np.array(Image.fromarray(np.array(channel, dtype=np.float32)).resize((side, side), Image.BICUBIC))
                for channel in pixels.numpy()]
    return torch.from_numpy(np.stack(channels))


def test_downsample_resize_matches_pil_and_pads_to_a_centred_square():
    pixels = images(1, 336, seed=2)
    torch.testing.assert_close(SquareResize(112)(pixels)[0], _pil_resize(pixels[0], 112), rtol=0, atol=1e-5)
    wide = images(1, 336, seed=3)[:, :, :252]                             # 252 x 336: pad 42 rows each side
    square = torch.zeros(1, 3, 336, 336)
    square[:, :, 42:294] = wide
    assert torch.equal(SquareResize(336)(wide), square)
    torch.testing.assert_close(SquareResize(154)(wide), SquareResize(154)(square), rtol=0, atol=0)


def test_downsample_features_equal_the_tower_on_the_resized_image(shaped):
    budget, _ = SETTINGS["downsample"]
    ids, mask, pixels = _inputs(shaped, seed=5)
    with _capture(shaped) as captured, ficoco.apply(shaped, "downsample", budget) as handle, torch.no_grad():
        logits = shaped(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        small = SquareResize(112)(pixels)
        # a processor that already emits 112 px and 64 placeholders gives the same result
        short_ids = torch.tensor([prompt(64, [10, 11], [12, 13, 14])])
        direct = shaped(input_ids=short_ids, pixel_values=small).logits
        assert handle.last_counts()[0]["vision"] == [[65, 65]] * 4
    resized = _pil_resize(pixels[0], 112)[None]
    with torch.no_grad():
        tower = shaped.model.vision_tower(resized, interpolate_pos_encoding=True, output_hidden_states=True)
    expected = tower.hidden_states[4][0, 1:]                              # layer-3 output, CLS dropped
    assert captured["features"].shape == (1, 64, expected.shape[-1])
    torch.testing.assert_close(captured["features"][0], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(direct, logits, rtol=1e-5, atol=1e-6)

"""`ficoco-v-code`: FiCoCo-V as the released code computes it (methods.md §7; ficoco/methods/ficoco_v_code.py).

The reference is a float64 loop written from spec §7 and the released `FiCoCo_V.py` (`Filter`,
`Correlate`, `Compress`): it re-runs every reducing layer of one image from the layer's own weights
and is compared with the method in a real forward of a LLaVA-shaped tiny model (336 px / patch 14:
577 vision tokens, the released 24×24 grid and 576-cell penalty buffer). Also: the released setting
delivers 114 tokens, the penalty-state flag, a batch equals each image alone, parameter errors.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers_tiny import generate_batch_and_alone, images, llava_shaped, prompt, reference_quantile

import ficoco
from ficoco import methods
from ficoco.budget import InfeasibleBudget
from ficoco.dims import llava_1_5_dims

NAME = "ficoco-v-code"
DIMS_7B = llava_1_5_dims("7b")
SIDE, N_PATCHES = 24, 576
INF = float("inf")
# the 5-layer shaped model runs vision layers 0..3 (LLaVA reads layer 3): reduce in 1..3, r = 42 each
SHAPED = {"budget": N_PATCHES - 3 * 42, "start": 1}


@pytest.fixture(scope="module")
def shaped():
    return llava_shaped(vision_layers=5, llm_layers=2)


def _ids(n_images=1):
    ids = torch.tensor([prompt(N_PATCHES, [10, 11], [12, 13, 14])] * n_images)
    return ids, torch.ones_like(ids)


def _encode(model, handle, pixels):
    """Run the model once under `handle`; (projector input (images, tokens, D), vision trace of the call)."""
    captured = {}
    probe = model.model.multi_modal_projector.register_forward_pre_hook(
        lambda module, args: captured.update(features=args[0]))
    ids, mask = _ids(pixels.shape[0])
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    finally:
        probe.remove()
    return captured["features"], handle.last_trace()["vision"]


# ------------------------------------------------------------------------------------------------
# Budget, registry, parameters

@pytest.mark.parametrize("budget, discards", [
    (114, [42] * 11),                                   # the released r = 42 in blocks 12..22
    (192, [35] * 10 + [34]), (128, [41] * 8 + [40] * 3), (64, [47] * 6 + [46] * 5),
])
def test_budget_is_spread_over_the_released_layer_range(budget, discards):
    plan = methods.get(NAME).check_budget(DIMS_7B, budget)
    assert plan.vision.layers == list(range(12, 23)) and plan.vision.discards == discards
    assert plan.delivered == budget and plan.llm_visual == [budget] * 32
    # layer 22 (the one LLaVA reads) keeps 1 + B slots; LLaVA drops slot 0; layer 23 does not run
    assert len(plan.vision_counts) == 23 and plan.vision_counts[22] == [1 + budget + discards[-1], 1 + budget]


def test_released_arithmetic_gives_114():
    """control_encoding_layer = 11 -> blocks 12..23 reduce by 42; LLaVA reads hidden_states[-2], the output of
    block 22, so 11 reductions reach it: 577 - 11·42 = 115 tokens, minus the slot LLaVA drops = 114."""
    reducing_blocks = [block for block in range(24) if block > 11]
    read = [block for block in reducing_blocks if block <= DIMS_7B.last_vision_layer]
    assert len(read) == 11 and DIMS_7B.vision_tokens - 42 * len(read) - 1 == 114
    assert methods.get(NAME).check_budget(DIMS_7B, 114).vision.discards == [42] * len(read)


def test_errors_name_the_bad_value_and_the_valid_ones():
    method = methods.get(NAME)
    with pytest.raises(InfeasibleBudget, match=r"B=46 .*Valid budgets: 47\.\.576 \(114 = the released r=42"):
        method.check_budget(DIMS_7B, 46)
    method.check_budget(DIMS_7B, 47)                                        # the smallest reachable one
    with pytest.raises(ValueError, match=r"carry_state='yes' must be True or False"):
        method.check_budget(DIMS_7B, 114, carry_state="yes")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['r'\]; valid parameters: start, end, carry_state"):
        method.check_budget(DIMS_7B, 114, r=42)
    with pytest.raises(ValueError, match=r"start=23, end=22: need 0 <= start <= end <= 22"):
        method.check_budget(DIMS_7B, 114, start=23)
    assert method.steps(method.check_budget(DIMS_7B, None)) == ()           # None = unreduced


def test_registered_beside_ficoco_v_and_not_mapped_to_the_papers_row():
    from ficoco.report.paper import paper_method

    names = methods.names()
    assert names.index(NAME) == names.index("ficoco-v-official") + 1
    assert methods.get("ficoco_v_code").defaults == {"start": 12, "end": None, "carry_state": False}
    assert paper_method(NAME) is None and paper_method("ficoco_v_code") is None
    assert paper_method("ficoco-v") == "FiCoCo-V"


# ------------------------------------------------------------------------------------------------
# The float64 loop reference (spec §7, FiCoCo_V.py), one image, one layer

def _reference_penalty(buffer, score, side=SIDE):
    """The released local penalty, in place on the lists `buffer` (G cells) and `score` (N slots)."""
    remaining = [cell for cell, value in enumerate(buffer) if value != INF]
    for i, cell in enumerate(remaining[:len(score)]):
        buffer[cell] = score[i]
    minima = []
    for wr in range(side // 2):
        for wc in range(side // 2):
            cells = [(2 * wr + dy) * side + 2 * wc + dx for dy in (0, 1) for dx in (0, 1)]
            minima.append(min(cells, key=lambda cell: buffer[cell]))           # first cell on ties
    for cell in minima:
        if cell < len(score):                                                  # grid cell used as a slot index
            score[cell] = score[cell] / 2 if score[cell] > 0 else score[cell] * 2
            buffer[cell] = INF




def _reference_layer(layer, x, ids, buffer, r):
    """One reducing layer of the released FiCoCo-V on one image, float64, loops for every choice.

    x (T, D) the layer input; ids the identity of each slot (-1 = CLS); buffer the penalty buffer
    (a list, updated in place). Returns (the next layer's input, ids after, ids of the sources)."""
    attn = layer.self_attn
    heads, dim, n_tokens = attn.num_heads, attn.head_dim, x.shape[0]
    h = layer.layer_norm1(x)
    q, k, v = (proj(h).view(n_tokens, heads, dim).transpose(0, 1) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    per_head = q @ k.transpose(-1, -2) * attn.scale                            # (H, T, T)
    residual = x + attn.out_proj((per_head.softmax(-1) @ v).transpose(0, 1).reshape(n_tokens, -1))
    logits = per_head.mean(0).tolist()                                         # §7.1: logits, head mean
    n = n_tokens - 1

    def unit(values):
        norm = math.sqrt(sum(value * value for value in values))
        return [value / norm for value in values]

    first_row = unit(logits[0][1:])                                            # slot 0's row
    given = unit([sum(logits[i][1:]) / n for i in range(1, n_tokens)])         # §7.2: row means
    score = [0.35 * c - 0.65 * g for c, g in zip(first_row, given)]            # §7.3
    _reference_penalty(buffer, score)                                          # §7.4
    slot_score = [INF] + score                                                 # slot 0 protected
    order = sorted(range(n_tokens), key=lambda slot: (slot_score[slot], slot))
    sources, kept = order[:r], order[r:]                                       # lowest r discarded

    n_targets = max(sum(value > reference_quantile(logits[i], 0.998) for value in logits[i]) for i in sources)   # §7.6
    assert n_targets >= 1
    merged, size = [residual[slot].clone() for slot in kept], [1.0] * len(kept)
    for i in sources:
        top = max(logits[i])
        exp = [math.exp(value - top) for value in logits[i]]
        prob = [value / sum(exp) for value in exp]
        targets = sorted(range(n_tokens), key=lambda j: (-prob[j], j))[:n_targets]
        total = sum(prob[j] for j in targets)
        for j in targets:
            slot = j if j < len(kept) else j - r                               # §7.7: index into the score order
            merged[slot] = merged[slot] + prob[j] / total * residual[i]
            size[slot] += prob[j] / total
    y = torch.stack([value / weight for value, weight in zip(merged, size)])
    return y + layer.mlp(layer.layer_norm2(y)), [ids[slot] for slot in kept], [ids[slot] for slot in sources]


def test_matches_float64_loop_reference_in_a_real_forward(shaped):
    layers = shaped.model.vision_tower.encoder.layers
    reference_layers = {index: copy.deepcopy(layers[index]).double() for index in (1, 2, 3)}
    inputs = {}

    def record(index):
        def hook(module, args, kwargs):
            inputs.setdefault(index, args[0] if args else kwargs["hidden_states"])
        return hook

    hooks = [layers[index].register_forward_pre_hook(record(index), with_kwargs=True) for index in (1, 2, 3)]
    try:
        with ficoco.apply(shaped, NAME, SHAPED["budget"], start=SHAPED["start"]) as handle:
            features, trace = _encode(shaped, handle, images(1, 336, seed=3))
    finally:
        for hook in hooks:
            hook.remove()
    x, ids, buffer = inputs[1][0].double(), [-1] + list(range(N_PATCHES)), [1e9] * N_PATCHES
    with torch.no_grad():
        for index in (1, 2, 3):
            x, after, sources = _reference_layer(reference_layers[index], x, ids, buffer, 42)
            assert trace[index][0].tolist() == after[1:]                       # same output order (slot 0 aside)
            assert set(ids) - set(after) == set(sources) and len(sources) == 42   # same discarded set
            produced = inputs[index + 1][0] if index < 3 else None
            if produced is not None:                                           # same merged values (+ the MLP)
                torch.testing.assert_close(produced.double(), x, rtol=1e-4, atol=1e-5)
            ids = after
    assert trace[1][0][-1].item() == -1                                         # CLS moved to the end in layer 1
    # LLaVA drops slot 0 of the layer it reads: a token other than CLS; the rest reach the projector in order
    assert ids[0] != -1 and features.shape[1] == N_PATCHES - 3 * 42
    torch.testing.assert_close(features[0].double(), x[1:], rtol=1e-4, atol=1e-5)


def test_released_configuration_delivers_114_tokens_in_a_real_forward():
    model = llava_shaped(vision_layers=24, llm_layers=1)            # CLIP-L depth: LLaVA reads layer 22
    ids, mask = _ids()
    seen = {}
    probe = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(length=kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        with ficoco.apply(model, NAME, 114) as handle, torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=images(1, 336))
            counts, trace = handle.last_counts()[0], handle.last_trace()["vision"]
    finally:
        probe.remove()
    assert seen["length"] == ids.shape[1] - N_PATCHES + 114
    assert counts["visual_delivered"] == 114 and counts["llm_visual"] == [114]
    assert counts["vision"][12] == [577, 535] and counts["vision"][22] == [157, 115] and len(counts["vision"]) == 23
    assert sorted(trace) == list(range(12, 23)) and trace[22].shape == (1, 114)
    assert trace[12][0, -1].item() == -1                                         # CLS last after block 12


# ------------------------------------------------------------------------------------------------
# The penalty state, batches

def test_penalty_state_off_a_second_image_is_unaffected_by_the_first(shaped):
    first, second = images(1, 336, seed=4), images(1, 336, seed=5)
    with ficoco.apply(shaped, NAME, SHAPED["budget"], start=SHAPED["start"]) as handle:
        alone, alone_trace = _encode(shaped, handle, second)
        _encode(shaped, handle, first)
        after, after_trace = _encode(shaped, handle, second)
    assert torch.equal(alone, after)
    assert all(torch.equal(alone_trace[layer], after_trace[layer]) for layer in (1, 2, 3))


def test_penalty_state_on_carries_to_the_next_image_per_applied_model(shaped):
    first, second = images(1, 336, seed=4), images(1, 336, seed=5)
    settings = dict(start=SHAPED["start"], carry_state=True)
    with ficoco.apply(shaped, NAME, SHAPED["budget"], start=SHAPED["start"]) as handle:
        fresh, _ = _encode(shaped, handle, second)
    other = copy.deepcopy(shaped)
    with (ficoco.apply(shaped, NAME, SHAPED["budget"], **settings) as handle,
          ficoco.apply(other, NAME, SHAPED["budget"], **settings) as other_handle):
        _encode(shaped, handle, first)
        on_other, _ = _encode(other, other_handle, second)   # the other model's first image: its own, fresh state
        carried, _ = _encode(shaped, handle, second)         # this model's second image: the first image's state
    assert torch.equal(on_other, fresh)
    assert carried.shape == fresh.shape and not torch.allclose(carried, fresh)
    with ficoco.apply(shaped, NAME, SHAPED["budget"], **settings) as handle:   # a new application starts fresh
        assert torch.equal(_encode(shaped, handle, second)[0], fresh)


def test_carried_state_refuses_two_images_in_one_call(shaped):
    with ficoco.apply(shaped, NAME, SHAPED["budget"], start=SHAPED["start"], carry_state=True) as handle:
        with pytest.raises(ValueError, match="carry_state=True .* got 2 images in one call"):
            _encode(shaped, handle, images(2, 336))


def test_batch_of_two_equals_each_alone(shaped):
    prompts = [prompt(N_PATCHES, [10, 11, 12], [14, 15]), prompt(N_PATCHES, [17], [18, 19, 20, 21])]
    with ficoco.apply(shaped, NAME, SHAPED["budget"], start=SHAPED["start"]) as handle:
        generate_batch_and_alone(shaped, handle, prompts, images(2, 336, seed=7))


def test_the_unrun_layer_23_would_not_change_the_carried_buffer():
    """The released code also updates the buffer in block 23 (N = 114), which the adapter does not run. With the
    released grid, r = 42 and blocks 12..22 every cell that update could retire (< 114) is already +inf."""
    generator = torch.Generator().manual_seed(0)
    buffer = [1e9] * N_PATCHES
    for _ in range(3):                                                          # three images, state carried
        for n in [N_PATCHES - 42 * i for i in range(11)]:                       # blocks 12..22
            _reference_penalty(buffer, torch.randn(n, generator=generator, dtype=torch.float64).tolist())
        retired = [cell for cell, value in enumerate(buffer) if value == INF]
        assert all(cell in retired for cell in range(114))
        block_23 = list(buffer)
        _reference_penalty(block_23, torch.randn(114, generator=generator, dtype=torch.float64).tolist())
        assert [cell for cell, value in enumerate(block_23) if value == INF] == retired


@pytest.mark.parametrize("slots", [
    [N_PATCHES - 42 * i for i in range(11)],          # the released schedule, blocks 12..22
    [576, 288, 144, 72, 36],                          # steep: more finite cells than slots (stale cells kept)
])
def test_penalty_buffer_matches_the_loop_over_layers_and_images(slots):
    """The method's buffer functions against `_reference_penalty`, three images carried: penalised scores and
    the buffer agree exactly after every layer."""
    from ficoco.methods.ficoco_v_code import fresh_buffer, penalise, retire, window_minima, write_scores

    generator = torch.Generator().manual_seed(1)
    buffer, reference = fresh_buffer(1, N_PATCHES, "cpu"), [1e9] * N_PATCHES
    for _ in range(3):
        for n in slots:
            scores = torch.randn(1, n, generator=generator)                   # float32: every write is exact
            expected = scores[0].double().tolist()
            _reference_penalty(reference, expected)
            buffer = write_scores(buffer, scores)
            minima = window_minima(buffer, SIDE)
            assert penalise(scores, minima)[0].tolist() == expected
            buffer = retire(buffer, minima, n)
            assert buffer[0].tolist() == reference

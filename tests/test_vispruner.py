"""VisPruner (`ficoco/methods/vispruner.py`): the selection against a plain-Python loop written from
the authors' code, the budget split and its errors, and the method on the LLaVA-shaped tiny model
of tests/test_baselines_postvision.py (counts equal the plan, the kept patches equal the loop on the
untouched tower's eager attention and features, cached generation equals a full recompute, a batch
of two equals each prompt alone, `remove()` restores bit-identical outputs).
"""
from __future__ import annotations

import pytest
import torch
from helpers_tiny import (eager_attention, generate_batch_and_alone, images, llava_shaped, n_placeholders,
                          one_image_prompt, prompt)
from test_baselines_postvision import AFTER, BEFORE, FEATURE_LAYER, IMAGE_START, SHAPE, TEXT, _run

import ficoco
from ficoco import methods
from ficoco.contract import VisionTokens
from ficoco.dims import llava_1_5_dims
from ficoco.methods.vispruner import VisPrunerReduce
from ficoco.paradigm.filter import vispruner_rounds

DIMS_7B = llava_1_5_dims("7b")
BUDGET = 64


# ------------------------------------------------------------------------------------------------
# The reference: the authors' selection as a plain loop (float64 cosines)

def reference_selection(cls_attention: list[float], features: torch.Tensor, budget: int, ratio: float,
                        per_round: int = 8) -> list[int]:
    """Kept patch positions, ascending. important = the int(B·r) most attended patches; the rest, in
    descending attention, lose per round the (≤ per_round) entries at even places (A) whose best
    cosine to an entry at an odd place (B) is highest, and become [the other A by descending best
    cosine, then B], until B − important remain. Ties: the lower position / the earlier place."""
    n = len(cls_attention)
    important_count = int(budget * ratio)
    ranked = sorted(range(n), key=lambda i: (-cls_attention[i], i))
    important, residual = ranked[:important_count], ranked[important_count:]
    keep = budget - important_count
    unit = [[float(v) for v in row / row.norm()] for row in features.double()]

    def cosine(i: int, j: int) -> float:
        return sum(x * y for x, y in zip(unit[i], unit[j]))

    if keep == 0:
        residual = []
    while len(residual) > keep:
        a, b = residual[0::2], residual[1::2]
        drop = min(per_round, len(residual) - keep, len(a))
        best = [max(cosine(i, j) for j in b) for i in a]
        by_best = sorted(range(len(a)), key=lambda k: (-best[k], k))
        residual = [a[k] for k in by_best[drop:]] + b
    return sorted(important + residual)


class _Scores:
    """A `VisionOutputScores` with a given CLS row."""

    def __init__(self, cls_row: torch.Tensor):
        self._cls_row = cls_row

    def cls_row(self) -> torch.Tensor:
        return self._cls_row


def _reduce(hidden: torch.Tensor, cls_row: torch.Tensor, budget: int, ratio: float):
    important = int(budget * ratio)
    reduce = VisPrunerReduce(important=important, diverse=budget - important)
    batch, tokens, _ = hidden.shape
    positions = torch.arange(tokens - 1).expand(batch, -1)
    return reduce(0, VisionTokens(hidden, positions), _Scores(cls_row))


@pytest.mark.parametrize("n, budget, ratio", [(96, 24, 0.5), (96, 11, 0.5), (97, 40, 0.3), (64, 50, 0.5),
                                              (96, 17, 0.0), (96, 16, 1.0), (40, 40, 0.5), (33, 1, 0.5)])
def test_selection_equals_the_loop_on_random_inputs(n, budget, ratio):
    generator = torch.Generator().manual_seed(n + budget)
    hidden = torch.randn(3, 1 + n, 16, generator=generator)                  # three images, CLS first
    cls_row = torch.rand(3, 1 + n, generator=generator)
    out = _reduce(hidden, cls_row, budget, ratio)
    for row in range(3):
        kept = reference_selection(cls_row[row, 1:].tolist(), hidden[row, 1:], budget, ratio)
        assert len(kept) == budget
        assert out.positions[row].tolist() == kept
        assert torch.equal(out.hidden[row], hidden[row, 1:][kept])            # the patches, CLS dropped


def test_ties_go_to_the_lower_position_and_the_earlier_place():
    """Four orthogonal feature directions (every cosine is exactly 0 or 1, so many best cosines tie)
    and three attention levels."""
    generator = torch.Generator().manual_seed(7)
    prototypes = torch.eye(4, 16) * torch.tensor([[1.0], [2.0], [3.0], [0.5]])
    hidden = prototypes[torch.randint(0, 4, (2, 81), generator=generator)]   # (2, 1+80, 16)
    cls_row = torch.randint(0, 3, (2, 81), generator=generator).float()
    out = _reduce(hidden, cls_row, 30, 0.5)
    for row in range(2):
        assert out.positions[row].tolist() == reference_selection(cls_row[row, 1:].tolist(), hidden[row, 1:], 30, 0.5)


def test_rounds_follow_the_authors_eight_per_round():
    """LLaVA-1.5 (576 patches, r = 0.5): 544 / 512 / 480 candidates lose 8 per round to 32 / 64 / 96."""
    for budget, rounds in [(64, 64), (128, 56), (192, 48)]:
        important = budget // 2
        schedule = vispruner_rounds(576 - important, budget - important)
        assert len(schedule) == rounds and {dropped for _, dropped in schedule} == {8}
    assert vispruner_rounds(10, 1) == [(10, 5), (5, 3), (2, 1)]               # never more than the A half
    assert vispruner_rounds(10, 3) == [(10, 5), (5, 2)]
    assert vispruner_rounds(10, 0) == [] and vispruner_rounds(10, 10) == []
    with pytest.raises(ValueError, match=r"keep must be in \[0, 10\] .* got 11"):
        vispruner_rounds(10, 11)
    with pytest.raises(ValueError, match="per_round must be >= 1; got 0"):
        vispruner_rounds(10, 3, per_round=0)


# ------------------------------------------------------------------------------------------------
# Budgets and parameters (no model)

@pytest.mark.parametrize("budget, important", [(192, 96), (128, 64), (64, 32), (65, 32), (1, 0), (576, 288)])
def test_the_split_and_the_delivered_count(budget, important):
    plan = methods.get("vispruner").check_budget(DIMS_7B, budget)
    post = plan.post_vision
    assert (post.site, post.layer, post.tokens_out) == ("vision_output", 22, budget)
    assert post.details == {"important": important, "diverse": budget - important}
    assert plan.delivered == budget and plan.llm_visual == [budget] * 32 and plan.layer_average == budget
    assert plan.vision_counts == [[577, 577]] * 23                          # the encoder itself is unreduced
    assert methods.get("vispruner").steps(methods.get("vispruner").check_budget(DIMS_7B, None)) == ()


def test_the_important_count_floors_the_float_product_as_the_authors_code_does():
    details = methods.get("vispruner").check_budget(DIMS_7B, 100, important_ratio=0.29).post_vision.details
    assert (details["important"], details["diverse"]) == (28, 72)            # int(100 * 0.29) = int(28.999…)
    details = methods.get("vispruner").check_budget(DIMS_7B, 64, important_ratio=1).post_vision.details
    assert (details["important"], details["diverse"]) == (64, 0)


def test_bad_budgets_and_parameters_name_the_value_and_the_valid_range():
    method = methods.get("vispruner")
    for budget in (0, 577):
        with pytest.raises(ValueError, match=rf"vispruner: budget {budget} must be in \[1, 576\]"):
            method.check_budget(DIMS_7B, budget)
    for ratio in (1.5, -0.1, "half", True):
        with pytest.raises(ValueError, match=rf"vispruner: important_ratio={ratio!r} must be a number in \[0, 1\]"):
            method.check_budget(DIMS_7B, 64, important_ratio=ratio)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['ratio'\]; valid parameters: important_ratio"):
        method.check_budget(DIMS_7B, 64, ratio=0.5)


def test_the_registry_describes_it():
    method = methods.get("vispruner")
    assert (method.phase, method.acts_on, method.defaults) == ("vision", ("vision",), {"important_ratio": 0.5})
    assert set(method.stages) == {"filter", "correlate", "compress"} and "CLS row" in method.needs_attention


# ------------------------------------------------------------------------------------------------
# On the LLaVA-shaped model

@pytest.fixture(scope="module")
def model():
    return llava_shaped(**SHAPE)


@pytest.fixture(scope="module")
def inputs(model):
    return one_image_prompt(model, BEFORE, AFTER)


def test_the_llm_receives_the_patches_the_loop_keeps(model, inputs):
    """Eager attention and the output of the untouched tower's feature layer: the important patches
    through the loop, the whole selection through the method's own reduce on those outputs.

    The random tiny tower's patches are nearly alike: its best cosines lie 3e-8 apart in places over
    the 64 rounds, below float32's resolution, so the float64 loop's diverse set can differ from the
    float32 selection (docs/methods.md, VisPruner: cosines in float32) on one machine's BLAS and not on
    another's. The rounds are checked against the loop on random inputs above; here the wiring."""
    tower = model.model.vision_tower
    with torch.no_grad(), eager_attention(tower):
        untouched = tower(inputs[2], output_hidden_states=True, output_attentions=True)
    cls_row = untouched.attentions[FEATURE_LAYER][0, :, 0].double().mean(0)           # (577,)
    features = untouched.hidden_states[FEATURE_LAYER + 1][0]                            # (577, D)
    important = reference_selection(cls_row[1:].tolist(), features[1:], BUDGET // 2, 1.0)
    selected = _reduce(features[None], cls_row[None].float(), BUDGET, 0.5)
    kept = selected.positions[0].tolist()
    assert len(kept) == BUDGET and set(important) <= set(kept)

    run = _run(model, inputs, "vispruner", {})
    counts, plan = run["counts"], run["plan"]
    assert counts["vision"] == [[577, 577]] * 2 == plan.vision_counts      # executed CLIP layers 0..1
    assert counts["llm_visual"] == [BUDGET] == plan.llm_visual and counts["llm"] == [TEXT + BUDGET]
    assert counts["visual_delivered"] == BUDGET == plan.delivered and run["embeds"].shape[1] == TEXT + BUDGET
    assert run["trace"]["vision"][FEATURE_LAYER][0].tolist() == kept
    torch.testing.assert_close(run["projector_input"][0], features[1:][kept], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run["embeds"][0, IMAGE_START:IMAGE_START + BUDGET], run["projected"][0])


def _generate(model, ids, mask, pixels, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                              do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)


def test_cached_generation_equals_full_recompute(model, inputs):
    with ficoco.apply(model, "vispruner", BUDGET):
        cached = _generate(model, *inputs)
        recomputed = _generate(model, *inputs, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for step_cached, step_recomputed in zip(cached.logits, recomputed.logits):
        torch.testing.assert_close(step_cached, step_recomputed, rtol=1e-5, atol=1e-5)


def test_batch_of_two_left_padded_equals_each_alone(model):
    n = n_placeholders(model)
    prompts = [prompt(n, [10, 11, 12, 13], [14, 15, 16]), prompt(n, [17], [18, 19, 20, 21, 22])]
    with ficoco.apply(model, "vispruner", BUDGET, important_ratio=0.25) as handle:
        ids, batched, batched_counts, _, _ = generate_batch_and_alone(model, handle, prompts, images(2, 336, seed=5))
    for row, tokens in enumerate(prompts):
        assert torch.equal(batched.sequences[row, :ids.shape[1]], ids[row])           # the caller's prompt
        assert batched_counts[row]["llm_visual"] == [BUDGET]
        assert batched_counts[row]["llm"] == [len(tokens) - n + BUDGET]


def test_remove_restores_bit_identical_outputs(model, inputs):
    ids, mask, pixels = inputs
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        handle = ficoco.apply(model, "vispruner", BUDGET)
        reduced = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        handle.remove()
        after = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert reduced.shape[1] == TEXT + BUDGET and before.shape[1] == TEXT + 576
    assert torch.equal(before, after) and not hasattr(model, "_ficoco_handle")

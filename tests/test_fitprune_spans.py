"""FitPrune on images of several spans (issue 18: LLaVA-NeXT): the fit counts each calibration prompt's
deletions for the nominal image in proportion to its span, and an image keeps the fitted schedule scaled
to its own span, within its share of the budget, on the layers the fit deletes at.

Tiny LLaVA-NeXT (tests/helpers_tiny.py): the nominal image is 80 visual tokens; images of 30 x 80 (a
60-token span) and 31 x 34 (88 tokens).
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers_tiny import IMAGE, next_batch, tiny_llava_next

import ficoco
from ficoco import methods
from ficoco.budget import layer_average, span_budget
from ficoco.calibrate import fit_fitprune
from ficoco.methods.fitprune import schedule_counts, span_deletions

NOMINAL, SIZES = 80, [(30, 80), (31, 34)]


@pytest.mark.parametrize("span", [60, 88, 8])
@pytest.mark.parametrize("nominal_budget", [40, 37])
def test_a_span_keeps_the_fit_scaled_within_its_budget_share(span, nominal_budget):
    fitted = [40, 20, 0, 0]                                # for the nominal 80 tokens: 80, 40, 20, 20, average 40
    budget = span_budget(nominal_budget, span, NOMINAL)
    scaled = span_deletions(fitted, NOMINAL, span, budget)
    assert [layer for layer, d in enumerate(scaled) if d] == [0, 1] and scaled[-1] == 0
    assert sum(scaled) < span                                       # one token stays
    assert layer_average(schedule_counts(scaled, span)) <= budget
    # at least the fit's proportion of the span goes at every deleting layer (rounded up)
    assert all(new >= math.ceil(old * span / NOMINAL) or sum(scaled) == span - 1 for old, new in zip(fitted, scaled))


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next(attention="sdpa")[0]


def test_the_fit_on_two_spans_meets_the_budget_on_each(model):
    dims = tiny_llava_next()[1]
    calibration = [next_batch(dims, [size]) for size in SIZES + [(28, 28)]]           # spans 60, 88 and 20
    budget = 30
    fit = fit_fitprune(model, calibration, budget, 0.05, progress=False)
    assert fit.layer_average <= budget and fit.deletions[-1] == 0 and sum(fit.deletions) < NOMINAL
    largest = methods.get("fitprune").check_budget(dims, budget, deletions=fit.deletions)    # the 88-token image
    assert largest.llm_visual[0] == 88 and largest.layer_average <= span_budget(budget, 88, NOMINAL)
    for size in SIZES:
        inputs = next_batch(dims, [size])
        span = int((inputs["input_ids"] == IMAGE).sum())
        with ficoco.apply(model, "fitprune", budget, deletions=fit.deletions) as handle, torch.no_grad():
            model(**inputs)
            counts, = handle.last_counts()
            row_plan, = handle.row_plans()
        assert counts["llm_visual"] == list(row_plan.llm_visual) and counts["llm_visual"][0] == span
        assert sum(counts["llm_visual"]) / 4 <= span_budget(budget, span, NOMINAL)
        deleting = [layer for layer, deleted in enumerate(fit.deletions) if deleted]
        assert [layer for layer in range(3) if counts["llm_mlp"][layer] < counts["llm"][layer]] == deleting


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_the_fit_on_qwen_images_of_two_sizes_meets_the_budget_on_each(model_type):
    """On Qwen2-VL-family models (dynamic resolution) as on LLaVA-NeXT: fitted on prompts of 32- and 64-token images
    for a budget of the nominal 1,280-token image, each image then keeps at most its share of the budget."""
    from helpers_tiny import qwen_inputs, tiny_qwen

    model, dims = tiny_qwen(model_type, attention="eager")
    sizes, budget = [(112, 224), (224, 224)], 640                   # 8 x 16 and 16 x 16 patches: 32 and 64 tokens
    fit = fit_fitprune(model, [qwen_inputs(dims, [size], seed=seed) for seed, size in enumerate(sizes * 2)], budget,
                       0.05, progress=False)
    assert fit.layer_average <= budget and fit.deletions[-1] == 0
    for size, span in zip(sizes, (32, 64)):
        with ficoco.apply(model, "fitprune", budget, deletions=fit.deletions) as handle, torch.no_grad():
            model(**qwen_inputs(dims, [size]))
            counts, = handle.last_counts()
            row_plan, = handle.row_plans()
        assert counts["llm_visual"] == list(row_plan.llm_visual) and counts["llm_visual"][0] == span
        assert sum(counts["llm_visual"]) / 4 <= span_budget(budget, span, 1280)
        assert counts["llm_visual"][-1] < span

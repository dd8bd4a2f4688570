"""`sparsevlm-matched` (methods.md §8.4): SparseVLM's schedule scaled by one common factor so that the
realised layer average (cluster tokens included) is <= B.

The reference is an independent brute force over the 1e-4 factor grid with the per-layer counts
written from the spec (prune the output of each pruning layer, keep min(k, n − 1), add
⌊(⌊0.3·d⌋ + 1)/10⌋ + 1 cluster tokens), checked on the plan and on the counts a run records.
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers_tiny import left_padded, llava_shaped, prompt
from test_baselines_llm import N_IMAGE, PROMPTS, _inputs

import ficoco
from ficoco import methods
from ficoco.dims import llava_1_5_dims

DIMS_7B = llava_1_5_dims("7b")
OFFICIAL = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}


def _counts(keeps, layers, n_layers, n0=N_IMAGE):
    counts, n = [], n0
    for layer in range(n_layers):
        counts.append(n)
        if layer in layers:
            keep = min(keeps[layers.index(layer)], n - 1)
            n = keep + (math.floor(0.3 * (n - keep)) + 1) // 10 + 1
    return counts


def _brute_force(budget, schedule, layers, n_layers):
    """(keeps, counts) of the largest factor i/10000 whose average is <= B, and the average one step up."""
    def at(i):
        keeps = [math.floor(i / 10000 * k + 0.5) for k in schedule]
        counts = _counts(keeps, layers, n_layers)
        return keeps, counts, sum(counts) / n_layers

    best = max(i for i in range(10001) if at(i)[2] <= budget)
    keeps, counts, _ = at(best)
    return keeps, counts, (at(best + 1)[2] if best < 10000 else math.inf)


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_plan_is_the_largest_factor_within_the_budget(budget):
    plan = methods.get("sparsevlm-matched").check_budget(DIMS_7B, budget)
    keeps, counts, above = _brute_force(budget, OFFICIAL[budget], [2, 6, 15], 32)
    assert plan.llm.details["schedule"] == keeps and plan.llm.details["base_schedule"] == list(OFFICIAL[budget])
    assert plan.llm_visual == counts
    assert plan.layer_average == sum(counts) / 32 <= budget < above              # one step up exceeds B
    official = methods.get("sparsevlm").check_budget(DIMS_7B, budget)
    assert official.layer_average > budget                                        # what matching fixes


def test_keeps_override_and_errors_name_the_method():
    plan = methods.get("sparsevlm-matched").check_budget(DIMS_7B, 100, keeps=[200, 100, 50])
    keeps, counts, above = _brute_force(100, (200, 100, 50), [2, 6, 15], 32)
    assert plan.llm.details["schedule"] == keeps and plan.layer_average <= 100 < above
    with pytest.raises(ValueError, match="sparsevlm-matched: budget 100 has no official v1.5 schedule"):
        methods.get("sparsevlm-matched").check_budget(DIMS_7B, 100)
    with pytest.raises(ValueError, match=r"sparsevlm-matched: budget B=30 is infeasible .*minimum achievable average"):
        methods.get("sparsevlm-matched").check_budget(DIMS_7B, 30, keeps=[100, 50, 20])
    assert methods.get("sparsevlm-matched").budgeted and methods.get("sparsevlm-matched").phase == "llm"
    assert methods.get("sparsevlm-matched").check_budget(DIMS_7B, None).llm is None


@pytest.fixture(scope="module")
def model():
    return llava_shaped(vision_layers=2, llm_layers=4, llm_kv_heads=2)


def test_recorded_counts_match_the_plan_and_stay_within_the_budget(model):
    ids, pixels = _inputs()
    layers = [0, 1, 2]
    with ficoco.apply(model, "sparsevlm-matched", 192, layers=layers) as handle, torch.no_grad():
        model(input_ids=ids, pixel_values=pixels)
        recorded, plan = handle.last_counts()[0]["llm_visual"], handle.plan
    keeps, counts, above = _brute_force(192, OFFICIAL[192], layers, 4)     # 4 layers: 576 in layer 0 alone
    assert recorded == counts == plan.llm_visual and plan.llm.details["schedule"] == keeps
    assert sum(recorded) / 4 <= 192 < above


def test_batch_of_two_equals_each_row_alone(model):
    rows = [prompt(N_IMAGE, *PROMPTS[0]), prompt(N_IMAGE, *PROMPTS[1])]
    ids, mask = left_padded(rows)
    pixels = torch.cat([_inputs(0)[1], _inputs(1)[1]])
    with ficoco.apply(model, "sparsevlm-matched", 192, layers=[0, 1, 2]) as handle, torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -1]
        batched_counts = handle.last_counts()
        for row, tokens in enumerate(rows):
            alone = model(input_ids=torch.tensor([tokens]), pixel_values=pixels[row:row + 1]).logits[0, -1]
            torch.testing.assert_close(batched[row], alone, rtol=1e-4, atol=1e-5)
            assert batched_counts[row] == handle.last_counts()[0]

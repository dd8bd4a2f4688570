"""Budget arithmetic against the spec's tables (methods.md §2-5, §8, §9.2) and first-principles checks."""
from __future__ import annotations

import math

import pytest

from ficoco import budget as bud

N0, LLM_LAYERS = 576, 32
VISION_REDUCING = range(12, 23)  # FiCoCo-V layers 12..22


def _mean(counts):
    return sum(counts) / len(counts)


# ------------------------------------------------------------------------------------------------
# spread / encoder discards (§2.2, §3)

@pytest.mark.parametrize("total,n", [(0, 3), (7, 3), (384, 11), (5, 8), (12, 4)])
def test_spread_is_even_with_the_remainder_first(total, n):
    parts = bud.spread(total, n)
    assert len(parts) == n and sum(parts) == total
    assert max(parts) - min(parts) <= 1
    assert parts == sorted(parts, reverse=True)


def test_spread_rejects_bad_arguments():
    with pytest.raises(ValueError, match="must be >= 1; got 0"):
        bud.spread(5, 0)
    with pytest.raises(ValueError, match="must be >= 0; got -1"):
        bud.spread(-1, 3)


@pytest.mark.parametrize(
    "budget,expected",
    [(192, [35] * 10 + [34]), (128, [41] * 8 + [40] * 3), (64, [47] * 6 + [46] * 5)],
)
def test_ficoco_v_discards_table(budget, expected):
    discards = bud.encoder_discards(N0, budget, VISION_REDUCING)
    assert list(discards) == list(VISION_REDUCING)
    assert list(discards.values()) == expected
    assert N0 - sum(discards.values()) == budget


def test_ficoco_v_official_setting_delivers_114():
    assert N0 - 42 * len(VISION_REDUCING) == 114  # documents why r=42 over 11 layers is 114


def test_encoder_discards_rejects_impossible_final_counts():
    with pytest.raises(ValueError, match="n_final must be in \\[1, 576\\].*got 0"):
        bud.encoder_discards(N0, 0, VISION_REDUCING)


# ------------------------------------------------------------------------------------------------
# FiCoCo-L progressive schedule (§2.2, §4)

def _first_principles_counts(n0, final, start, window, n_layers):
    counts, remaining = [], n0
    discards = bud.spread(n0 - final, window)
    for layer in range(n_layers):
        if start <= layer < start + window:
            remaining -= discards[layer - start]
        counts.append(remaining)
    return counts


@pytest.mark.parametrize(
    "budget,final,discards,counts,average",
    [
        (192, 112, (116, 116, 116, 116), (460, 344, 228, 112), 191.75),
        (128, 35, (136, 135, 135, 135), (440, 305, 170, 35), 127.9375),
    ],
)
def test_ficoco_l_default_table(budget, final, discards, counts, average):
    schedule = bud.progressive_llm_schedule(N0, budget, LLM_LAYERS, start=4, window=4, method="ficoco-l")
    assert schedule.final == final and schedule.discards == discards
    assert schedule.visual_counts[4:8] == counts
    assert schedule.visual_counts[:4] == (N0,) * 4 and schedule.visual_counts[8:] == (final,) * 24
    assert schedule.average == pytest.approx(average)
    assert list(schedule.visual_counts) == _first_principles_counts(N0, final, 4, 4, LLM_LAYERS)
    # F is the largest: one more token breaks the budget
    assert _mean(_first_principles_counts(N0, final + 1, 4, 4, LLM_LAYERS)) > budget
    assert schedule.discards_by_layer() == dict(zip(range(4, 8), discards))
    assert schedule.to_dict()["final"] == final


@pytest.mark.parametrize("window,f192,f128", [(1, 137, 64), (2, 129, 54)])
def test_ficoco_l_other_windows(window, f192, f128):
    assert bud.progressive_llm_schedule(N0, 192, LLM_LAYERS, 4, window).final == f192
    assert bud.progressive_llm_schedule(N0, 128, LLM_LAYERS, 4, window).final == f128


@pytest.mark.parametrize(
    "start,finals",
    [(3, (11, 1, None)), (2, (29, 20, 1)), (1, (47, 38, 20)), (0, (64, 55, 38))],
)
def test_ficoco_l_start_table_for_64(start, finals):
    for window, final in zip((1, 2, 4), finals):
        if final is None:
            with pytest.raises(bud.InfeasibleBudget):
                bud.progressive_llm_schedule(N0, 64, LLM_LAYERS, start, window)
        else:
            assert bud.progressive_llm_schedule(N0, 64, LLM_LAYERS, start, window).final == final


def test_ficoco_l_64_is_infeasible_with_an_informative_message():
    with pytest.raises(bud.InfeasibleBudget) as info:
        bud.progressive_llm_schedule(N0, 64, LLM_LAYERS, start=4, window=4, method="ficoco-l")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    minimum = (4 * N0 + (LLM_LAYERS - 4)) / LLM_LAYERS  # one token from layer 4 on
    assert minimum == pytest.approx(72.875)
    for fragment in ("ficoco-l", "B=64", "s=4", f"{minimum:.2f}", "s <= 3"):
        assert fragment in message


def test_progressive_schedule_rejects_bad_layout():
    with pytest.raises(ValueError, match="start must be in \\[0, 28\\].*got 29"):
        bud.progressive_llm_schedule(N0, 192, LLM_LAYERS, start=29, window=4)


@pytest.mark.parametrize(
    "budget,vision_final,vision_discards,final,llm_discards,average",
    [
        (192, 384, [18] * 5 + [17] * 6, 152, (58,) * 4, 191.88),
        (128, 256, [30] + [29] * 10, 101, (39, 39, 39, 38), 127.59),
        (64, 128, [41] * 8 + [40] * 3, 50, (20, 20, 19, 19), 63.34),
    ],
)
def test_ficoco_vl_table(budget, vision_final, vision_discards, final, llm_discards, average):
    assert min(2 * budget, N0) == vision_final
    assert list(bud.encoder_discards(N0, vision_final, VISION_REDUCING).values()) == vision_discards
    schedule = bud.progressive_llm_schedule(vision_final, budget, LLM_LAYERS, 4, 4, method="ficoco-vl")
    assert schedule.final == final and schedule.discards == llm_discards
    assert schedule.average == pytest.approx(average, abs=0.0051)


@pytest.mark.parametrize("ratio,expected", [(0.0, 576), (2 / 3, 192), (0.778, 128), (0.5, 288), (0.999, 1)])
def test_budget_from_ratio(ratio, expected):
    assert bud.budget_from_ratio(ratio, N0) == expected


@pytest.mark.parametrize("ratio", [1.0, -0.1, 0.9995])
def test_budget_from_ratio_rejects(ratio):
    with pytest.raises(ValueError, match=str(ratio)):
        bud.budget_from_ratio(ratio, N0)


# ------------------------------------------------------------------------------------------------
# Baselines (§8, §9.2)

def _one_shot_counts(keep, prune_layer):
    return [N0] * prune_layer + [keep] * (LLM_LAYERS - prune_layer)


@pytest.mark.parametrize("budget,keep,average,keep_b_average", [(192, 166, 191.6, 216), (128, 98, 127.9, 156), (64, 29, 63.2, 96)])
def test_fastv_and_dart_keep_counts(budget, keep, average, keep_b_average):
    assert bud.keep_for_budget(budget, 2, LLM_LAYERS, N0) == keep
    assert _mean(_one_shot_counts(keep, 2)) == pytest.approx(average, abs=0.051)
    assert _mean(_one_shot_counts(keep + 1, 2)) > budget  # the largest keep within budget
    assert bud.layer_average(bud.step_counts(N0, LLM_LAYERS, {2: keep})) == _mean(_one_shot_counts(keep, 2))
    assert _mean(_one_shot_counts(budget, 2)) == keep_b_average  # the `fastv_keepB` labels


def test_keep_for_budget_infeasible():
    with pytest.raises(bud.InfeasibleBudget, match="fastv: budget B=30 .*K=2.*K <= 1"):
        bud.keep_for_budget(30, 2, LLM_LAYERS, N0, method="fastv")


def _pdrop_first_principles(lam, boundaries):
    stage_counts = [math.floor(N0 * lam**k + 0.5) for k in range(1, len(boundaries) + 1)]
    counts = []
    for layer in range(LLM_LAYERS):
        passed = sum(1 for b in boundaries if layer >= b)
        counts.append(N0 if passed == 0 else stage_counts[passed - 1])
    return stage_counts, counts


@pytest.mark.parametrize(
    "budget,lam,stages,average",
    [(192, 0.5597, [322, 180, 101], 191.88), (128, 0.4194, [242, 101, 42], 127.63), (64, 0.1918, [110, 21, 4], 63.88)],
)
def test_pdrop_lambda_table(budget, lam, stages, average):
    solved = bud.solve_pdrop_lambda(budget, [2, 8, 16], LLM_LAYERS, N0)
    assert solved == pytest.approx(lam, abs=1e-12)
    stage_counts, counts = _pdrop_first_principles(solved, [2, 8, 16])
    assert stage_counts == stages == bud.pdrop_stage_counts(N0, solved, 3)
    assert _mean(counts) == pytest.approx(average, abs=0.0051)  # the table prints 2 decimals
    assert bud.pdrop_layer_counts(N0, solved, [2, 8, 16], LLM_LAYERS) == counts
    assert _mean(_pdrop_first_principles(solved + 1e-4, [2, 8, 16])[1]) > budget  # largest on the grid


def test_pdrop_official_and_late_boundaries():
    assert _mean(_pdrop_first_principles(0.5, [8, 16, 24])[1]) == 270
    assert bud.layer_average(bud.pdrop_layer_counts(N0, 0.5, [8, 16, 24], LLM_LAYERS)) == 270
    lam = bud.solve_pdrop_lambda(192, [8, 16, 24], LLM_LAYERS, N0)
    assert lam == pytest.approx(0.2543) and bud.pdrop_stage_counts(N0, lam, 3) == [146, 37, 9]
    for budget in (128, 64):
        with pytest.raises(bud.InfeasibleBudget, match=f"B={budget} .*144.00"):
            bud.solve_pdrop_lambda(budget, [8, 16, 24], LLM_LAYERS, N0, method="pdrop")


@pytest.mark.parametrize("budget,counts", [(192, [399, 277, 192]), (128, [349, 211, 128]), (64, [277, 133, 64])])
def test_evit_stage_counts(budget, counts):
    assert bud.evit_stage_counts(N0, budget) == counts


@pytest.mark.parametrize(
    "budget,merges", [(192, [17] * 16 + [16] * 7), (128, [20] * 11 + [19] * 12), (64, [23] * 6 + [22] * 17)]
)
def test_tome_merges_table(budget, merges):
    got = bud.tome_merges(N0, budget, range(23))
    assert list(got) == list(range(23)) and list(got.values()) == merges
    assert N0 - sum(merges) == budget


def test_tome_cap_binds_on_small_grids():
    # 9 patches + CLS = 10 tokens: at most ⌊9/2⌋ = 4 merges, then ⌊5/2⌋ = 2
    assert bud.tome_merges(9, 1, [0, 1]) == {0: 4, 1: 2}


@pytest.mark.parametrize("budget,hw", [(192, (12, 16)), (128, (8, 16)), (64, (8, 8)), (576, (24, 24))])
def test_pooling_grid(budget, hw):
    assert bud.pooling_grid(budget) == hw
    assert hw[0] * hw[1] == budget


def test_pooling_grid_rejects_budgets_without_a_fitting_factorisation():
    with pytest.raises(ValueError, match="budget 191 has no factor pair"):
        bud.pooling_grid(191)


@pytest.mark.parametrize("budget,side,tokens,pixels", [(192, 13, 169, 182), (128, 11, 121, 154), (64, 8, 64, 112)])
def test_downsample_side(budget, side, tokens, pixels):
    g = bud.downsample_side(budget)
    assert (g, g * g, 14 * g) == (side, tokens, pixels)
    assert (g + 1) ** 2 > budget


@pytest.mark.parametrize("budget,split", [(192, (162, 30)), (128, (108, 20)), (64, (54, 10))])
def test_visionzip_split(budget, split):
    assert bud.visionzip_split(budget) == split


@pytest.mark.parametrize("budget,split", [(192, (48, 143)), (128, (32, 95)), (64, (16, 47))])
def test_prumerge_plus_split(budget, split):
    assert bud.prumerge_plus_split(budget) == split
    assert sum(split) + 1 == budget


def _sparsevlm_first_principles(schedule, recycle):
    """Layers 0..2 full; pruning at 2/6/15 applies from the next layer; clusters join n_vis."""
    counts, n_visual = [], N0
    prunes = dict(zip((2, 6, 15), schedule))
    for layer in range(LLM_LAYERS):
        counts.append(n_visual)
        if layer in prunes:
            keep = min(prunes[layer], n_visual - 1)
            dropped = n_visual - keep
            clusters = (math.floor(0.3 * dropped) + 1) // 10 + 1
            n_visual = keep + (clusters if recycle else 0)
    return counts


@pytest.mark.parametrize(
    "schedule,with_clusters,without",
    [([300, 200, 110], 206.5, 202.8), ([303, 110, 36], 145.4, 140.8), ([66, 30, 17], 82.3, 79.2)],
)
def test_sparsevlm_realised_averages(schedule, with_clusters, without):
    for recycle, average in ((True, with_clusters), (False, without)):
        counts = bud.sparsevlm_counts(schedule, (2, 6, 15), LLM_LAYERS, N0, recycle=recycle)
        assert counts == _sparsevlm_first_principles(schedule, recycle)
        assert bud.layer_average(counts) == pytest.approx(average, abs=0.051)


@pytest.mark.parametrize("budget,schedule", [(192, [300, 200, 110]), (128, [303, 110, 36]), (64, [66, 30, 17])])
def test_sparsevlm_matched_is_within_budget(budget, schedule):
    matched = bud.sparsevlm_matched_schedule(budget, schedule, (2, 6, 15), LLM_LAYERS, N0)
    assert _mean(_sparsevlm_first_principles(matched, True)) <= budget
    assert all(m <= s for m, s in zip(matched, schedule))
    # a common factor: the ratios agree up to rounding
    assert max(m / s for m, s in zip(matched, schedule)) - min(m / s for m, s in zip(matched, schedule)) < 0.1


@pytest.mark.parametrize("budget, span, nominal, expected", [
    (160, 2880, 2880, 160),       # the nominal image: the budget itself
    (160, 2928, 2880, 163),       # a 672 x 672 image (newlines included): 162.67
    (160, 2340, 2880, 130),       # 480 x 640: exactly 130
    (320, 2340, 2880, 260),
    (41, 34, 80, 17),             # 17.425
    (1, 10, 2880, 1),             # never below one token
    (2880, 2928, 2880, 2928),     # "everything" keeps the whole span
])
def test_a_span_keeps_the_nominal_budgets_fraction(budget, span, nominal, expected):
    from fractions import Fraction

    assert bud.span_budget(budget, span, nominal) == expected
    assert abs(expected - Fraction(budget * span, nominal)) <= Fraction(1, 2) or expected == 1


@pytest.mark.parametrize("budget, span, nominal", [(0, 100, 80), (81, 100, 80), (10, 0, 80)])
def test_a_span_budget_out_of_range_is_refused(budget, span, nominal):
    with pytest.raises(ValueError, match="need 1 <= budget <= nominal and span >= 1"):
        bud.span_budget(budget, span, nominal)


def test_an_images_budget_is_a_fraction_of_the_nominal_or_a_count_for_every_image():
    from ficoco.budget_labels import ImageTokens

    assert bud.image_budget(640, 64, 1280) == bud.span_budget(640, 64, 1280) == 32      # the kept fraction
    assert bud.image_budget(ImageTokens(48), 64, 1280) == 48                            # the count
    assert bud.image_budget(ImageTokens(48), 48, 1280) is None                           # within it: kept whole
    assert bud.image_budget(ImageTokens(600), 294, 1280) is None
    with pytest.raises(ValueError, match="a span of 0 tokens"):
        bud.image_budget(ImageTokens(48), 0, 1280)

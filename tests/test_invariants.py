"""The checks every evaluate job runs before recording a sample, and aggregate's refusal of impossible costs."""
import json

import pytest

from ficoco import methods
from ficoco.dims import llava_1_5_dims
from ficoco.flops import sample_cost
from ficoco.invariants import InvariantViolation, check_cost, check_counts, check_record, prompt_text_tokens
from ficoco.report.aggregate import build_summary

DIMS = llava_1_5_dims("7b")
TEXT = 60


def plan(name, budget=None, **overrides):
    return methods.get(name).plan(DIMS, budget, **overrides)


def counts_of(planned, delivered: int | None = None) -> dict:
    """The counts a run realising `planned` records for one image row with TEXT text tokens."""
    delivered = planned.delivered if delivered is None else delivered
    visual = planned.llm_visual or [delivered] * DIMS.llm_layers
    counts = {"vision": [list(pair) for pair in planned.vision_counts], "visual_delivered": delivered,
              "llm": [TEXT + v for v in visual], "llm_visual": list(visual), "overhead_macs": 0}
    if planned.llm_mlp_visual is not None:
        counts["llm_mlp"] = [TEXT + v for v in planned.llm_mlp_visual]
    if planned.projector_tokens is not None:
        counts["projector_tokens"] = planned.projector_tokens
    return counts


def text_counts() -> dict:
    return {"vision": [], "visual_delivered": 0, "llm": [TEXT] * DIMS.llm_layers, "llm_visual": [0] * DIMS.llm_layers,
            "overhead_macs": 0}


def violation(method, planned, counts, has_image=True) -> str:
    with pytest.raises(InvariantViolation) as error:
        check_counts(method, planned, counts, has_image, sample="q7")
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{method}: sample q7: ")
    return message


@pytest.mark.parametrize("name, budget", [("vanilla", None), ("ficoco-v", 192), ("ficoco-l", 192), ("fastv", 128),
                                          ("pdrop", 64), ("visionzip", 64), ("ficoco-vl", 192)])
def test_counts_that_realise_the_plan_pass(name, budget):
    planned = plan(name, budget)
    counts = counts_of(planned)
    check_counts(name, planned, counts, has_image=True)
    check_cost(name, sample_cost(DIMS, counts, generated_tokens=3), has_image=True)
    check_counts(name, planned, text_counts(), has_image=False)
    check_cost(name, sample_cost(DIMS, text_counts(), generated_tokens=1), has_image=False)


def test_counts_of_a_decode_step_are_refused():
    """What a hook reading the last forward (a decode step) instead of the prefill would record."""
    planned = plan("ficoco-v", 192)
    decode = {"vision": [], "visual_delivered": 0, "llm": [1] * DIMS.llm_layers, "llm_visual": [0] * DIMS.llm_layers,
              "overhead_macs": 0}
    assert "visual tokens delivered to the LLM for an image row: expected > 0, found 0" in violation(
        "ficoco-v", planned, decode)


@pytest.mark.parametrize("overhead, found", [(None, "missing"), (-5, "-5"), (2.5, "2.5"), (True, "True")])
def test_an_impossible_overhead_is_refused(overhead, found):
    counts = {**counts_of(plan("ficoco-v", 192)), "overhead_macs": overhead}
    if overhead is None:
        del counts["overhead_macs"]
    assert violation("ficoco-v", plan("ficoco-v", 192), counts) == (
        f"ficoco-v: sample q7: selection overhead (overhead_macs): expected a whole number of MACs >= 0, found {found}")


def test_mlp_tokens_of_an_in_layer_reduction_are_checked():
    planned = plan("ficoco-l", 192, placement="attention")
    counts = counts_of(planned)
    check_counts("ficoco-l", planned, counts, has_image=True)
    check_cost("ficoco-l", sample_cost(DIMS, counts, generated_tokens=2), has_image=True)
    missing = {key: value for key, value in counts.items() if key != "llm_mlp"}    # MLPs that ran on every token
    assert violation("ficoco-l", planned, missing).endswith(
        f"LLM layer 4 MLP visual tokens: expected {planned.llm_mlp_visual[4]}, found 576")
    unplanned = {**counts_of(plan("ficoco-l", 192)), "llm_mlp": [TEXT] * DIMS.llm_layers}
    assert violation("ficoco-l", plan("ficoco-l", 192), unplanned).endswith(
        "LLM layer 0 MLP visual tokens: expected 576, found 0")


def test_the_tokens_the_projector_ran_on_are_checked_against_the_plan():
    planned = plan("divprune", 64)
    assert planned.projector_tokens == 576
    check_counts("divprune", planned, counts_of(planned), has_image=True)
    unrecorded = {key: value for key, value in counts_of(planned).items() if key != "projector_tokens"}
    assert violation("divprune", planned, unrecorded).endswith("tokens the projector ran on: expected 576, found 64")
    assert violation("visionzip", plan("visionzip", 64), {**counts_of(plan("visionzip", 64)), "projector_tokens": 576}
                     ).endswith("tokens the projector ran on: expected 64, found 576")


def test_the_tower_passes_of_a_multi_crop_image_are_checked_against_its_plan():
    """LLaVA-NeXT: a 672 x 672 image is 5 tower passes; a record of other passes (transformers packing the
    crops otherwise, a hook counting one pass) cannot be true."""
    from ficoco.dims import llava_next_dims, unreduced_plan
    from ficoco.flops import counts_from_plan

    dims = llava_next_dims("7b")
    planned = unreduced_plan(dims, [dims.anyres_layout(672, 672)])
    counts = {**counts_from_plan(dims, planned, TEXT), "overhead_macs": 0}
    assert counts["vision_crops"] == planned.vision_crops == 5 and counts["visual_delivered"] == 2928
    check_counts("vanilla", planned, counts, has_image=True)
    assert violation("vanilla", planned, {**counts, "vision_crops": 1}).endswith(
        "vision tower passes (vision_crops): expected 5, found 1")
    one_pass = {**counts, "vision": counts["vision"][:dims.vision_layers_run]}
    assert violation("vanilla", planned, one_pass).endswith(f"vision layers executed: expected {5 * 23}, found 23")
    assert violation("vanilla", plan("vanilla"), {**counts_of(plan("vanilla")), "vision_crops": 5}).endswith(
        "vision tower passes (vision_crops): expected 1, found 5")


def test_overhead_without_a_reduction_is_refused():
    planned = plan("vanilla")
    assert violation("vanilla", planned, {**counts_of(planned), "overhead_macs": 10}).endswith(
        "selection overhead of a plan that reduces nothing: expected 0, found 10")
    check_counts("ficoco-v", plan("ficoco-v", 192), {**counts_of(plan("ficoco-v", 192)), "overhead_macs": 10},
                 has_image=True)


def test_a_layer_off_the_plan_is_named_with_expected_and_found():
    planned = plan("fastv", 128)
    counts = counts_of(planned)
    counts["llm_visual"][5] += 1
    counts["llm"][5] += 1
    expected = planned.llm_visual[5]
    assert violation("fastv", planned, counts).endswith(
        f"LLM layer 5 visual tokens: expected {expected}, found {expected + 1}")


def test_a_vision_layer_off_the_plan_is_named():
    planned = plan("ficoco-v", 192)
    layer = next(i for i, (n_attn, n_mlp) in enumerate(planned.vision_counts) if n_mlp < n_attn)
    counts = counts_of(planned)
    counts["vision"][layer] = [counts["vision"][layer][0]] * 2         # the layer did not reduce
    assert (f"vision layer {layer} [attention, MLP] tokens: expected {planned.vision_counts[layer]}, "
            f"found {counts['vision'][layer]}") in violation("ficoco-v", planned, counts)


def test_delivered_tokens_must_match_a_fixed_plan():
    planned = plan("visionzip", 64)
    counts = counts_of(planned, delivered=576)
    assert "visual tokens delivered to the LLM: expected 64, found 576" in violation("visionzip", planned, counts)


def test_empty_layers_and_dropped_text_are_refused():
    planned = plan("vanilla")
    counts = counts_of(planned)
    counts["llm"][4] = 0
    assert "LLM layer 4 sequence length: expected > 0, found 0" in violation("vanilla", planned, counts)
    counts = counts_of(planned)
    counts["llm"][9] -= 5                                        # a method dropping text tokens
    assert f"LLM layer 9 text tokens: expected {TEXT} (as in layer 0), found {TEXT - 5}" in violation(
        "vanilla", planned, counts)


def test_a_text_row_has_no_visual_tokens():
    planned = plan("vanilla")
    assert "visual tokens delivered for a text-only row: expected 0, found 576" in violation(
        "vanilla", planned, {**counts_of(planned), "vision": []}, has_image=False)
    assert "tokens the projector ran on for a text-only row: expected 0, found 576" in violation(
        "vanilla", planned, {**text_counts(), "projector_tokens": 576}, has_image=False)


@pytest.mark.parametrize("name, budget", [("vanilla", None), ("ficoco-v", 36), ("fastv", 128)])
def test_the_text_tokens_are_the_prompts_own(name, budget):
    """Layer 0's text tokens are checked against the prompt's (counted from the model input): a hook that
    records 1 text token, or 10 times the prompt, passes every other check but costs the sample wrongly."""
    planned = plan(name, budget)
    check_counts(name, planned, counts_of(planned), True, sample="q7", text_tokens=TEXT)
    for wrong_text in (1, 10 * TEXT):
        counts = counts_of(planned)
        shift = wrong_text - TEXT
        counts = {**counts, "llm": [length + shift for length in counts["llm"]]}
        if "llm_mlp" in counts:
            counts["llm_mlp"] = [length + shift for length in counts["llm_mlp"]]
        check_counts(name, planned, counts, True, sample="q7")             # consistent with itself
        with pytest.raises(InvariantViolation, match=rf"text tokens of LLM layer 0: expected {TEXT} .*found "
                                                     rf"{wrong_text}$"):
            check_counts(name, planned, counts, True, sample="q7", text_tokens=TEXT)


def test_prompt_text_tokens_leave_out_padding_and_image_placeholders():
    import torch

    image = 9
    input_ids = torch.tensor([[0, 0, 5, 9, 9, 9, 6, 7],                 # left padding, 3 placeholders, 3 text
                              [5, 6, 9, 9, 9, 7, 8, 4]])                # no padding: 5 text
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    expected = [sum(1 for token, keep in zip(ids, keeps) if keep and token != image)      # a plain loop
                for ids, keeps in zip(input_ids.tolist(), mask.tolist())]
    assert prompt_text_tokens({"input_ids": input_ids, "attention_mask": mask}, image) == expected == [3, 5]


def test_an_adaptive_method_stays_within_its_bounds():
    planned = plan("prumerge-adaptive")
    post = planned.post_vision
    assert 2 == post.tokens_min < post.tokens_max <= DIMS.visual_tokens
    check_counts("prumerge-adaptive", planned, counts_of(planned, delivered=40), has_image=True)
    high = post.tokens_max
    assert f"expected 2..{high} (the method's adaptive bounds), found {high + 1}" in violation(
        "prumerge-adaptive", planned, counts_of(planned, delivered=high + 1))
    counts = counts_of(planned, delivered=40)
    counts["llm_visual"][3], counts["llm"][3] = 39, TEXT + 39
    assert "LLM layer 3 visual tokens: expected 40, found 39" in violation("prumerge-adaptive", planned, counts)
    # PruMerge+: its stride follows each image's k outliers (at most those above Q3), so at least the larger of
    # k and its raster sample below n - 1, plus the extra token
    plus, n = plan("prumerge-plus-adaptive").post_vision, DIMS.num_patches
    sizes = [(k, len(range(0, n - 1, int(int(1 / (k / n)) / 3)))) for k in range(1, n - n * 3 // 4 + 1)]
    assert plus.tokens_min == min(max(k, raster) for k, raster in sizes) + 1 and plus.tokens_max <= DIMS.visual_tokens


def test_costs_must_be_positive_and_finite():
    good = sample_cost(DIMS, counts_of(plan("vanilla")), generated_tokens=2)
    check_cost("vanilla", good, has_image=True)
    for key, value, found in (("total_flops", 0.0, "0.0"), ("vision_flops", 0.0, "0.0"),
                              ("prefill_flops", None, "missing")):
        broken = {**good, key: value} if value is not None else {k: v for k, v in good.items() if k != key}
        with pytest.raises(InvariantViolation, match=rf"^vanilla: cost {key}: expected > 0, found {found}$"):
            check_cost("vanilla", broken, has_image=True)
    with pytest.raises(InvariantViolation, match="cost decode_flops: expected a finite number >= 0, found -1"):
        check_cost("vanilla", {**good, "decode_flops": -1.0}, has_image=True)
    check_cost("vanilla", {**good, "vision_flops": 0.0}, has_image=False)     # a text-only row runs no vision


def test_failure_records_are_not_checked_but_a_ran_sample_needs_counts():
    planned = plan("vanilla")
    check_record("vanilla", planned, {"id": "x", "error": "bad row: no image", "counts": None, "cost": None}, True)
    with pytest.raises(InvariantViolation, match="counts and cost of a sample that ran"):
        check_record("vanilla", planned, {"id": "x", "error": None, "counts": None, "cost": None}, True)


# ---------------------------------------------------------------------------------------------
# aggregate


def write_metrics(tmp_path, cost_mean, samples=8, failures=0, delivered=36.0):
    path = tmp_path / "runs/m/b/ficoco-v/b36/metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "job": {"model": "m", "method": "ficoco-v", "phase": "vision", "budget": "36", "benchmark": "b"},
        "metrics": {"score": 50.0}, "headline": "score", "samples": samples, "failures": failures,
        "cost_mean": cost_mean, "visual_tokens": {"layer_average": delivered, "per_layer": [delivered],
                                                  "delivered": delivered}}))
    return path


GOOD_COSTS = {"total_flops": 3.0e12, "prefill_flops": 2.5e12, "vision_flops": 0.35e12, "decode_flops": 0.1e12,
              "overhead_flops": 0.0, "legacy_nominal_tflops": 2.4}


def test_aggregate_accepts_real_costs(tmp_path):
    summary = build_summary([write_metrics(tmp_path, GOOD_COSTS)], [])
    assert summary.results["tflops_exact"].iloc[0] == pytest.approx(3.0)


@pytest.mark.parametrize("cost_mean, message", [
    ({**GOOD_COSTS, "total_flops": 0.0}, "cost_mean.total_flops = 0.0 over 8 samples that ran"),
    ({k: v for k, v in GOOD_COSTS.items() if k != "prefill_flops"}, "cost_mean.prefill_flops = None"),
    ({**GOOD_COSTS, "vision_flops": 0.0}, "cost_mean.vision_flops = 0.0"),
    ({**GOOD_COSTS, "decode_flops": -5.0}, "cost_mean.decode_flops = -5.0; a cost must be finite and >= 0"),
    ({}, "8 samples ran but cost_mean is missing"),
])
def test_aggregate_refuses_impossible_costs_naming_the_file(tmp_path, cost_mean, message):
    path = write_metrics(tmp_path, cost_mean)
    with pytest.raises(ValueError) as error:
        build_summary([path], [])
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_aggregate_accepts_a_run_whose_every_sample_failed(tmp_path):
    build_summary([write_metrics(tmp_path, {}, samples=4, failures=4)], [])

"""FitPrune (`ficoco/methods/fitprune.py`, `ficoco/calibrate.py`): the deletion rule and the fitted
schedule against plain loops written from the authors' `fit_model` / `fitprune_llama.py`, the plan
and its errors, and the method on a tiny model: the kept tokens equal a loop over float64 head-max
probabilities recomputed from the unpatched layer's input, counts equal the plan, a batch equals each
prompt alone, cached generation equals the unpatched model with the deleted tokens masked,
`remove()` restores bit-identical outputs; the fit meets its budget and its bisection is tight; an
artifact made for another job is refused.
"""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from helpers_tiny import (IMAGE, float64_layer_probabilities, generate_batch_and_alone, images, n_placeholders,
                          prompt, tiny_llava)

import ficoco
from ficoco import methods
from ficoco.budget import InfeasibleBudget
from ficoco.calibrate import fit_fitprune, fitted_overrides, with_calibration
from ficoco.dims import llava_1_5_dims
from ficoco.methods.fitprune import fitted_schedule, mass_deletions

DIMS_7B = llava_1_5_dims("7b")


# ------------------------------------------------------------------------------------------------
# The references: the authors' loops in plain Python

def reference_deletions(scores: list[float], mass: float, alpha: float) -> int:
    """statistical_analysis.py `fit_model`: walk the ascending scores until the rest falls below
    mass − α·mass, delete one fewer; all but one when it never does."""
    ordered = sorted(scores)
    total = sum(ordered)
    for i in range(len(ordered)):
        if total - sum(ordered[:i]) < mass - alpha * mass:
            return max(i - 1, 0)
    return len(ordered) - 1


def reference_schedule(deleted: list[list[int]], n0: int, budget: int) -> list[int] | None:
    """The mean count per layer (rounded down); stop at the first layer whose forecast (the layers so
    far, then the current count to the end) meets the budget."""
    n_layers = len(deleted[0])
    mean = [sum(row[layer] for row in deleted) // len(deleted) for layer in range(n_layers)]
    used, current = 0, n0
    for layer in range(n_layers + 1):
        if (used + current * (n_layers - layer)) / n_layers <= budget:
            return mean[:layer] + [0] * (n_layers - layer)
        if layer < n_layers:
            used += current
            current -= mean[layer]
    return None


@pytest.mark.parametrize("seed", range(6))
def test_mass_deletions_equal_the_authors_loop(seed):
    generator = random.Random(seed)
    scores = [generator.random() ** 3 for _ in range(generator.randint(1, 40))]
    for mass in (sum(scores), 1.3 * sum(scores), 0.6 * sum(scores)):
        for alpha in (0.0, 0.01, 0.2, 0.5, 0.77, 0.99, 1.0):
            assert mass_deletions(torch.tensor(scores), mass, alpha) == reference_deletions(scores, mass, alpha)


@pytest.mark.parametrize("seed", range(6))
def test_the_fitted_schedule_equals_the_early_stop_loop(seed):
    generator = random.Random(seed)
    n0, n_layers = 40, 6
    deleted = [[generator.randint(0, 8) for _ in range(n_layers - 1)] + [0] for _ in range(generator.randint(1, 5))]
    for budget in range(1, n0 + 1):
        assert fitted_schedule(deleted, n0, budget) == reference_schedule(deleted, n0, budget)


# ------------------------------------------------------------------------------------------------
# The plan (no model)

def test_the_plan_counts_attention_before_and_the_mlp_after_each_deletion():
    deletions = [0, 0, 200] + [40] * 5 + [0] * 24
    plan = methods.get("fitprune").check_budget(DIMS_7B, 240, deletions=deletions)
    attention = [576] * 3 + [376, 336, 296, 256, 216] + [176] * 24
    assert plan.llm_visual == attention and plan.layer_average == sum(attention) / 32 == 232.25
    assert plan.llm_mlp_visual == [576, 576, 376, 336, 296, 256, 216] + [176] * 25
    assert (plan.llm.layers, plan.llm.discards, plan.llm.visual_out) == ([2, 3, 4, 5, 6, 7], [200] + [40] * 5,
                                                                         [376, 336, 296, 256, 216, 176])
    (step,) = methods.get("fitprune").steps(plan)
    assert step.placement == "attention" and dict(step.tokens_out) == dict(zip(plan.llm.layers, plan.llm.visual_out))
    unreduced = methods.get("fitprune").check_budget(DIMS_7B, None)
    assert unreduced.layer_average == 576 and methods.get("fitprune").steps(unreduced) == ()


def test_bad_schedules_name_the_value_and_what_is_valid():
    method = methods.get("fitprune")
    with pytest.raises(ValueError, match=r"fitprune: budget 64 needs its fitted deletion schedule .* `ficoco calibrate"):
        method.check_budget(DIMS_7B, 64)
    with pytest.raises(ValueError, match=r"need one count per LLM layer \(32\), 0 at the last layer"):
        method.check_budget(DIMS_7B, 64, deletions=[100] * 4)
    with pytest.raises(ValueError, match=r"0 at the last layer"):
        method.check_budget(DIMS_7B, 300, deletions=[0] * 31 + [5])
    with pytest.raises(ValueError, match=r"fewer than 576 in all"):
        method.check_budget(DIMS_7B, 64, deletions=[576] + [0] * 31)
    with pytest.raises(InfeasibleBudget, match=r"realise a layer average of 567\.56 visual tokens, above the "
                                               r"budget 64: they were fitted for another budget"):
        method.check_budget(DIMS_7B, 64, deletions=[0, 0, 0, 0, 10] + [0] * 27)
    with pytest.raises(ValueError, match=r"deletions=\[-1\] must be None \(not fitted\) or a list of integers"):
        method.check_budget(DIMS_7B, 64, deletions=[-1])
    with pytest.raises(ValueError, match=r"epsilon=0 must be a number in \(0, 1\)"):
        method.check_budget(DIMS_7B, None, epsilon=0)
    assert method.calibrated and method.phase == "llm" and "maximum over heads" in method.needs_attention


# ------------------------------------------------------------------------------------------------
# On a tiny model: 16 visual tokens, 4 LLM layers

DELETIONS, BUDGET = [6, 4, 2, 0], 9          # attention sees 16, 10, 6, 4: layer average 9
BEFORE, AFTER = [10, 11], [12, 13, 14]


@pytest.fixture(scope="module")
def model():
    return tiny_llava(llm_layers=4, llm_kv_heads=2)


def float64_head_max(model, ids, pixels, layer_index: int) -> torch.Tensor:
    """Head-max causal attention probabilities (L, L) of LLM layer `layer_index`, in float64."""
    return float64_layer_probabilities(model, ids, pixels, layer_index).amax(0)


def _self_and_cross(probs: torch.Tensor, visual: list[int], after: list[int]) -> tuple[list[float], list[float]]:
    received_self = [sum(float(probs[i, j]) for i in visual) / len(visual) for j in visual]
    received_cross = [sum(float(probs[t, j]) for t in after) / len(after) for j in visual]
    return received_self, received_cross


def test_the_first_deletion_equals_the_loop_on_float64_head_max(model):
    """Layer 0's input is the unreduced sequence: the loop on the unpatched model's probabilities
    deletes the 6 visual tokens of lowest self × cross; the rest are what the method keeps."""
    ids = torch.tensor([prompt(n_placeholders(model), BEFORE, AFTER)])
    pixels = images(1, 28, seed=4)
    probs = float64_head_max(model, ids, pixels, 0)
    visual = [p for p in range(ids.shape[1]) if ids[0, p] == IMAGE]
    after = list(range(visual[-1] + 1, ids.shape[1]))
    received_self, received_cross = _self_and_cross(probs, visual, after)
    product = [s * c for s, c in zip(received_self, received_cross)]
    deleted = sorted(range(len(visual)), key=lambda j: (product[j], j))[:DELETIONS[0]]
    expected = [visual[j] for j in range(len(visual)) if j not in deleted]
    with ficoco.apply(model, "fitprune", BUDGET, deletions=DELETIONS) as handle, torch.no_grad():
        model(input_ids=ids, pixel_values=pixels)
        assert handle.last_trace()["llm"][0][0].tolist() == expected


def test_counts_equal_the_plan_and_a_batch_equals_each_prompt_alone(model):
    n = n_placeholders(model)
    prompts = [prompt(n, [10, 11, 12], [13, 14, 15, 16]), prompt(n, [17], [18, 19])]
    with ficoco.apply(model, "fitprune", BUDGET, deletions=DELETIONS) as handle:
        _, _, batched_counts, _, _ = generate_batch_and_alone(model, handle, prompts, images(2, 28, seed=5))
        plan = handle.plan
    assert plan.llm_visual == [16, 10, 6, 4] and plan.llm_mlp_visual == [10, 6, 4, 4]
    for row, tokens in enumerate(prompts):
        counts, text = batched_counts[row], len(tokens) - n
        assert counts["llm_visual"] == plan.llm_visual
        assert counts["llm_mlp"] == [text + visual for visual in plan.llm_mlp_visual]
        assert counts["overhead_macs"] == 0                  # sums over the layer's own probabilities


def test_cached_generation_equals_the_unpatched_model_with_deleted_tokens_masked(model):
    """Every decoding step against the unmodified LLM run without a cache on prompt + generated tokens,
    where a token deleted after the attention of layer l is hidden as a key from layer l + 1 on."""
    ids = torch.tensor([prompt(n_placeholders(model), BEFORE, AFTER)])
    pixels = images(1, 28, seed=6)
    with ficoco.apply(model, "fitprune", BUDGET, deletions=DELETIONS) as handle, torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        trace = handle.last_trace()["llm"]
    visual = set(p for p in range(ids.shape[1]) if ids[0, p] == IMAGE)
    hidden_from = {}                                          # layer -> positions hidden as keys there
    gone = set()
    for layer in range(4):
        hidden_from[layer] = set(gone)
        if layer in trace:
            gone = visual - set(trace[layer][0].tolist())

    def masked(layer_index: int, length: int):
        def pre_hook(module, args, kwargs):
            allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))
            allowed[:, sorted(hidden_from[layer_index])] = False
            allowed |= torch.eye(length, dtype=torch.bool)                   # a hidden query still sees itself
            return args, {**kwargs, "attention_mask": allowed[None, None]}
        return pre_hook

    generated = out.sequences[0, ids.shape[1]:]
    language = model.model.language_model
    for step, step_logits in enumerate(out.logits):
        sequence = torch.cat([ids[0], generated[:step]])[None]
        hooks = [layer.register_forward_pre_hook(masked(index, sequence.shape[1]), with_kwargs=True)
                 for index, layer in enumerate(language.layers)]
        try:
            with torch.no_grad():
                recomputed = model(input_ids=sequence, pixel_values=pixels, use_cache=False).logits[0, -1]
        finally:
            for hook in hooks:
                hook.remove()
        torch.testing.assert_close(step_logits[0], recomputed, rtol=1e-4, atol=1e-5)


def test_remove_restores_bit_identical_outputs(model):
    ids = torch.tensor([prompt(n_placeholders(model), BEFORE, AFTER)])
    pixels = images(1, 28, seed=8)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels).logits
    with ficoco.apply(model, "fitprune", BUDGET, deletions=DELETIONS), torch.no_grad():
        reduced = model(input_ids=ids, pixel_values=pixels).logits
    with torch.no_grad():
        after = model(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(before, after) and not torch.allclose(reduced[0, -1], before[0, -1])


# ------------------------------------------------------------------------------------------------
# The fit

def _prompts(model, count: int) -> list[dict]:
    n = n_placeholders(model)
    return [{"input_ids": torch.tensor([prompt(n, [10 + seed], [20, 21 + seed, 22])]),
             "pixel_values": images(1, 28, seed=seed)} for seed in range(count)]


@pytest.mark.parametrize("budget", [12, 8, 6])
def test_the_fit_meets_the_budget_and_its_bisection_is_tight(model, budget):
    epsilon = 0.01
    fit = fit_fitprune(model, _prompts(model, 3), budget, epsilon, progress=False)
    plan = methods.get("fitprune").check_budget(ficoco.dims.ModelDims.from_config(model.config), budget,
                                                deletions=fit.deletions)
    assert plan.layer_average == fit.layer_average <= budget and fit.deletions[-1] == 0
    reached = [trial["alpha"] for trial in fit.trials if trial["layer_average"] is not None]
    failed = [trial["alpha"] for trial in fit.trials if trial["layer_average"] is None]
    assert fit.trials[0]["alpha"] == 1.0 and min(reached) == fit.alpha
    assert len(fit.trials) == 1 + math.ceil(math.log2(1 / epsilon))
    # the largest α below the result that the bisection tried did not meet the budget, within ε
    below = [alpha for alpha in failed if alpha < fit.alpha]
    assert fit.alpha <= epsilon or (below and fit.alpha - max(below) <= epsilon)


def test_the_fitting_pass_deletes_at_layer_0_what_the_mass_rule_allows(model):
    """At layer 0 (the unreduced input) the deleted count is the intersection of the two low-mass sets
    of the loop on float64 head-max probabilities, at a given α."""
    from ficoco.methods import fitprune

    inputs = _prompts(model, 1)[0]
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    probs = float64_head_max(model, ids, pixels, 0)
    visual = [p for p in range(ids.shape[1]) if ids[0, p] == IMAGE]
    after = list(range(visual[-1] + 1, ids.shape[1]))
    received_self, received_cross = _self_and_cross(probs, visual, after)
    for alpha in (0.3, 0.6, 0.9):
        lowest_self = sorted(range(16), key=lambda j: (received_self[j], j))[
            :reference_deletions(received_self, sum(received_self), alpha)]
        lowest_cross = sorted(range(16), key=lambda j: (received_cross[j], j))[
            :reference_deletions(received_cross, sum(received_cross), alpha)]
        masses, deleted = {}, {}
        with ficoco.apply(model, fitprune.fit_method(fitprune.statistics_step(4, masses))), torch.no_grad():
            model(**inputs)
        with ficoco.apply(model, fitprune.fit_method(fitprune.fitting_step(4, alpha, masses, deleted))), \
                torch.no_grad():
            model(**inputs)
        assert masses[0] == pytest.approx((sum(received_self), sum(received_cross)), rel=1e-5)
        assert deleted[0] == len(set(lowest_self) & set(lowest_cross))
        assert set(deleted) == {0, 1, 2}                       # never after the last layer


def test_a_budget_out_of_reach_is_refused(model):
    """Layer 0's attention always sees the 16 tokens: the layer average cannot go below (16 + 3·1) / 4."""
    with pytest.raises(InfeasibleBudget, match=r"fitprune: budget 4 is out of reach even when every layer may lose "
                                               r"all its attention mass \(α = 1\): the fewest visual tokens it reaches "
                                               r"are a layer average of [45]\.\d\d"):
        fit_fitprune(model, _prompts(model, 1), 4, 0.1, progress=False)


# ------------------------------------------------------------------------------------------------
# The artifact a job reads

def _artifact(tmp_path, **changes):
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "manifest.json").write_text(json.dumps({"id": "toy", "revision": "abc123"}))
    artifact = {"method": "fitprune", "budget": 9, "params": {"epsilon": 0.01}, "model_revision": "abc123",
                "fit": {"alpha": 0.5, "deletions": DELETIONS, "layer_average": 9.0, "trials": []}}
    artifact.update(changes)
    path = tmp_path / "b9.json"
    path.write_text(json.dumps(artifact))
    return path, model_dir


def test_a_job_reads_its_fit_and_refuses_one_made_for_another_job(tmp_path):
    path, model_dir = _artifact(tmp_path)
    assert with_calibration("fitprune", 9, {}, path, model_dir) == {"deletions": DELETIONS}
    for change, named in [({"budget": 10}, "budget 10 (this job: 9)"),
                          ({"model_revision": "old"}, "model_revision 'old' (this job: 'abc123')"),
                          ({"params": {"epsilon": 0.1}}, "params {'epsilon': 0.1}")]:
        path, model_dir = _artifact(tmp_path, **change)
        with pytest.raises(ValueError, match="this calibration was fitted for another job: " + named.replace(
                "(", r"\(").replace(")", r"\)").replace("{", r"\{").replace("}", r"\}")):
            fitted_overrides(path, method="fitprune", budget=9, params={"epsilon": 0.01, "deletions": None},
                             model_dir=model_dir)
    with pytest.raises(ValueError, match=r"fitprune at budget 9 needs its fitted calibration: pass --calibration"):
        with_calibration("fitprune", 9, {}, None, model_dir)
    with pytest.raises(ValueError, match=r"--calibration .*: fastv at budget 9 fits nothing"):
        with_calibration("fastv", 9, {}, path, model_dir)
    assert with_calibration("fitprune", None, {}, None, model_dir) == {}     # unreduced: nothing to fit


# ------------------------------------------------------------------------------------------------
# The config: a calibrated method is checked before any job

TOY_GRID = {"models": ["toy-llava"], "methods": ["vanilla", "fitprune"], "budgets": [72], "benchmarks": ["toy-shapes"]}


@pytest.mark.parametrize("change, message", [
    ({}, r"calibration\.benchmark: None: methods \['fitprune'\] fit their parameters on a calibration set first; "
         r"valid: a registered benchmark the grid does not evaluate"),
    ({"calibration": {"benchmark": "toy-shapes"}}, r"calibration\.benchmark: 'toy-shapes' is also evaluated"),
    ({"calibration": {"benchmark": "toy-shapez"}}, r"'toy-shapez' is not known \(did you mean 'toy-shapes'\?\)"),
    ({"calibration": {"benchmark": "toy-shapes-train", "rows": 65}},
     r"calibration\.rows: 65 rows, but toy-shapes-train has 64 .*valid: 1\.\.64"),
    ({"calibration": {"benchmark": "toy-shapes-train"}, "budgets": [{"tflops": 0.01}]},
     r"budgets\[0\]: 't0\.01' for method fitprune on model toy-llava: a TFLOPs target .*valid for fitprune: token "
     r"budgets"),
    ({"calibration": {"benchmark": "toy-shapes-train"}, "method_params": {"fitprune": {"epsilon": 1.5}}},
     r"epsilon"),
])
def test_a_bad_calibration_setting_is_refused_before_any_job(change, message):
    from ficoco.config import ConfigError, validate

    with pytest.raises(ConfigError, match=message):
        validate({**TOY_GRID, **change})


def test_a_calibration_set_is_needed_only_by_a_calibrated_method():
    from ficoco.config import validate

    assert validate({**TOY_GRID, "methods": ["vanilla", "fastv"]})["calibration"]["benchmark"] is None
    config = validate({**TOY_GRID, "calibration": {"benchmark": "toy-shapes-train", "rows": 8}})
    assert config["calibration"] == {"benchmark": "toy-shapes-train", "rows": 8}


@pytest.mark.parametrize("argv, message", [
    (["--method", "fastv", "--budget", "64", "--rows", "4"],
     "fastv: nothing to calibrate (it fits no parameters); calibrated methods: ['fitprune']"),
    (["--method", "fitprune", "--budget", "0", "--rows", "4"], "budget=0: a calibration fits a token budget"),
    (["--method", "fitprune", "--budget", "64", "--rows", "0"], "rows=0: the calibration set needs at least one row"),
    (["--method", "fitprune", "--budget", "64", "--rows", "4", "--overrides", '{"epsilon": 2}'], "epsilon"),
])
def test_ficoco_calibrate_refuses_bad_arguments_before_loading_anything(tmp_path, capsys, argv, message):
    from ficoco.calibrate import main

    missing = str(tmp_path / "missing")                   # never read: the checks come first
    assert main(["--model-dir", missing, "--benchmark-dir", missing, "--benchmark-module", "toy-shapes",
                 "--out", str(tmp_path / "fit.json"), *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ficoco calibrate: ") and message in error
    assert not (tmp_path / "fit.json").exists()


def test_a_toy_benchmark_of_an_unknown_split_is_refused(tmp_path):
    import yaml

    from ficoco.config import REPO_ROOT, ConfigError, validate

    registry = yaml.safe_load((REPO_ROOT / "config/benchmarks.yaml").read_text())
    registry["toy-shapes-train"]["split"] = "tran"
    path = tmp_path / "benchmarks.yaml"
    path.write_text(yaml.safe_dump(registry))
    with pytest.raises(ConfigError, match=r"toy-shapes-train\.split: 'tran' is not a toy split; valid: train, test, val"):
        validate({**TOY_GRID, "calibration": {"benchmark": "toy-shapes-train"}, "registries": {"benchmarks": str(path)}})

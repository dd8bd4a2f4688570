"""Budgets stated as costs: {tflops: t, convention: exact | nominal}, solved per model and method.

The solver (ficoco.flops.solve_tflops_budget) bisects; the reference here scans every budget of every
registered method and picks the closest cost by hand (ties to the cheaper), so the bisection's
assumptions (cost never falls as the budget grows; a method's budgets are contiguous unless it is
solved by a scan) are checked for every method rather than assumed.
"""
import json
import math

import pytest
import yaml

from ficoco import methods
from ficoco.budget import InfeasibleBudget
from ficoco.budget_labels import TflopsTarget, describe, is_label, run_label_problem, sort_key, tflops_target
from ficoco.config import ConfigError, budgets_for, job_grid, load_and_validate, model_dims, validate
from ficoco.flops import (NOMINAL_TEXT_TOKENS, convention_tflops, dims_for, planned_counts, sample_cost,
                          solve_tflops_budget)
from pipeline import REPO_ROOT, copy_workflow, pipeline_env, planned_jobs, read_jsonl, snakemake, write_toy_config

LLAVA_7B = dims_for(None, "llava-1.5-7b")
TOY = model_dims("toy-llava", {"shape": "toy", "size": "default"})
TOY_SMALL = model_dims("toy-llava", {"shape": "toy", "size": "small"})      # the pipeline tests' model
# a calibrated method (FitPrune) plans only with its fitted schedule, so it has no cost to solve for
BUDGETED = [name for name in methods.names()
            if name != "vanilla" and methods.get(name).budgeted and not methods.get(name).calibrated]
# the toy model's layer settings from its registry entry (what the grid's solve uses there)
TOY_ENTRY = yaml.safe_load((REPO_ROOT / "config/models.yaml").read_text())["toy-llava"]
TOY_PARAMS, TOY_TEXT = TOY_ENTRY["method_params"], TOY_ENTRY["text_tokens"]


def overrides_for(dims, method: str) -> dict:
    if dims is LLAVA_7B:
        return {}
    return {key: value for key, value in TOY_PARAMS.get(method, {}).items() if key != "per_budget"}


def scanned_costs(dims, method: str, overrides: dict) -> dict[str, dict[int, float]]:
    """convention -> {budget: cost} over every budget the method runs at (a slow, plain loop)."""
    table = {"exact": {}, "nominal": {}}
    for tokens in range(1, dims.visual_tokens + 1):
        try:
            counts = planned_counts(dims, method, tokens, **overrides)
        except ValueError:
            continue
        cost = sample_cost(dims, counts, generated_tokens=1)
        table["exact"][tokens] = cost["total_flops"] / 1e12
        table["nominal"][tokens] = cost["legacy_nominal_tflops"]
    return table


def targets_for(costs: dict[int, float]) -> list[float]:
    """Targets across the reachable range: both ends, interior points, and exact midpoints between
    neighbouring costs (where the tie rule decides)."""
    values = sorted(set(costs.values()))
    picks = [values[0], values[-1]] + [values[len(values) * k // 7] for k in range(1, 7)]
    middles = [(a + b) / 2 for a, b in zip(values[len(values) // 3:], values[len(values) // 3 + 1:])][:3]
    return picks + middles


@pytest.mark.parametrize("dims", [LLAVA_7B, TOY], ids=["llava-1.5-7b", "toy"])
@pytest.mark.parametrize("method", BUDGETED)
def test_the_solver_finds_the_closest_cost_of_a_full_scan(dims, method):
    overrides = overrides_for(dims, method)
    table = scanned_costs(dims, method, overrides)
    assert table["exact"] or method in ("sparsevlm", "sparsevlm-matched", "ficoco-v-official", "pdrop-official",
                                        "ficoco-v-code"), f"{method} runs at no budget"
    for convention, costs in table.items():
        if not costs:
            continue
        for tflops in targets_for(costs):
            # TflopsTarget keeps the float as given; its tolerance only widens the reachable range
            target = TflopsTarget(tflops, convention)
            best = min(costs, key=lambda budget: (abs(costs[budget] - tflops), costs[budget], budget))
            solved = solve_tflops_budget(dims, method, target, **overrides)
            assert solved.tokens == best, (method, convention, tflops, solved, costs[best])
            assert solved.predicted_tflops == pytest.approx(costs[best], rel=1e-12)
            assert solved.reachable_tokens == (min(costs), max(costs))
        beyond = TflopsTarget(max(costs.values()) * 1.5, convention)
        with pytest.raises(InfeasibleBudget, match=r"out of reach .* cost [0-9.e-]+\.\.[0-9.e-]+ TFLOPs"):
            solve_tflops_budget(dims, method, beyond, **overrides)


def test_nominal_costs_are_the_papers_formula():
    """flops.md §6.2: 192 / 128 / 64 tokens + 60 text through 32 Vicuna-7B layers at 2 FLOPs per MAC
    cost 3.30 / 2.45 / 1.61 T, computed here from the per-layer formula, not from our code."""
    d, m, layers = 4096, 11008, 32

    def nominal(visual):
        n = visual + NOMINAL_TEXT_TOKENS
        return 2 * layers * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m) / 1e12

    for tokens, printed in ((192, 3.30), (128, 2.45), (64, 1.61)):
        counts = planned_counts(LLAVA_7B, "random", tokens)
        assert convention_tflops(LLAVA_7B, counts, "nominal") == pytest.approx(nominal(tokens), rel=1e-9)
        assert round(nominal(tokens), 2) == printed
    # so the paper's 1.5 is a rounded label: the nominal target 1.5 runs fewer than 64 tokens
    assert solve_tflops_budget(LLAVA_7B, "ficoco-v", TflopsTarget(1.5, "nominal")).tokens < 64


def test_exact_convention_is_the_per_sample_count_up_to_the_first_token():
    counts = planned_counts(LLAVA_7B, "ficoco-v", 128)
    cost = sample_cost(LLAVA_7B, counts, generated_tokens=40)
    expected = (cost["vision_flops"] + cost["projector_flops"] + cost["prefill_flops"]) / 1e12
    assert convention_tflops(LLAVA_7B, counts, "exact") == pytest.approx(expected, rel=1e-12)


def test_a_target_written_with_few_digits_is_met_by_a_cost_that_rounds_to_it():
    # sparsevlm-matched's dearest schedule (192) costs 3.296 nominal T: 3.3 as written is met ...
    solved = solve_tflops_budget(LLAVA_7B, "sparsevlm-matched", TflopsTarget(3.3, "nominal"))
    assert solved.tokens == 192 and solved.predicted_tflops < 3.3 and round(solved.predicted_tflops, 1) == 3.3
    # ... 3.30 is the same float, and 3.31 (half-unit 0.005) is not
    with pytest.raises(InfeasibleBudget, match=r"runs only at 64, 128, 192"):
        solve_tflops_budget(LLAVA_7B, "sparsevlm-matched", TflopsTarget(3.31, "nominal"))


# ---------------------------------------------------------------------------------------------
# labels


@pytest.mark.parametrize("tflops, convention, label", [
    (2.4, "exact", "t2.4"), (1.5, "nominal", "t1.5-nominal"), (3.0, "exact", "t3"), (0.00003, "exact", "t0.00003"),
    (15.4, "nominal", "t15.4-nominal"),
])
def test_labels_round_trip_as_path_parts(tflops, convention, label):
    target = TflopsTarget(tflops, convention)
    assert target.label == label and is_label(label) and tflops_target(label) == target
    assert "e" not in label.removesuffix("-nominal")


@pytest.mark.parametrize("written", ["t2.40", "t02.4", "t2.", "t3.0", "t00.5", "t2.4-Nominal"])
def test_a_label_is_written_one_way_only(written):
    """A target written otherwise than its label prints it would be a second key (path, table row) for one
    budget: refused."""
    assert not is_label(written) and tflops_target(written) is None


def test_labels_sort_token_budgets_then_per_image_counts_then_targets_then_adaptive_and_full():
    labels = ["full", "t1.5-nominal", "64", "n400", "adaptive", "t2.4", "192", "n600", "t2.4-nominal"]
    assert sorted(labels, key=sort_key) == ["192", "64", "n600", "n400", "t2.4", "t2.4-nominal", "t1.5-nominal",
                                            "adaptive", "full"]
    assert describe("t1.5-nominal") == "1.5 TFLOPs (nominal)" and describe("64") == "64"
    assert describe("n600") == "600 tokens an image"


def test_a_per_image_count_is_a_label_of_its_own():
    from ficoco.budget_labels import ImageTokens, image_tokens

    assert image_tokens("n600") == ImageTokens(600) and ImageTokens(600).label == "n600" and is_label("n600")
    assert image_tokens("600") is None and image_tokens("n0") is None and not is_label("n0")
    assert not is_label("n06") and tflops_target("n600") is None
    with pytest.raises(ValueError, match="image tokens 0: valid: an integer >= 1"):
        ImageTokens(0)


def test_a_job_accepts_a_label_other_than_its_budget_only_for_a_solved_target():
    assert run_label_problem(None, "64") is None and run_label_problem("64", "64") is None
    assert run_label_problem("t2.4", "102") is None
    assert "differs from --budget '64'" in run_label_problem("32", "64")
    assert "is a TFLOPs target" in run_label_problem("t2.4", "full")


@pytest.mark.parametrize("bad", [{"tflops": 2.4, "convention": "llm-viewer"}, {"tflops": 0}, {"tflops": -1},
                                 {"tflops": "2.4"}, {"tflops": 2.4, "tokens": 3}])
def test_a_malformed_target_is_refused_before_any_job(bad):
    with pytest.raises(ConfigError, match=r"budgets\[0\]"):
        validate({"models": ["llava-1.5-7b"], "methods": ["ficoco-v"], "budgets": [bad], "benchmarks": ["gqa"]})


# ---------------------------------------------------------------------------------------------
# the config and the grid


def paper_config(**changes) -> dict:
    config = {"models": ["llava-1.5-7b"], "methods": ["vanilla", "ficoco-v", "ficoco-l", "fastv"],
              "budgets": [{"tflops": 2.4, "convention": "nominal"}, 128], "benchmarks": ["gqa", "pope"]}
    return {**config, **changes}


def test_the_grid_runs_each_method_at_its_solved_budget():
    config = validate(paper_config())
    jobs = job_grid(config)
    targeted = [job for job in jobs if job.budget == "t2.4-nominal"]
    assert {job.method for job in targeted} == {"ficoco-v", "ficoco-l", "fastv"}
    for job in targeted:
        solved = solve_tflops_budget(LLAVA_7B, job.method, TflopsTarget(2.4, "nominal"))
        assert (job.run_budget, job.predicted_tflops) == (str(solved.tokens), solved.predicted_tflops)
    assert {(job.budget, job.run_budget) for job in jobs if job.method == "vanilla"} == {("full", "full")}
    assert {job.run_budget for job in jobs if job.budget == "128"} == {"128"}
    assert budgets_for(config, LLAVA_7B, "llava-1.5-7b") == ["t2.4-nominal", "128"]


def test_an_unreachable_target_names_the_method_the_model_and_the_reachable_range():
    with pytest.raises(ConfigError) as error:
        validate(paper_config(budgets=[{"tflops": 1.5, "convention": "nominal"}]))
    text = str(error.value)
    assert "budgets[0]" in text and "ficoco-l" in text and "llava-1.5-7b" in text
    assert "budgets 100..576 cost 2.083..8.45 TFLOPs (nominal, 60 text tokens)" in text


def test_per_budget_overrides_keyed_by_a_targets_label_apply_to_its_solve():
    """FiCoCo-L reaches 1.5 nominal T only from an earlier start layer (config/paper-tflops.yaml)."""
    config = validate(paper_config(budgets=[{"tflops": 1.5, "convention": "nominal"}],
                                   method_params={"ficoco-l": {"per_budget": {"t1.5-nominal": {"start": 2,
                                                                                                "window": 2}}}}))
    job = next(job for job in job_grid(config) if job.method == "ficoco-l")
    solved = solve_tflops_budget(LLAVA_7B, "ficoco-l", TflopsTarget(1.5, "nominal"), start=2, window=2)
    assert job.run_budget == str(solved.tokens) and abs(solved.predicted_tflops - 1.5) < 0.01
    with pytest.raises(ConfigError, match=r"per_budget\.t2\.4: 't2\.4' is not a budget of the grid; .*t1\.5-nominal"):
        validate(paper_config(budgets=[{"tflops": 1.5, "convention": "nominal"}],
                              method_params={"ficoco-l": {"per_budget": {"t2.4": {"start": 2}}}}))


def test_a_method_that_runs_only_at_fixed_budgets_takes_the_closest():
    config = validate(paper_config(methods=["sparsevlm"], budgets=[{"tflops": 2.6, "convention": "nominal"}]))
    (job,) = job_grid(config)[:1]
    assert job.run_budget == "128"          # 2.45 nominal T, against 3.49 for 192 and 1.85 for 64


def test_grid_prints_the_solved_budget_and_its_predicted_cost(tmp_path, capsys, monkeypatch):
    from ficoco.config import main

    monkeypatch.chdir(REPO_ROOT)
    path = tmp_path / "tflops.yaml"
    path.write_text(yaml.safe_dump(paper_config(benchmarks=["gqa"])))
    assert main(["--configfile", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    solved = solve_tflops_budget(LLAVA_7B, "fastv", TflopsTarget(2.4, "nominal"))
    line = next(line for line in lines if " fastv " in line and "bt2.4-nominal" in line)
    assert line.endswith(f"-> {solved.tokens} tokens, {solved.predicted_tflops:.4g} TFLOPs (nominal) predicted")
    assert main(["--configfile", str(path), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    record = next(r for r in records if r["method"] == "fastv" and r["budget"] == "t2.4-nominal")
    assert record["run_budget"] == str(solved.tokens)
    assert record["planned"]["layer_average"] == pytest.approx(
        methods.get("fastv").plan(LLAVA_7B, solved.tokens).layer_average)


def test_paper_tflops_config_is_the_paper_grid_with_costs_as_budgets():
    paper = yaml.safe_load((REPO_ROOT / "config/paper.yaml").read_text())
    tflops = yaml.safe_load((REPO_ROOT / "config/paper-tflops.yaml").read_text())
    assert tflops["models"] == ["llava-1.5-7b"]
    assert tflops["methods"] == [m for m in paper["methods"] if m not in ("sparsevlm", "sparsevlm-matched", "fitprune")]
    assert tflops["budgets"] == [{"tflops": t, "convention": "nominal"} for t in (3.3, 2.4, 1.5)]
    for key in set(paper) - {"models", "methods", "budgets", "method_params", "calibration", "grids"}:   # no fitprune; LLaVA-1.5 only
        assert tflops[key] == paper[key], key
    config = load_and_validate(REPO_ROOT / "config/paper-tflops.yaml", root=REPO_ROOT)
    assert {job.budget for job in job_grid(config, REPO_ROOT) if job.method == "ficoco-v"} == {
        "t3.3-nominal", "t2.4-nominal", "t1.5-nominal"}


# ---------------------------------------------------------------------------------------------
# the whole pipeline, on the toy world


@pytest.fixture(scope="module")
def tflops_run(tmp_path_factory):
    """vanilla, ficoco-v and fastv at one exact TFLOPs target (the cost of 72 tokens of ficoco-v, to two
    significant digits) on the small toy model, measured and reported."""
    repo = copy_workflow(tmp_path_factory.mktemp("tflops") / "repo")
    cost = convention_tflops(TOY_SMALL, planned_counts(TOY_SMALL, "ficoco-v", 72, TOY_TEXT,
                                                       **overrides_for(TOY_SMALL, "ficoco-v")), "exact")
    target = float(f"{cost:.2g}")
    config = write_toy_config(repo, "tflops", methods=["vanilla", "ficoco-v", "fastv"],
                              budgets=[{"tflops": target}], measure_methods=["vanilla", "ficoco-v"])
    result = snakemake(repo, "--cores", "2", "--configfile", config, env=pipeline_env())
    assert result.returncode == 0, result.stderr[-4000:]
    return repo, config, TflopsTarget(target)


def test_each_job_runs_and_records_its_solved_budget(tflops_run):
    repo, config, target = tflops_run
    planned = {(job["method"], job["budget"]): job for job in planned_jobs(repo, config)}
    for method in ("ficoco-v", "fastv"):
        job = planned[method, target.label]
        overrides = overrides_for(TOY_SMALL, method)
        solved = solve_tflops_budget(TOY_SMALL, method, target, TOY_TEXT, **overrides)
        assert job["run_budget"] == str(solved.tokens)
        run_dir = repo / f"results/runs/toy-llava/toy-shapes-mini/{method}/b{target.label}"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["job"]["budget"] == target.label
        assert metrics["job"]["run_budget"] == str(solved.tokens)
        assert metrics["job"]["predicted_tflops"] == pytest.approx(solved.predicted_tflops)
        plan = methods.get(method).plan(TOY_SMALL, solved.tokens, **overrides)
        for record in read_jsonl(run_dir / "shard0of1/predictions.jsonl"):
            assert record["counts"]["llm_visual"] == plan.llm_visual
            realised = (record["cost"]["total_flops"] - record["cost"]["decode_flops"]) / 1e12
            # the same counts as the prediction, with this sample's own text length instead of 60
            text = record["counts"]["llm"][0] - record["counts"]["llm_visual"][0]
            expected = convention_tflops(TOY_SMALL, planned_counts(TOY_SMALL, method, solved.tokens, text, **overrides),
                                         "exact")
            assert realised == pytest.approx(expected, rel=1e-9)
    measured = json.loads((repo / f"results/measure/toy-llava/ficoco-v/b{target.label}.json").read_text())
    assert measured["job"]["budget"] == target.label
    assert measured["job"]["run_budget"] == str(solve_tflops_budget(TOY_SMALL, "ficoco-v", target, TOY_TEXT,
                                                                    **overrides_for(TOY_SMALL, "ficoco-v")).tokens)


def test_the_report_shows_the_target_the_solved_budget_and_the_realised_cost(tflops_run):
    import pandas as pd

    repo, _, target = tflops_run
    results = pd.read_csv(repo / "results/summary/results.csv")
    headline = results[results["headline"] & (results["budget"] == target.label)]
    assert set(headline["method"]) == {"ficoco-v", "fastv"}
    for row in headline.itertuples():
        assert row.budget_tokens == solve_tflops_budget(TOY_SMALL, row.method, target, TOY_TEXT,
                                                        **overrides_for(TOY_SMALL, row.method)).tokens
        assert math.isclose(row.tflops_first_token, row.tflops_exact - row.tflops_decode, rel_tol=1e-9)
        # the toy prompts are 10 to 12 text tokens and the model's registry assumes 11
        assert row.tflops_first_token == pytest.approx(row.predicted_tflops, rel=0.03)
    measure = pd.read_csv(repo / "results/summary/measure.csv")
    assert set(measure["budget"]) == {"full", target.label}
    page = (repo / "report/report.html").read_text()
    assert f"budget {describe(target.label)}" in page
    assert "the token budget it was solved into" in page and "_realised" in page

"""Confidence intervals, findings and readable figures of the report, against independent computations:
a slow resampling loop, a normal approximation, a brute-force Pareto check, label boxes as rendered."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from report_fixtures import SCORES, write_results_tree

from ficoco import cli
from ficoco.report import findings, intervals, page, paper, plots, tables
from ficoco.report.aggregate import build_summary, find_measure_files, find_metrics_files

MODEL = "llava-1.5-7b"


def samples_frame(scores_by_job: dict[tuple[str, str], list[float]], benchmark: str = "gqa",
                  model: str = "toy") -> pd.DataFrame:
    rows = [{"model": model, "method": method, "budget": budget, "benchmark": benchmark, "id": f"s{i:04d}",
             "score": score} for (method, budget), scores in scores_by_job.items() for i, score in enumerate(scores)]
    return pd.DataFrame(rows)


def headline_frame(samples: pd.DataFrame) -> pd.DataFrame:
    """Each job's headline: the mean per-sample score x 100 over the samples that have a score."""
    grouped = samples.groupby(["model", "method", "budget", "benchmark"], as_index=False)["score"].mean()
    return grouped.assign(value=100.0 * grouped["score"]).drop(columns="score")


# ---------------------------------------------------------------------------------------------- bootstrap


def test_replicates_equal_a_slow_resampling_loop_with_failures_left_out():
    generator = np.random.default_rng(3)
    scores = generator.integers(0, 2, 60).astype(float)
    scores[[4, 17]] = np.nan                                       # failed samples: not in the headline
    samples = samples_frame({("fastv", "64"): list(scores)})
    boot = intervals.bootstrap(samples, headline_frame(samples), replicates=50, seed=11)
    counts = intervals.resample_counts("toy", "gqa", 60, 50, 11)
    ids = sorted(samples["id"])
    by_id = dict(zip(samples["id"], samples["score"]))
    for replicate in range(50):
        drawn = [ids[i] for i in range(60) for _ in range(counts[replicate, i])]
        assert len(drawn) == 60
        kept = [by_id[i] for i in drawn if not math.isnan(by_id[i])]
        expected = 100.0 * sum(kept) / len(kept)
        assert boot.job("toy", "fastv", "64", "gqa")[replicate] == pytest.approx(expected, abs=1e-9)


def test_interval_of_a_proportion_matches_the_normal_approximation():
    correct = 280                                                  # 70 % of 400
    samples = samples_frame({("vanilla", "full"): [1.0] * correct + [0.0] * (400 - correct)})
    boot = intervals.bootstrap(samples, headline_frame(samples), replicates=4000, seed=0)
    low, high = boot.interval(boot.job("toy", "vanilla", "full", "gqa"))
    half_width = 1.96 * 100.0 * math.sqrt(0.7 * 0.3 / 400)
    assert low == pytest.approx(70.0 - half_width, abs=0.6)
    assert high == pytest.approx(70.0 + half_width, abs=0.6)


def test_every_method_is_scored_on_the_same_resamples_so_differences_are_paired():
    generator = np.random.default_rng(5)
    base = generator.integers(0, 2, 300).astype(float)
    changed = base.copy()
    changed[:6] = 1.0 - changed[:6]                                # differs on 6 of 300 samples
    samples = samples_frame({("vanilla", "full"): list(base), ("a", "64"): list(base), ("b", "64"): list(changed)})
    boot = intervals.bootstrap(samples, headline_frame(samples), replicates=500)
    same = intervals.paired_difference(boot.job("toy", "a", "64", "gqa"), boot.job("toy", "vanilla", "full", "gqa"))
    assert same == (0.0, 0.0)                                      # identical predictions: no difference at all
    paired = intervals.paired_difference(boot.job("toy", "b", "64", "gqa"), boot.job("toy", "a", "64", "gqa"))
    differences = changed - base                                   # the normal approximation of the paired difference
    expected_width = 2 * 1.96 * 100.0 * differences.std() / math.sqrt(300)
    assert paired[1] - paired[0] == pytest.approx(expected_width, rel=0.35)
    widths = [np.subtract(*boot.interval(boot.job("toy", m, "64", "gqa"))[::-1]) for m in ("a", "b")]
    assert paired[1] - paired[0] < 0.3 * math.hypot(*widths)       # unpaired: far wider
    reseeded = intervals.bootstrap(samples, headline_frame(samples), replicates=500, seed=1)
    assert not np.array_equal(reseeded.job("toy", "a", "64", "gqa"), boot.job("toy", "a", "64", "gqa"))


def test_a_headline_that_is_not_the_mean_per_sample_score_gets_no_interval():
    samples = samples_frame({("vanilla", "full"): [1.0, 0.0, 1.0, 1.0], ("fastv", "64"): [1.0, 0.0, 0.0, 1.0]})
    headline = headline_frame(samples)
    headline.loc[headline["method"] == "fastv", "value"] = 66.7    # e.g. POPE's F1, not the mean (50.0)
    boot = intervals.bootstrap(samples, headline, replicates=20)
    assert boot.job("toy", "fastv", "64", "gqa") is None
    assert boot.job("toy", "vanilla", "full", "gqa") is not None
    reason = boot.skipped.set_index("method").loc["fastv", "reason"]
    assert "66.7" in reason and "50" in reason


def pope_samples(method: str, predictions: list[str], truths: list[str], categories: list[str]) -> pd.DataFrame:
    """Per-sample rows of a POPE job, scored by the real POPE benchmark (its scoring dicts included)."""
    import json

    from ficoco import benchmarks

    pope = benchmarks.get("pope")
    rows = []
    for i, (prediction, truth, category) in enumerate(zip(predictions, truths, categories)):
        row = {"id": f"p{i:03d}", "question": "Is there a dog in the image?", "answers": [truth], "choices": [],
               "meta": json.dumps({"category": category})}
        scoring = pope.score_sample(prediction, row)
        rows.append({"model": "m", "method": method, "budget": "64", "benchmark": "pope", "id": row["id"],
                     "score": scoring["score"], "error": None, "scoring": json.dumps(scoring)})
    return pd.DataFrame(rows)


def test_a_headline_that_is_not_a_mean_is_recomputed_by_the_benchmarks_own_aggregate_on_the_same_resamples():
    import json

    from ficoco import benchmarks

    generator = np.random.default_rng(9)
    n = 90
    truths = list(generator.choice(["yes", "no"], n))
    categories = [("adversarial", "popular", "random")[i % 3] for i in range(n)]
    jobs = {method: [t if generator.random() < accuracy else ("no" if t == "yes" else "yes") for t in truths]
            for method, accuracy in (("vanilla", 0.9), ("fastv", 0.7))}
    samples = pd.concat([pope_samples(m, p, truths, categories) for m, p in jobs.items()], ignore_index=True)
    pope = benchmarks.get("pope")
    records = {m: [{"score": r.score, "scoring": json.loads(r.scoring), "error": None}
                   for r in samples[samples["method"] == m].itertuples()] for m in jobs}
    headline = pd.DataFrame([{"model": "m", "method": m, "budget": "64", "benchmark": "pope",
                              "value": pope.aggregate(records[m])["score"], "benchmark_module": "pope"} for m in jobs])
    assert headline["value"].iloc[1] != 100 * np.mean([r["score"] for r in records["fastv"]])   # F1, not a mean
    boot = intervals.bootstrap(samples, headline, replicates=300, benchmark_replicates=40, seed=3)
    assert boot.paths[("m", "fastv", "64", "pope")] == "benchmark"
    replicated = boot.job("m", "fastv", "64", "pope")
    assert len(replicated) == 40
    counts = intervals.resample_counts("m", "pope", n, 40, 3)         # the same resamples, drawn again
    for replicate in (0, 17, 39):
        resampled = [records["fastv"][i] for i in range(n) for _ in range(counts[replicate, i])]
        assert replicated[replicate] == pytest.approx(pope.aggregate(resampled)["score"], abs=1e-9)
    low, high = intervals.paired_difference(replicated, boot.job("m", "vanilla", "64", "pope"))
    assert low < headline["value"].iloc[1] - headline["value"].iloc[0] < high


def test_a_benchmark_that_judges_samples_together_is_resampled_by_whole_groups():
    """MMBench counts a question right only if every circular variant is. A method right on every base question
    and wrong on every rotation scores 0; a resample of single variants would often draw a base row without its
    rotation and count it right. Drawn by whole groups, every replicate is 0, and a group's variants always
    share their multiplicity. (An error makes one variant unscored: its group is left out, in every replicate.)"""
    import json

    from ficoco import benchmarks
    from test_benchmarks_scoring import mmbench_row

    mmbench, groups = benchmarks.get("mmbench"), 40
    rows = []
    for method, rotation_answer in (("vanilla", "A"), ("fastv", "B")):     # fastv: every rotation wrong
        for group in range(groups):
            for index, answer, prediction in ((group, "B", "B"), (1_000_000 + group, "A", rotation_answer)):
                scoring = mmbench.score_sample(prediction, mmbench_row(index, answer, "x"))
                rows.append({"model": "m", "method": method, "budget": "64", "benchmark": "mmbench", "id": str(index),
                             "score": scoring["score"], "error": None, "scoring": json.dumps(scoring)})
    samples = pd.DataFrame(rows)
    headline = pd.DataFrame([{"model": "m", "method": m, "budget": "64", "benchmark": "mmbench", "value": value,
                              "benchmark_module": "mmbench"} for m, value in (("vanilla", 100.0), ("fastv", 0.0))])
    boot = intervals.bootstrap(samples, headline, replicates=50, benchmark_replicates=50, seed=1)
    assert boot.paths[("m", "fastv", "64", "mmbench")] == "benchmark"
    assert np.all(boot.job("m", "fastv", "64", "mmbench") == 0.0)
    assert np.all(boot.job("m", "vanilla", "64", "mmbench") == 100.0)
    ids = np.sort(samples["id"].unique())
    units = intervals.resampling_units("mmbench", ids)
    position = {sample_id: index for index, sample_id in enumerate(ids)}
    assert len(set(units)) == groups
    assert all(units[position[str(g)]] == units[position[str(1_000_000 + g)]] for g in range(groups))
    assert list(intervals.resampling_units("pope", ids)) == list(range(len(ids)))   # POPE: every sample alone


def test_without_a_benchmark_module_a_non_mean_headline_gets_no_interval_and_says_why():
    samples = pope_samples("fastv", ["yes", "no", "no", "yes"], ["yes", "yes", "no", "no"], ["random"] * 4)
    headline = pd.DataFrame([{"model": "m", "method": "fastv", "budget": "64", "benchmark": "pope", "value": 50.0,
                              "benchmark_module": None}])
    headline.loc[0, "value"] = 40.0
    boot = intervals.bootstrap(samples, headline, replicates=20)
    assert boot.job("m", "fastv", "64", "pope") is None
    assert "rerun its score job" in boot.skipped["reason"].iloc[0]


@pytest.mark.parametrize("replicates, level", [(0, 0.95), (10, 1.5)])
def test_bad_bootstrap_settings_are_refused_naming_the_value(replicates, level):
    samples = samples_frame({("vanilla", "full"): [1.0, 0.0]})
    with pytest.raises(ValueError, match=str(replicates if replicates == 0 else level)):
        intervals.bootstrap(samples, headline_frame(samples), replicates=replicates, level=level)


# ---------------------------------------------------------------------------------------------- findings


def test_pareto_mask_equals_a_brute_force_dominance_check():
    generator = np.random.default_rng(7)
    for _ in range(20):
        cost = generator.integers(0, 8, 15).astype(float)
        accuracy = generator.integers(0, 8, 15).astype(float)
        dominated = [any(cost[j] <= cost[i] and accuracy[j] >= accuracy[i]
                         and (cost[j] < cost[i] or accuracy[j] > accuracy[i]) for j in range(15)) for i in range(15)]
        mask = findings.pareto_mask(cost, accuracy)
        for i in range(15):
            duplicate_of_kept = any(mask[j] and cost[j] == cost[i] and accuracy[j] == accuracy[i] for j in range(15))
            assert mask[i] == (not dominated[i] and not (duplicate_of_kept and not mask[i]))
            if not dominated[i]:                                   # one of equal points is kept
                assert duplicate_of_kept or mask[i]


@pytest.fixture(scope="module")
def fixture_tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("findings")
    results = write_results_tree(root / "results")
    summary = build_summary(find_metrics_files(results), find_measure_files(results))
    boot = intervals.bootstrap(summary.samples, tables.headline_scores(summary.results), replicates=300)
    frame = tables.paper_tables(summary.results, paper.paper_reference(paper.load_paper_results()), boot)
    return summary, boot, frame


def test_table_intervals_are_those_of_the_jobs_and_of_their_paired_averages(fixture_tables):
    summary, boot, frame = fixture_tables
    cells = frame.set_index(["table_budget", "method", "column"])
    score = cells.loc[("192", "fastv", "pope")]
    assert (score["low"], score["high"]) == boot.interval(boot.job(MODEL, "fastv", "192", "pope"))
    assert score["low"] < SCORES[MODEL]["fastv"][192]["pope"] < score["high"]
    benchmarks = ["scienceqa", "textvqa", "pope"]                     # MME (points) is not in Avg
    average = np.mean([boot.job(MODEL, "fastv", "192", b) for b in benchmarks], axis=0)
    base = np.mean([boot.job(MODEL, "vanilla", "full", b) for b in benchmarks], axis=0)
    avg_percent = cells.loc[("192", "fastv", "Avg%")]
    assert (avg_percent["low"], avg_percent["high"]) == pytest.approx(boot.interval(100 * average / base))
    assert np.isnan(cells.loc[("192", "fastv", "TFLOPs exact"), "low"])


def test_findings_name_the_best_method_and_pair_ficoco_with_the_best_baseline(fixture_tables):
    _, boot, frame = fixture_tables
    best = findings.best_per_budget(frame, boot).set_index("budget")
    assert best.loc["192", "best"] == "ficoco-l"                   # highest Avg at 192 in the fixture
    versus = findings.ficoco_against_best_baseline(frame, boot).set_index(["budget", "FiCoCo"])
    row = versus.loc[("192", "ficoco-v")]
    assert row["best baseline"] == "fastv"
    expected = np.mean([SCORES[MODEL]["ficoco-v"][192][b] - SCORES[MODEL]["fastv"][192][b]
                        for b in ("scienceqa", "textvqa", "pope")])             # MME (points): not in Avg
    assert row["difference"] == pytest.approx(expected)
    assert row["low"] <= row["difference"] <= row["high"]
    assert row["verdict"] == ("ahead" if row["low"] > 0 else "behind" if row["high"] < 0 else "within noise")


def test_frontier_points_are_the_undominated_runs(fixture_tables):
    _, _, frame = fixture_tables
    points = findings.accuracy_points(frame)
    assert set(points["measure"]) == {"Avg%"}
    for row in points.itertuples():
        others = points.drop(index=row.Index)
        dominated = ((others["tflops"] <= row.tflops) & (others["accuracy"] >= row.accuracy)
                     & ((others["tflops"] < row.tflops) | (others["accuracy"] > row.accuracy))).any()
        assert row.on_frontier == (not dominated)


def test_paper_differences_are_the_paper_numbers_outside_our_interval():
    """Judged: the paper's rows at our setting (vanilla, FiCoCo-V) on locally scored benchmarks. Its copied baseline
    rows, its in-LLM methods (labels that are not layer averages) and the server-scored VQAv2 are not counted."""
    methods = ["vanilla", "ficoco-v", "ficoco-v", "fastv", "ficoco-l", "ficoco-v"]
    columns = ["gqa", "gqa", "pope", "gqa", "gqa", "vqav2"]
    tables_frame = pd.DataFrame({
        "model": ["m"] * 6, "method": methods, "budget": ["64"] * 6, "column": columns, "kind": ["score"] * 6,
        "ours": [60.0] * 6, "low": [58.0, 58.0, np.nan, 58.0, 58.0, 58.0], "high": [62.0, 62.0, np.nan, 62.0, 62.0, 62.0],
        "paper": [61.0, 57.0, 50.0, 50.0, 50.0, 50.0], "delta": [-1.0, 3.0, 10.0, 10.0, 10.0, 10.0]})
    outside, compared = findings.paper_differences(tables_frame)
    assert compared == 2 and outside[["method", "benchmark"]].values.tolist() == [["ficoco-v", "gqa"]]


def test_the_page_states_findings_with_intervals(tmp_path, capsys):
    results = write_results_tree(tmp_path / "results")
    assert cli.main(["aggregate", "--results", str(results), "--out", str(results / "summary")]) == 0
    out = tmp_path / "report.html"
    assert cli.main(["report", "--summary", str(results / "summary"), "--out", str(out), "--replicates", "200"]) == 0
    text = out.read_text(encoding="utf-8")
    for anchor in ("findings-frontier", "findings-best", "findings-ficoco", "findings-paper", "findings-failures"):
        assert f'id="{anchor}"' in text
    assert "ficoco-v against fastv" in text and "points of Avg" in text
    assert text.count('class="ci"') > 20                          # every score / Avg / Avg% cell with a job behind it
    with pytest.raises(SystemExit) as refused:
        cli.main(["report", "--summary", str(results / "summary"), "--out", str(out), "--replicates", "0"])
    assert refused.value.code == 2 and "'0' is not a positive integer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- units and figures


def test_tables_of_a_toy_sized_model_print_mflops_not_zero():
    frame = pd.DataFrame({"model": ["toy"], "method": ["fastv"], "phase": ["llm"], "budget": ["36"],
                          "benchmark": ["toy-shapes"], "metric": ["score"], "value": [60.0], "samples": [256],
                          "failures": [0], "tflops_exact": [4.8e-5], "tflops_overhead": [2e-7], "tflops_legacy": [6.1e-5],
                          "visual_tokens_layer_avg": [36.0], "headline": [True]})
    text = page.data_section(frame)
    assert "MFLOPs_exact" in text and "48.000" in text and "TFLOPs_exact" not in text
    assert "MFLOPs_overhead" in text and "0.200" in text


def many_methods_points(count: int = 25) -> pd.DataFrame:
    """25 methods at 4 budgets whose accuracies crowd into a few points of each other."""
    rows = [{"model": "toy", "method": "vanilla", "budget": "full", "tflops": 1.4e-4, "accuracy": 100.0,
             "low": 100.0, "high": 100.0, "measure": "Avg%", "on_frontier": True}]
    for index in range(count - 1):
        name = f"ficoco-variant-{index}" if index % 8 == 0 else f"baseline-method-{index}"
        for budget, cost in (("192", 9e-5), ("128", 7e-5), ("64", 5e-5), ("32", 4e-5)):
            accuracy = 90.0 - index * 0.1 - (9e-5 - cost) * 1e5
            rows.append({"model": "toy", "method": name, "budget": budget, "tflops": cost + index * 1e-7,
                         "accuracy": accuracy, "low": accuracy - 2, "high": accuracy + 2, "measure": "Avg%",
                         "on_frontier": index == 0})
    return pd.DataFrame(rows)


def test_direct_labels_of_25_crowded_methods_do_not_overlap():
    points = many_methods_points()
    phases = {method: ("vision", "llm", "projector")[i % 3] for i, method in enumerate(points["method"].unique())}
    figure = plots.accuracy_vs_flops(points, plots.paper_points(pd.DataFrame()), phases)
    labels = [text for text in figure.axes[0].texts if text.get_gid() == plots.LABEL_GID]
    assert len(labels) == 25
    assert plots.label_overlaps(figure) == []
    colours = {text.get_text(): text.get_color() for text in labels}
    assert colours["ficoco-variant-0"] == plots.FAMILY_COLOURS["FiCoCo"]
    assert colours["baseline-method-1"] == plots.FAMILY_COLOURS["baseline"]


def test_the_overlap_check_sees_overlapping_labels():
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots()
    for _ in range(2):
        axis.annotate("same place", xy=(0.5, 0.5), xytext=(1.02, 0.5), textcoords="axes fraction", gid=plots.LABEL_GID)
    assert plots.label_overlaps(figure) == [("same place", "same place")]
    plt.close(figure)


def test_spread_keeps_the_pitch_and_stays_inside_when_it_fits():
    generator = np.random.default_rng(2)
    desired = list(generator.uniform(0.4, 0.6, 30))
    placed = plots.spread(desired, 0.03, 0.0, 1.0)
    ordered = sorted(zip(desired, range(30), placed))
    gaps = np.diff([p for _, _, p in ordered])
    assert (gaps >= 0.03 - 1e-12).all()                           # order kept, never closer than the pitch
    assert min(placed) >= 0.0 and max(placed) <= 1.0


def test_a_difference_from_the_paper_carries_our_interval_shifted_by_the_paper_number(fixture_tables):
    _, boot, frame = fixture_tables
    table = frame[(frame["table_budget"] == "192")]
    cell = table[(table["method"] == "fastv") & (table["column"] == "scienceqa")].iloc[0]
    assert cell["paper"] == 67.3                                   # FastV at 3.3T, SQA, in the paper
    low, high = boot.interval(boot.job(MODEL, "fastv", "192", "scienceqa"))
    text = page.paper_table_html(table)
    assert f"[{low:.1f}, {high:.1f}]" in text
    assert f"[{low - 67.3:.1f}, {high - 67.3:.1f}]" in text


def test_a_row_missing_a_benchmark_gets_no_avg_and_is_not_ranked(tmp_path):
    """FastV's TextVQA job failed on every sample (no headline): its mean over the two benchmarks left would
    rank it above FiCoCo-V, which is ahead on every benchmark both scored. Its Avg is empty instead, so the bold
    mark and the best method per budget go to FiCoCo-V; the pairwise comparison still uses the shared two."""
    from report_fixtures import metrics_json, write_run

    scores = {("vanilla", "full"): (60.0, 58.0, 86.0), ("fastv", 64): (55.0, None, 80.0),
              ("ficoco-v", 64): (56.0, 52.0, 81.0)}
    runs = [write_run(tmp_path, metrics_json("llava-1.5-7b", benchmark, method, budget, score))
            for (method, budget), values in scores.items()
            for benchmark, score in zip(("gqa", "textvqa", "pope"), values)]
    results = build_summary(runs, []).results
    frame = tables.paper_tables(results, paper.paper_reference(paper.load_paper_results()))
    cells = frame.set_index(["method", "column"])
    assert math.isnan(cells.loc[("fastv", "Avg"), "ours"]) and math.isnan(cells.loc[("fastv", "Avg%"), "ours"])
    assert cells.loc[("ficoco-v", "Avg"), "ours"] == pytest.approx((56 + 52 + 81) / 3)
    assert cells.loc[("ficoco-v", "Avg"), "best"] and not cells.loc[("fastv", "Avg"), "best"]
    boot = tables.no_bootstrap()
    assert findings.best_per_budget(frame, boot)["best"].tolist() == ["ficoco-v"]
    compared = findings.comparison(frame, boot, ("ficoco-v", "64"), ("fastv", "64"))
    assert compared["benchmarks"] == 2 and compared["difference"] == pytest.approx(1.0)


def test_scores_of_other_samples_get_no_avg_and_no_paper_number(tmp_path):
    """FastV failed 5 samples of GQA that vanilla scored: its GQA score is over other samples, so it has no Avg and
    is named as not ranked, never the best because its hard samples failed. A job on a benchmark's first rows only
    (`limit`) gets no paper number: it is not the paper's benchmark."""
    from report_fixtures import metrics_json, write_run

    runs = []
    for method, budget, score_gqa, failures, limit in (("vanilla", "full", 62.0, 0, None), ("fastv", 192, 70.0, 5, None),
                                                        ("ficoco-v", 192, 60.0, 0, None), ("ficoco-l", 192, 59.0, 0, 8)):
        for benchmark, score in (("gqa", score_gqa), ("pope", 85.0)):
            data = metrics_json(MODEL, benchmark, method, budget, score)
            data["failures"] = failures if benchmark == "gqa" else 0
            data["job"]["limit"] = limit
            runs.append(write_run(tmp_path, data))
    summary = build_summary(runs, [])
    frame = tables.paper_tables(summary.results, paper.paper_reference(paper.load_paper_results()))
    cells = frame.set_index(["table_budget", "method", "column"])
    assert math.isnan(cells.loc[("192", "fastv", "Avg"), "ours"]) and cells.loc[("192", "fastv", "gqa"), "ours"] == 70
    assert cells.loc[("192", "ficoco-v", "Avg"), "ours"] == pytest.approx((60 + 85) / 2)
    assert cells.loc[("192", "ficoco-v", "gqa"), "paper"] == 58.5 and cells.loc[("192", "fastv", "gqa"), "paper"] == 52.7
    assert math.isnan(cells.loc[("192", "ficoco-l", "gqa"), "paper"])                  # its first 8 rows only
    best = findings.best_per_budget(frame, intervals.Bootstrap(replicates={}, skipped=pd.DataFrame()))
    row = best.set_index("budget").loc["192"]
    assert row["best"] == "ficoco-v" and row["not ranked (no Avg)"] == "fastv"

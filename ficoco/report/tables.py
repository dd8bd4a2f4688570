"""Paper-style tables: per model and budget, methods x benchmarks (headline score), Avg and Avg%.

Everything is returned as one long frame (one row per table cell), which the page renders and
which is also written as paper_tables.csv:

    model, table_budget, method, budget, reference, column, kind, ours, paper, paper_version, delta, best

- `table_budget`: the budget of the table; `budget`: the row's own budget (the vanilla reference
  row of every table has budget "full").
- `column`: a benchmark id, "Avg", "Avg%", or a cost column ("visual tokens", "TFLOPs exact",
  "TFLOPs overhead", "TFLOPs legacy"); `kind` is "score", "average" or "cost".
- Avg = mean of the row's scores over the table's benchmarks whose headline is a percentage (`in_avg`;
  MME's points are shown, not averaged), NaN when the row lacks one of them (a failed job, or one not
  run): rows are ranked by Avg, and an average over fewer benchmarks is not comparable. Avg% = 100 x Avg /
  (vanilla's mean over the same benchmarks), NaN without a vanilla run of that model. The paper's Avg and
  Avg% are computed over the same benchmarks from its per-benchmark numbers (NaN if it lacks one).
- `best`: the highest displayed value of a score / average column among the reduced rows.
- `low`, `high`: the bootstrap interval of a score / Avg / Avg% cell (intervals.py: paired over
  methods, Avg% paired with vanilla); NaN where the job has none.
"""
from __future__ import annotations

import math

import pandas as pd

from ficoco import benchmarks as benchmark_registry
from ficoco.budget_labels import FULL, is_token_budget, sort_key
from ficoco.report.intervals import JOB, Bootstrap, ratio_percent
from ficoco.report.paper import (PAPER_BENCHMARKS, name_key, paper_averages, paper_method, printed_tflops,
                                 with_paper_values)

VANILLA = "vanilla"
AVG, AVG_PCT = "Avg", "Avg%"
COST_COLUMNS = {  # table column -> tidy column (mean over the row's benchmarks)
    "visual tokens": "visual_tokens_layer_avg",
    "TFLOPs exact": "tflops_exact",
    "TFLOPs overhead": "tflops_overhead",
    "TFLOPs legacy": "tflops_legacy",
}
DISPLAY_DECIMALS = 1
TABLE_COLUMNS = ["model", "table_budget", "method", "budget", "reference", "column", "kind", "in_avg",
                 "ours", "low", "high", "paper", "paper_version", "delta", "best"]


def averaged(benchmark: str, module=None) -> bool:
    """Whether a benchmark's headline joins the averages over benchmarks (Avg, Avg%): only a percentage does
    (`Benchmark.headline_percent`); MME's points, up to 2,800, would outweigh every other benchmark. Looked up by
    the job's `benchmark_module`, else its benchmark id; a name no benchmark is registered under is a percentage."""
    name = module if isinstance(module, str) else benchmark
    return name not in benchmark_registry.names() or benchmark_registry.get(name).headline_percent


def averaged_jobs(rows: pd.DataFrame) -> pd.Series:
    """`averaged` of each row of a tidy results frame (benchmark, benchmark_module)."""
    modules = rows["benchmark_module"] if "benchmark_module" in rows else pd.Series(None, index=rows.index)
    return pd.Series([averaged(b, m) for b, m in zip(rows["benchmark"], modules)], index=rows.index, dtype=bool)


def is_vanilla(method: str) -> bool:
    return name_key(method) == VANILLA


def job_label(method: str, budget: str) -> str:
    """How the page names one run: `fastv b64`, `vanilla` (its one full run), `fastv full`,
    `prumerge-adaptive adaptive`."""
    if is_vanilla(method) and budget == FULL:
        return str(method)
    return f"{method} b{budget}" if is_token_budget(budget) else f"{method} {budget}"


def headline_scores(results: pd.DataFrame) -> pd.DataFrame:
    """One row per job (its headline metric), with every tidy column."""
    return results[results["headline"].fillna(False).astype(bool)].reset_index(drop=True)


def ordered_benchmarks(benchmarks) -> list[str]:
    """The paper's column order first, then any other benchmark alphabetically."""
    paper_order = list(PAPER_BENCHMARKS)
    known = sorted((b for b in benchmarks if b.lower().replace("-", "_") in paper_order),
                   key=lambda b: paper_order.index(b.lower().replace("-", "_")))
    return known + sorted(b for b in benchmarks if b not in known)


def ordered_methods(methods) -> list[str]:
    """Vanilla first, baselines alphabetically, then the FiCoCo family (as the paper prints them)."""
    def rank(method: str) -> tuple:
        return (0 if is_vanilla(method) else 2 if name_key(method).startswith("ficoco") else 1, method)

    return sorted(set(methods), key=rank)


def ordered_budgets(budgets) -> list[str]:
    """Token budgets largest first, then TFLOPs targets largest first, then "adaptive", "full" last."""
    return sorted(set(budgets), key=sort_key)


def table_budgets(model_rows: pd.DataFrame) -> list[str]:
    """The budgets of the reduced runs ("full" only when a method other than vanilla ran unreduced);
    a model with vanilla runs only gets one "full" table."""
    reduced = model_rows.loc[~model_rows["method"].map(is_vanilla), "budget"]
    return ordered_budgets(reduced.unique()) if len(reduced) else [FULL]


def paper_tables(results: pd.DataFrame, reference: pd.DataFrame, boot: Bootstrap | None = None) -> pd.DataFrame:
    headline = headline_scores(results)
    boot = boot or no_bootstrap()
    frames = [model_tables(headline[headline["model"] == model], reference, boot)
              for model in sorted(headline["model"].unique())]
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    return pd.concat(frames, ignore_index=True)[TABLE_COLUMNS]


def no_bootstrap() -> Bootstrap:
    """A Bootstrap without replicates: every interval is NaN."""
    return Bootstrap(replicates={}, skipped=pd.DataFrame(columns=[*JOB, "reason"]))


def model_tables(model_rows: pd.DataFrame, reference: pd.DataFrame, boot: Bootstrap) -> pd.DataFrame:
    benchmarks = ordered_benchmarks(model_rows["benchmark"].unique())
    has_vanilla = bool(((model_rows["budget"] == FULL) & model_rows["method"].map(is_vanilla)).any())
    vanilla_name = model_rows.loc[model_rows["method"].map(is_vanilla), "method"].iloc[0] if has_vanilla else None
    frames = []
    for budget in table_budgets(model_rows):
        methods = [m for m in ordered_methods(model_rows.loc[model_rows["budget"] == budget, "method"])
                   if not is_vanilla(m)]
        entries = ([(vanilla_name, FULL, True)] if has_vanilla else []) + [(m, budget, False) for m in methods]
        frames.append(one_table(model_rows, reference, budget, entries, benchmarks, boot))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TABLE_COLUMNS)


def one_table(model_rows: pd.DataFrame, reference: pd.DataFrame, table_budget: str,
              entries: list[tuple[str, str, bool]], benchmarks: list[str], boot: Bootstrap) -> pd.DataFrame:
    model = model_rows["model"].iloc[0]
    cells = pd.DataFrame([
        {"model": model, "table_budget": table_budget, "method": method, "budget": budget,
         "reference": reference_row, "benchmark": benchmark}
        for method, budget, reference_row in entries for benchmark in benchmarks
    ])
    scores = model_rows[["method", "budget", "benchmark", "value", "failures", "rows_limit", "fallback_data"]]
    cells = cells.merge(scores.rename(columns={"value": "ours"}), on=["method", "budget", "benchmark"], how="left",
                        validate="many_to_one")
    cells = with_paper_values(cells, reference).rename(columns={"paper_value": "paper"})
    # a score of a benchmark's first rows only, or of its fallback's data, is not of the paper's benchmark
    not_pinned = cells["rows_limit"].notna() | cells["fallback_data"].notna()
    cells.loc[not_pinned, "paper"] = math.nan
    cells.loc[not_pinned, "paper_version"] = pd.NA
    cells["same_samples"] = same_samples(cells, cells[cells["reference"]])         # else out of its Avg
    in_avg = model_rows.assign(in_avg=averaged_jobs(model_rows)).groupby("benchmark")["in_avg"].all()
    cells = cells.assign(in_avg=cells["benchmark"].map(in_avg).fillna(True).astype(bool))
    score_cells = cells.assign(column=cells["benchmark"], kind="score")
    bounds = [boot.interval(boot.job(model, method, budget, benchmark))
              for method, budget, benchmark in zip(cells["method"], cells["budget"], cells["benchmark"])]
    score_cells = score_cells.assign(low=[low for low, _ in bounds], high=[high for _, high in bounds])
    averages = average_cells(cells, boot)
    costs = cost_cells(model_rows, reference, table_budget, entries)
    table = pd.concat([score_cells, averages, costs], ignore_index=True)
    table["delta"] = table["ours"] - table["paper"]
    table["best"] = best_marks(table)
    return table[TABLE_COLUMNS]


def same_samples(rows: pd.DataFrame, vanilla: pd.DataFrame) -> pd.Series:
    """Per row (benchmark, failures): whether its job failed as many samples as `vanilla`'s run of that benchmark
    (bad rows fail alike for every method); other failures mean its score is over other samples. True where
    there is no vanilla run."""
    if vanilla.empty:
        return pd.Series(True, index=rows.index)
    base = rows["benchmark"].map(vanilla.set_index("benchmark")["failures"])
    return rows["failures"].fillna(0) == base.fillna(0)


def average_cells(cells: pd.DataFrame, boot: Bootstrap) -> pd.DataFrame:
    vanilla = cells[cells["reference"]].set_index("benchmark")
    vanilla_job = (vanilla["method"].iloc[0], vanilla["budget"].iloc[0]) if len(vanilla) else None
    averaged = set(cells.loc[cells["in_avg"], "benchmark"])                 # the table's averaged benchmarks
    rows = []
    for (method, budget), row in cells.groupby(["method", "budget"], sort=False):
        first = row.iloc[0]
        scored = row[row["ours"].notna() & row["in_avg"] & row["same_samples"]].set_index("benchmark")
        complete = set(scored.index) == averaged
        ours_avg = scored["ours"].mean() if complete and len(scored) else math.nan
        paper_avg = complete_mean(scored["paper"])
        ours_base = complete_mean(vanilla["ours"].reindex(scored.index)) if len(vanilla) else math.nan
        paper_base = complete_mean(vanilla["paper"].reindex(scored.index)) if len(vanilla) else math.nan
        shared = {"model": first["model"], "table_budget": first["table_budget"], "method": method,
                  "budget": budget, "reference": first["reference"], "kind": "average", "in_avg": False}
        versions = ",".join(sorted(set(scored["paper_version"].dropna()))) or pd.NA
        average = boot.average(first["model"], method, budget, scored.index) if complete else None
        base = boot.average(first["model"], *vanilla_job, scored.index) if vanilla_job else None
        average_low, average_high = boot.interval(average)
        percent_low, percent_high = boot.interval(ratio_percent(average, base))
        rows.append({**shared, "column": AVG, "ours": ours_avg, "low": average_low, "high": average_high,
                     "paper": paper_avg, "paper_version": versions})
        rows.append({**shared, "column": AVG_PCT, "ours": percent(ours_avg, ours_base), "low": percent_low,
                     "high": percent_high, "paper": percent(paper_avg, paper_base), "paper_version": versions})
    return pd.DataFrame(rows)


def complete_mean(values: pd.Series) -> float:
    """The mean when every value is present (and there is at least one), else NaN."""
    return float(values.mean()) if len(values) and values.notna().all() else math.nan


def percent(value: float, base: float) -> float:
    return 100.0 * value / base if base == base and base != 0 and value == value else math.nan


def cost_cells(model_rows: pd.DataFrame, reference: pd.DataFrame, table_budget: str,
               entries: list[tuple[str, str, bool]]) -> pd.DataFrame:
    rows = []
    for method, budget, reference_row in entries:
        job_rows = model_rows[(model_rows["method"] == method) & (model_rows["budget"] == budget)]
        model = model_rows["model"].iloc[0]
        for column, tidy_column in COST_COLUMNS.items():
            paper = printed_tflops(reference, model, method, budget) if column == "TFLOPs legacy" else math.nan
            rows.append({"model": model, "table_budget": table_budget, "method": method, "budget": budget,
                         "reference": reference_row, "column": column, "kind": "cost", "in_avg": False,
                         "ours": float(job_rows[tidy_column].mean()) if len(job_rows) else math.nan,
                         "low": math.nan, "high": math.nan, "paper": paper, "paper_version": pd.NA})
    return pd.DataFrame(rows)


def best_marks(table: pd.DataFrame) -> pd.Series:
    """True where a reduced row has the highest displayed value of its score / average column."""
    shown = table["ours"].round(DISPLAY_DECIMALS)
    candidates = table["kind"].isin(["score", "average"]) & ~table["reference"].astype(bool) & shown.notna()
    column_max = shown.where(candidates).groupby(table["column"]).transform("max")
    return (candidates & (shown == column_max)).astype(bool)


def avg_percent_by_budget(tables: pd.DataFrame) -> pd.DataFrame:
    """Avg% of every reduced row: model, method, budget, budget_tokens, avg_pct (for the Avg% plot).

    `budget_tokens` is the x of the plot (float): the integer budget, or for an "adaptive" run (no
    budget) or a TFLOPs target (a budget per method) its realised mean visual tokens per LLM layer, the
    row's "visual tokens" cost cell.
    """
    reduced = ~tables["reference"].astype(bool) & (tables["budget"] != FULL)
    keys = ["model", "table_budget", "method", "budget"]
    rows = tables[(tables["column"] == AVG_PCT) & reduced]
    realised = tables[(tables["column"] == "visual tokens") & reduced][keys + ["ours"]]
    frame = rows[keys + ["ours"]].rename(columns={"ours": "avg_pct"}).merge(
        realised.rename(columns={"ours": "realised_tokens"}), on=keys, how="left")
    numeric = frame["budget"].map(is_token_budget).astype(bool)
    x = frame["realised_tokens"].astype(float).where(~numeric, pd.to_numeric(frame["budget"].where(numeric)))
    frame = frame.assign(budget_tokens=x.astype(float))[["model", "method", "budget", "budget_tokens", "avg_pct"]]
    return frame.reset_index(drop=True)


def paper_findings(headline: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Which of the paper's FiCoCo-against-baseline orderings a model's run reproduces.

    A finding: a FiCoCo method scored above (or below) a baseline at every one of the paper's three
    LLaVA-1.5-7B budgets (its printed Avg). Our side: each method's mean headline score over the
    benchmarks scored in percent (`averaged`; a run lacking one, or scored on other samples than vanilla's
    because other samples failed, has none), at the three largest numeric budgets both methods have a mean at,
    paired with the paper's by rank (the toy world's budgets are other fractions of its visual tokens); a pair
    without three such budgets is not judged. Reproduced when the run orders the two methods the same way at all
    three. Columns: model, ficoco, baseline, paper, ours, budgets, reproduced.
    """
    averages = paper_averages(reference)
    rows = []
    for model, frame in headline.groupby("model"):
        numeric = frame[frame["budget"].map(is_token_budget) & averaged_jobs(frame)]
        benchmarks = numeric["benchmark"].nunique()             # a run's mean over all of them, or none
        vanilla = frame[frame["method"].map(is_vanilla) & (frame["budget"] == FULL)]
        scored = numeric[numeric["value"].notna() & same_samples(numeric, vanilla)].groupby(["method", "budget"])["value"]
        scores = scored.mean()[scored.count() == benchmarks]
        methods = [m for m in numeric["method"].unique() if paper_method(m) in averages]
        for ficoco in sorted(m for m in methods if name_key(m).startswith("ficoco")):
            for baseline in sorted(m for m in methods if not name_key(m).startswith("ficoco")):
                paper_a, paper_b = averages[paper_method(ficoco)], averages[paper_method(baseline)]
                orderings = {(a > b) - (a < b) for a, b in zip(paper_a, paper_b)}     # +1 above, -1 below, 0 tie
                if orderings not in ({1}, {-1}):
                    continue                                    # no single ordering across the paper's budgets
                above = orderings == {1}
                both = sorted({int(budget) for method, budget in scores.index if method == ficoco}
                              & {int(budget) for method, budget in scores.index if method == baseline}, reverse=True)
                if len(both) < len(paper_a):
                    continue                                    # not at as many budgets as the paper: not judged
                pairs = [(scores[(ficoco, str(b))], scores[(baseline, str(b))], b) for b in both[:len(paper_a)]]
                rows.append({
                    "model": model, "ficoco": ficoco, "baseline": baseline,
                    "paper": f"{'above' if above else 'below'} at every budget: "
                             + " / ".join(f"{a:.1f} vs {b:.1f}" for a, b in zip(paper_a, paper_b)),
                    "ours": " / ".join(f"{a:.1f} vs {b:.1f}" for a, b, _ in pairs),
                    "budgets": " / ".join(str(budget) for _, _, budget in pairs),
                    "reproduced": all((a > b) == above and a != b for a, b, _ in pairs),
                })
    return pd.DataFrame(rows, columns=["model", "ficoco", "baseline", "paper", "ours", "budgets", "reproduced"])

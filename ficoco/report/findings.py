"""What the run found, computed from the paper tables and the bootstrap replicates.

- the accuracy-cost points of every (model, method, budget) and the Pareto frontier among them;
- the best reduced method at each budget, and the methods the data cannot tell from it;
- each FiCoCo method against the best baseline at each budget: the paired difference of Avg and its
  interval;
- the cells where our score and the paper's differ by more than our interval.

Accuracy is Avg% of vanilla where the model has a vanilla run, else Avg; cost is the exact FLOPs per
sample (mean over the row's benchmarks). A point is on the frontier when no other point of the same
model costs no more and scores at least as high, one of the two strictly.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ficoco.report.intervals import Bootstrap, paired_difference
from ficoco.report.paper import (PAPER_ROWS_AT_OUR_SETTING, SERVER_ONLY_COLUMNS, name_key, paper_benchmark,
                                  paper_method)
from ficoco.report.tables import AVG, AVG_PCT, is_vanilla

POINT_COLUMNS = ["model", "method", "budget", "tflops", "accuracy", "low", "high", "measure", "on_frontier"]


def family(method: str) -> str:
    """"vanilla", "FiCoCo" (the paper's own methods) or "baseline"."""
    if is_vanilla(method):
        return "vanilla"
    return "FiCoCo" if name_key(method).startswith("ficoco") else "baseline"


def accuracy_points(tables: pd.DataFrame) -> pd.DataFrame:
    """One point per (model, method, budget): exact TFLOPs, accuracy with its interval, which measure
    the accuracy is ("Avg%" or "Avg"), and whether it is on the model's Pareto frontier."""
    if tables.empty:
        return pd.DataFrame(columns=POINT_COLUMNS)
    rows = []
    for model, model_tables in tables.groupby("model", sort=True):
        has_percent = model_tables.loc[model_tables["column"] == AVG_PCT, "ours"].notna().any()
        measure = AVG_PCT if has_percent else AVG
        unique = model_tables.drop_duplicates(subset=["method", "budget", "column"])
        accuracy = unique[unique["column"] == measure].set_index(["method", "budget"])
        cost = unique[unique["column"] == "TFLOPs exact"].set_index(["method", "budget"])["ours"]
        for (method, budget), cell in accuracy.iterrows():
            rows.append({"model": model, "method": method, "budget": budget, "tflops": cost.get((method, budget)),
                         "accuracy": cell["ours"], "low": cell["low"], "high": cell["high"], "measure": measure})
    points = pd.DataFrame(rows, columns=POINT_COLUMNS[:-1]).astype({"tflops": float, "accuracy": float})
    points = points.dropna(subset=["tflops", "accuracy"]).reset_index(drop=True)
    on_frontier = pd.Series(False, index=points.index)
    for _, group in points.groupby("model"):
        on_frontier[group.index[pareto_mask(group["tflops"].to_numpy(), group["accuracy"].to_numpy())]] = True
    return points.assign(on_frontier=on_frontier.astype(bool))


def pareto_mask(cost: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """True for the points no other point dominates (cost <= and accuracy >=, one strictly)."""
    order = np.lexsort((-accuracy, cost))                    # cheapest first; equal cost: best first
    mask = np.zeros(len(cost), dtype=bool)
    best = -math.inf
    for index in order:
        if accuracy[index] > best:
            mask[index] = True
            best = accuracy[index]
    return mask


def row_benchmarks(table: pd.DataFrame, method: str, budget: str) -> list[str]:
    cells = table[(table["method"] == method) & (table["budget"] == budget) & (table["kind"] == "score")
                  & table["in_avg"].astype(bool)]
    return cells.loc[cells["ours"].notna(), "column"].tolist()


def row_average(table: pd.DataFrame, method: str, budget: str, benchmarks) -> float:
    cells = table[(table["method"] == method) & (table["budget"] == budget) & table["column"].isin(benchmarks)]
    return float(cells["ours"].mean()) if len(cells) == len(benchmarks) and len(benchmarks) else math.nan


def comparison(table: pd.DataFrame, boot: Bootstrap, first: tuple[str, str], second: tuple[str, str]) -> dict:
    """Avg of two rows of one table over the benchmarks both scored, their difference and its paired
    interval."""
    shared = [b for b in row_benchmarks(table, *first) if b in set(row_benchmarks(table, *second))]
    model = table["model"].iloc[0]
    first_avg, second_avg = row_average(table, *first, shared), row_average(table, *second, shared)
    low, high = paired_difference(boot.average(model, *first, shared), boot.average(model, *second, shared),
                                  boot.level)
    return {"benchmarks": len(shared), "first": first_avg, "second": second_avg,
            "difference": first_avg - second_avg, "low": low, "high": high, "verdict": verdict(low, high)}


def verdict(low: float, high: float) -> str:
    if math.isnan(low) or math.isnan(high):
        return "no interval"
    if low > 0:
        return "ahead"
    if high < 0:
        return "behind"
    return "within noise"


def reduced_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The reduced rows of one table (vanilla's reference row left out), best Avg first."""
    averages = table[(table["column"] == AVG) & ~table["reference"].astype(bool) & table["ours"].notna()]
    return averages.sort_values(["ours", "method"], ascending=[False, True])


def unranked_rows(table: pd.DataFrame) -> list[str]:
    """The reduced rows of one table without an Avg (a benchmark unscored, or scored on other samples than vanilla
    because other samples failed): never ranked, so named beside the ranking."""
    averages = table[(table["column"] == AVG) & ~table["reference"].astype(bool) & table["ours"].isna()]
    return sorted(set(averages["method"]))


def best_per_budget(tables: pd.DataFrame, boot: Bootstrap) -> pd.DataFrame:
    """Per model and budget: the best reduced row by Avg, its interval, the rows whose paired difference from it
    has an interval that includes 0 (the data cannot tell them apart), and the rows with no Avg to rank."""
    rows = []
    for (model, table_budget), table in tables.groupby(["model", "table_budget"], sort=False):
        ranked = reduced_rows(table)
        if ranked.empty:
            continue
        best = ranked.iloc[0]
        tied = [f"{row.method}" for row in ranked.iloc[1:].itertuples()
                if comparison(table, boot, (best["method"], best["budget"]), (row.method, row.budget))["verdict"]
                in ("within noise", "no interval")]
        rows.append({"model": model, "budget": table_budget, "best": best["method"], "Avg": best["ours"],
                     "low": best["low"], "high": best["high"], "not told apart from the best": ", ".join(tied),
                     "not ranked (no Avg)": ", ".join(unranked_rows(table))})
    return pd.DataFrame(rows, columns=["model", "budget", "best", "Avg", "low", "high",
                                       "not told apart from the best", "not ranked (no Avg)"])


def ficoco_against_best_baseline(tables: pd.DataFrame, boot: Bootstrap) -> pd.DataFrame:
    """Per model and budget, each FiCoCo method against the best baseline (by Avg) of that table."""
    rows = []
    for (model, table_budget), table in tables.groupby(["model", "table_budget"], sort=False):
        ranked = reduced_rows(table)
        families = ranked["method"].map(family)
        baselines, ficocos = ranked[families == "baseline"], ranked[families == "FiCoCo"]
        if baselines.empty:
            continue
        baseline = baselines.iloc[0]
        for ficoco in ficocos.sort_values("method").itertuples():
            compared = comparison(table, boot, (ficoco.method, ficoco.budget), (baseline["method"], baseline["budget"]))
            rows.append({"model": model, "budget": table_budget, "FiCoCo": ficoco.method, "its Avg": compared["first"],
                         "best baseline": baseline["method"], "baseline Avg": compared["second"],
                         "difference": compared["difference"], "low": compared["low"], "high": compared["high"],
                         "benchmarks": compared["benchmarks"], "verdict": compared["verdict"]})
    return pd.DataFrame(rows, columns=["model", "budget", "FiCoCo", "its Avg", "best baseline", "baseline Avg",
                                       "difference", "low", "high", "benchmarks", "verdict"])


def paper_differences(tables: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The score cells whose paper number lies outside our interval, and how many cells could be compared (a
    paper number and an interval): those of the paper's rows at our setting (`PAPER_ROWS_AT_OUR_SETTING`), on
    benchmarks it scored as we do (not the servers' test-dev splits)."""
    at_our_setting = tables["method"].map(paper_method).isin(PAPER_ROWS_AT_OUR_SETTING)
    local = ~tables["column"].map(paper_benchmark).isin(SERVER_ONLY_COLUMNS)
    cells = tables[(tables["kind"] == "score") & tables["paper"].notna() & at_our_setting & local].drop_duplicates(
        subset=["model", "method", "budget", "column"])
    comparable = cells[cells["low"].notna() & cells["high"].notna()]
    outside = comparable[(comparable["paper"] < comparable["low"]) | (comparable["paper"] > comparable["high"])]
    columns = ["model", "method", "budget", "column", "ours", "low", "high", "paper", "delta"]
    return outside[columns].rename(columns={"column": "benchmark"}).reset_index(drop=True), len(comparable)


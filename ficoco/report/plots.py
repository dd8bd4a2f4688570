"""The report's seaborn figures, one PNG each (matplotlib Agg backend).

Every figure always produces its PNG: when its inputs are absent, the PNG is a placeholder that
states why, and `Figure.note` carries the same reason for the page. A fixed set of files keeps the
Snakemake outputs of the report rule stable.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from ficoco.report import files  # noqa: E402
from ficoco.report.aggregate import FULL  # noqa: E402
from ficoco.report.tables import is_vanilla, ordered_benchmarks, ordered_budgets, ordered_methods  # noqa: E402

DPI = 110


@dataclass(frozen=True)
class Figure:
    key: str                # file stem and page anchor
    title: str
    caption: str
    path: Path
    note: str | None        # why the figure is a placeholder; None when it was drawn


FIGURE_TITLES = {
    "accuracy_vs_tflops": ("Accuracy against exact TFLOPs",
                           "Headline score of each benchmark against the exact mean TFLOPs per sample "
                           "(vision + projector + LLM prefill + decode), one line per method over its budgets. The axis "
                           "unit follows the magnitude (TFLOPs for LLaVA-1.5, MFLOPs for the toy model)."),
    "avg_percent_vs_budget": ("Avg% of vanilla against budget",
                              "Average headline score as a percentage of the same model's vanilla run over the "
                              "same benchmarks, against the budget (average visual tokens per LLM layer); an "
                              "adaptive method (no budget) sits at its realised mean visual tokens per layer."),
    "speedup_vs_flops_reduction": ("Measured speedup against FLOPs reduction",
                                   "Measured speedup over vanilla (median latency) against the FLOPs reduction over "
                                   "vanilla, for the prefill and end to end. The dashed line is speedup = reduction."),
    "visual_tokens_per_layer": ("Visual tokens per LLM layer",
                                "Mean number of visual tokens each LLM decoder layer processed during prefill "
                                "(the realised schedule), averaged over benchmarks; vanilla shown in every panel."),
    "latency_breakdown": ("Latency breakdown",
                          "Median measured latency per request split into prefill (time to first token) and "
                          "decode (end to end minus prefill)."),
}


def make_figures(headline: pd.DataFrame, avg_pct: pd.DataFrame, schedules: pd.DataFrame,
                 measure: pd.DataFrame, out_dir: str | Path) -> list[Figure]:
    out_dir = Path(out_dir)
    palette = method_palette([*headline["method"], *schedules["method"], *measure["method"]])
    drawn = {
        "accuracy_vs_tflops": accuracy_vs_tflops(headline, palette),
        "avg_percent_vs_budget": avg_percent_vs_budget(avg_pct, palette),
        "speedup_vs_flops_reduction": speedup_vs_flops_reduction(measure, headline, palette),
        "visual_tokens_per_layer": visual_tokens_per_layer(schedules, palette),
        "latency_breakdown": latency_breakdown(measure),
    }
    figures = []
    for key, result in drawn.items():
        title, caption = FIGURE_TITLES[key]
        path = out_dir / f"{key}.png"
        note = result if isinstance(result, str) else None
        save(placeholder(title, note) if note else result, path)
        figures.append(Figure(key=key, title=title, caption=caption, path=path, note=note))
    return figures


def save(figure, path: Path) -> None:
    with files.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)


def placeholder(title: str, note: str):
    figure, axis = plt.subplots(figsize=(6, 1.6))
    axis.axis("off")
    axis.text(0.5, 0.5, f"{title}\nnot available: {note}", ha="center", va="center", wrap=True, fontsize=9)
    return figure


def style():
    """Seaborn style for one figure, without touching the global matplotlib settings."""
    return sns.axes_style("whitegrid")


def method_palette(methods) -> dict:
    """One colour per method, the same in every figure; keys in table order (vanilla first)."""
    names = ordered_methods(methods)
    return dict(zip(names, sns.color_palette("tab10" if len(names) <= 10 else "husl", len(names))))


def hue(palette: dict, methods) -> dict:
    """relplot arguments for the methods present: their colours, in the palette's order."""
    present = set(methods)
    return {"hue": "method", "hue_order": [m for m in palette if m in present], "palette": palette}


# ---------------------------------------------------------------------------------------------- figures


def accuracy_vs_tflops(headline: pd.DataFrame, palette: dict):
    data = headline.dropna(subset=["value", "tflops_exact"])
    if data.empty:
        return "no run has both a headline score and exact FLOPs (cost_mean.total_flops)"
    data = data.astype({"model": object, "method": object, "benchmark": object})
    benchmarks = ordered_benchmarks(data["benchmark"].unique())
    data = data.assign(panel=panel_names(data, "benchmark"))
    order = panel_order(data, "benchmark", benchmarks)
    scale, unit = flops_unit(float(data["tflops_exact"].max()))
    data = data.assign(flops=data["tflops_exact"] * scale)
    single = len(order) == 1                                  # one panel: give it the room of a page
    with style():
        grid = sns.relplot(data=data, x="flops", y="value", kind="line", marker="o",
                           **hue(palette, data["method"]), col="panel", col_order=order,
                           col_wrap=min(4, len(order)), height=4.5 if single else 2.6,
                           aspect=1.5 if single else 1.25, facet_kws={"sharex": False, "sharey": False})
        grid.set_axis_labels(f"exact {unit} per sample", "score")
        grid.set_titles(col_template="{col_name}")
    return grid.figure


def flops_unit(largest_tflops: float) -> tuple[float, str]:
    """(factor from TFLOPs, unit name) so the largest value reads at least 1: the paper's models
    are plotted in TFLOPs, the toy model in MFLOPs."""
    for factor, unit in ((1.0, "TFLOPs"), (1e3, "GFLOPs"), (1e6, "MFLOPs")):
        if largest_tflops * factor >= 1.0:
            return factor, unit
    return 1e9, "kFLOPs"


def panel_names(data: pd.DataFrame, column: str, prefix: str = "") -> pd.Series:
    """One facet per (model, value of `column`) that has data; the model is named only when there are several."""
    if data["model"].nunique() == 1:
        return prefix + data[column].astype(str)
    return data["model"].astype(str) + " · " + prefix + data[column].astype(str)


def panel_order(data: pd.DataFrame, column: str, values: list[str]) -> list[str]:
    pairs = data[["model", column, "panel"]].drop_duplicates()
    rank = {value: i for i, value in enumerate(values)}
    pairs = pairs.assign(_rank=pairs[column].map(rank)).sort_values(["model", "_rank"])
    return pairs["panel"].tolist()


def avg_percent_vs_budget(avg_pct: pd.DataFrame, palette: dict):
    data = avg_pct.dropna(subset=["avg_pct"])
    if data.empty:
        return "Avg% needs a vanilla (budget full) run and at least one reduced run of the same model"
    data = data.astype({"model": object, "method": object})
    with style():
        grid = sns.relplot(data=data, x="budget_tokens", y="avg_pct", col="model", kind="line",
                           marker="o", **hue(palette, data["method"]), height=3.2, aspect=1.3,
                           facet_kws={"sharex": False, "sharey": False})
        for axis in grid.axes.flat:
            axis.axhline(100.0, color="grey", linestyle="--", linewidth=1)
        grid.set_axis_labels("budget (average visual tokens per LLM layer)", "Avg% of vanilla")
        grid.set_titles(col_template="{col_name}")
    return grid.figure


def speedup_frame(measure: pd.DataFrame, headline: pd.DataFrame) -> pd.DataFrame:
    """model, method, budget, part ("prefill" | "end to end"), flops_reduction, speedup."""
    rows = []
    vanilla_measure = measure[measure["method"].map(is_vanilla) & (measure["budget"] == FULL)]
    for _, base in vanilla_measure.iterrows():
        model_measure = measure[(measure["model"] == base["model"]) & ~(measure["method"].map(is_vanilla))]
        for _, row in model_measure.iterrows():
            for part, seconds, flops in (("prefill", "prefill_s", "tflops_prefill"),
                                         ("end to end", "end_to_end_s", "tflops_exact")):
                rows.append({"model": base["model"], "method": row["method"], "budget": row["budget"], "part": part,
                             "speedup": base[seconds] / row[seconds],
                             "flops_reduction": flops_reduction(base, row, flops, headline)})
    frame = pd.DataFrame(rows, columns=["model", "method", "budget", "part", "speedup", "flops_reduction"])
    return frame.replace([np.inf, -np.inf], np.nan).dropna(subset=["speedup", "flops_reduction"])


def flops_reduction(base: pd.Series, row: pd.Series, flops: str, headline: pd.DataFrame) -> float:
    """Vanilla FLOPs / method FLOPs: from the measure files when they carry FLOPs, else the mean over
    benchmarks of the evaluate runs' ratio (same model and benchmark)."""
    if pd.notna(base[flops]) and pd.notna(row[flops]) and row[flops] > 0:
        return float(base[flops] / row[flops])
    model = headline[headline["model"] == base["model"]]
    vanilla = model[model["method"].map(is_vanilla) & (model["budget"] == FULL)].set_index("benchmark")[flops]
    same_job = (model["method"] == row["method"]) & (model["budget"] == row["budget"])
    reduced = model[same_job].set_index("benchmark")[flops]
    ratio = (vanilla.reindex(reduced.index) / reduced).replace([np.inf, -np.inf], np.nan).dropna()
    return float(ratio.mean()) if len(ratio) else float("nan")


def speedup_vs_flops_reduction(measure: pd.DataFrame, headline: pd.DataFrame, palette: dict):
    if measure.empty:
        return "no measure files (results/measure/{model}/{method}/b{budget}.json)"
    data = speedup_frame(measure, headline)
    if data.empty:
        return ("speedup needs a measured vanilla run (method vanilla, budget full) and a measured reduced run "
                "of the same model, with latencies and FLOPs")
    data = data.astype({"model": object, "method": object})
    with style():
        grid = sns.relplot(data=data, x="flops_reduction", y="speedup", style="model", col="part",
                           kind="scatter", s=60, **hue(palette, data["method"]), height=3.2, aspect=1.1,
                           facet_kws={"sharex": False, "sharey": False})
        for axis, part in zip(grid.axes.flat, grid.col_names):
            subset = data[data["part"] == part]
            top = max(subset["flops_reduction"].max(), subset["speedup"].max(), 1.0) * 1.05
            axis.plot([1.0, top], [1.0, top], color="grey", linestyle="--", linewidth=1)
            for _, row in subset.iterrows():
                axis.annotate(f"b{row['budget']}", (row["flops_reduction"], row["speedup"]), fontsize=7,
                              xytext=(3, 3), textcoords="offset points")
        grid.set_axis_labels("FLOPs reduction (vanilla / method)", "speedup (vanilla / method)")
        grid.set_titles(col_template="{col_name}")
    return grid.figure


def visual_tokens_per_layer(schedules: pd.DataFrame, palette: dict):
    data = schedules.dropna(subset=["visual_tokens"])
    if data.empty:
        return "no run recorded visual tokens per layer (visual_tokens.per_layer)"
    mean = (data.groupby(["model", "method", "budget", "layer"], as_index=False)["visual_tokens"].mean())
    mean = mean.astype({"model": object, "method": object, "budget": object})
    vanilla = mean[mean["method"].map(is_vanilla)]
    reduced = mean[~mean["method"].map(is_vanilla)]
    panels = [reduced] + [vanilla[vanilla["model"] == model].assign(budget=budget)
                          for model, budget in reduced[["model", "budget"]].drop_duplicates().itertuples(index=False)]
    data = pd.concat(panels, ignore_index=True) if len(reduced) else vanilla
    data = data.assign(panel=panel_names(data, "budget", prefix="budget "))
    order = panel_order(data, "budget", ordered_budgets(data["budget"].unique()))
    with style():
        grid = sns.relplot(data=data, x="layer", y="visual_tokens", kind="line", col="panel", col_order=order,
                           col_wrap=min(3, len(order)), **hue(palette, data["method"]), height=2.8, aspect=1.3,
                           drawstyle="steps-mid", facet_kws={"sharex": False, "sharey": True})
        grid.set_axis_labels("LLM layer", "visual tokens")
        grid.set_titles(col_template="{col_name}")
    return grid.figure


def latency_breakdown(measure: pd.DataFrame):
    data = measure.dropna(subset=["prefill_s", "end_to_end_s"])
    if data.empty:
        return "no measure file with prefill_s and end_to_end_s latencies"
    models = sorted(data["model"].unique())
    with style():
        figure, axes = plt.subplots(len(models), 1, squeeze=False,
                                    figsize=(7, 0.9 + 0.35 * data.groupby("model").size().max() * len(models)))
        colours = sns.color_palette("tab10", 2)
        for axis, model in zip(axes[:, 0], models):
            rows = data[data["model"] == model].copy()
            rows["order"] = rows["method"].map({m: i for i, m in enumerate(ordered_methods(rows["method"]))})
            rows["budget_order"] = rows["budget"].map({b: i for i, b in enumerate(ordered_budgets(rows["budget"]))})
            rows = rows.sort_values(["order", "budget_order"])
            labels = [f"{m} b{b}" for m, b in zip(rows["method"], rows["budget"])]
            prefill_ms = rows["prefill_s"].to_numpy() * 1e3
            decode_ms = (rows["end_to_end_s"] - rows["prefill_s"]).clip(lower=0).to_numpy() * 1e3
            axis.barh(labels, prefill_ms, color=colours[0], label="prefill")
            axis.barh(labels, decode_ms, left=prefill_ms, color=colours[1], label="decode")
            axis.invert_yaxis()
            axis.set_title(model)
            axis.set_xlabel("median latency per request (ms)")
            axis.legend(loc="lower right", fontsize=8)
        figure.tight_layout()
    return figure

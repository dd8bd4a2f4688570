"""The report's seaborn figures, one PNG each (matplotlib Agg backend).

Every figure always produces its PNG: when its inputs are absent, the PNG is a placeholder that
states why, and `Figure.note` carries the same reason for the page. A fixed set of files keeps the
Snakemake outputs of the report rule stable.

Readable with 25 methods: colour says the family (vanilla, FiCoCo, baseline; Okabe-Ito, colour-blind
safe), the marker says where the method acts (vision, post-vision, LLM, both), and every line or
point is named by a direct label in a column beside its panel, spread so that no two labels overlap
(`label_overlaps` checks it from the rendered label boxes). A short legend explains the encoding.
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
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from ficoco.report import files  # noqa: E402
from ficoco.budget_labels import FULL, describe  # noqa: E402
from ficoco.report.findings import family  # noqa: E402
from ficoco.report.tables import (AVG_PCT, avg_percent_by_budget, is_vanilla, job_label, ordered_budgets,  # noqa: E402
                                  ordered_methods)
from ficoco.report.units import flops_unit_of  # noqa: E402

DPI = 110
FAMILY_COLOURS = {"vanilla": "#000000", "FiCoCo": "#D55E00", "baseline": "#0072B2"}    # Okabe-Ito
PHASE_MARKERS = {"vision": "o", "projector": "s", "llm": "^", "both": "D", "none": "*"}
PHASE_NAMES = {"vision": "vision", "projector": "post-vision", "llm": "LLM", "both": "vision + LLM",
               "none": "unreduced"}
LABEL_FONT = 7.5
LABEL_GID = "direct-label"
#: Vertical room of one direct label, in points (font size plus leading).
LABEL_PITCH = LABEL_FONT * 1.35


@dataclass(frozen=True)
class Figure:
    key: str                # file stem and page anchor
    title: str
    caption: str
    path: Path
    note: str | None        # why the figure is a placeholder; None when it was drawn


FIGURE_TITLES = {
    "accuracy_vs_flops": ("Accuracy against exact FLOPs",
                          "Avg% of vanilla (Avg where the model has no vanilla run) against the exact FLOPs per "
                          "sample (vision + projector + LLM prefill + decode, mean over the benchmarks), one panel "
                          "per model, one line per method over its budgets, with its 95% bootstrap interval. The "
                          "grey steps join the Pareto frontier; frontier runs are ringed and named in bold. Hollow "
                          "markers: the paper's published Avg% at the TFLOPs it printed (its own FLOPs convention), "
                          "where the run maps onto the paper. The unit follows the magnitude."),
    "avg_percent_vs_budget": ("Avg% of vanilla against budget",
                              "Average headline score as a percentage of the same model's vanilla run over the "
                              "same benchmarks, against the budget (average visual tokens per LLM layer); an "
                              "adaptive method (no budget) sits at its realised mean visual tokens per layer."),
    "speedup_vs_flops_reduction": ("Measured speedup against FLOPs reduction",
                                   "Measured speedup over vanilla (median latency) against the FLOPs reduction over "
                                   "vanilla, for the prefill and end to end. The dashed line is the ideal, speedup = "
                                   "reduction."),
    "visual_tokens_per_layer": ("Visual tokens per LLM layer",
                                "Mean number of visual tokens each LLM decoder layer processed during prefill (the "
                                "realised schedule), averaged over benchmarks: one panel per phase (where the "
                                "methods act) and budget, vanilla dashed in every panel."),
    "latency_breakdown": ("Latency breakdown",
                          "Median measured latency per request split into prefill (time to first token) and "
                          "decode (end to end minus prefill)."),
}


def make_figures(headline: pd.DataFrame, points: pd.DataFrame, tables: pd.DataFrame, schedules: pd.DataFrame,
                 measure: pd.DataFrame, out_dir: str | Path) -> list[Figure]:
    """Draw and save every figure. points: findings.accuracy_points; tables: tables.paper_tables."""
    out_dir = Path(out_dir)
    phases = method_phases(headline, schedules)
    drawn = {
        "accuracy_vs_flops": accuracy_vs_flops(points, paper_points(tables), phases),
        "avg_percent_vs_budget": avg_percent_vs_budget(avg_percent_by_budget(tables), phases),
        "speedup_vs_flops_reduction": speedup_vs_flops_reduction(measure, headline, phases),
        "visual_tokens_per_layer": visual_tokens_per_layer(schedules, phases),
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


def method_phases(*frames: pd.DataFrame) -> dict[str, str]:
    """method -> its phase (vision, projector, llm, both, none), from any frame with both columns."""
    phases = {}
    for frame in frames:
        if {"method", "phase"} <= set(frame.columns):
            for method, phase in frame[["method", "phase"]].drop_duplicates().itertuples(index=False):
                phases.setdefault(str(method), str(phase))
    return phases


def colour(method: str) -> str:
    return FAMILY_COLOURS[family(method)]


def marker(method: str, phases: dict[str, str]) -> str:
    return PHASE_MARKERS.get(phases.get(method, ""), "X")


def encoding_legend(figure, phases_shown, extra: list[Line2D] = ()) -> None:
    """The legend of the encoding (families, phases), not of the methods: those are labelled directly."""
    handles = [Line2D([], [], color=c, linewidth=2, label=name) for name, c in FAMILY_COLOURS.items()]
    handles += [Line2D([], [], color="#555555", marker=PHASE_MARKERS[p], linestyle="none", label=PHASE_NAMES[p])
                for p in PHASE_MARKERS if p in set(phases_shown)]
    figure.legend(handles=[*handles, *extra], loc="upper left", bbox_to_anchor=(0.0, 1.0), ncol=5,
                       fontsize=7.5, frameon=False, borderaxespad=0.2)


# ---------------------------------------------------------------------------------------------- direct labels


def spread(desired: list[float], pitch: float, low: float, high: float) -> list[float]:
    """Positions as close as possible to `desired`, at least `pitch` apart, inside [low, high] when they
    fit (else they run past `high`, still `pitch` apart). Order is kept."""
    order = sorted(range(len(desired)), key=lambda i: (desired[i], i))
    placed = [0.0] * len(desired)
    previous = -np.inf
    for i in order:                                           # upwards: keep the pitch
        placed[i] = max(desired[i], low, previous + pitch)
        previous = placed[i]
    following = np.inf
    for i in reversed(order):                                 # downwards: back under `high`
        placed[i] = min(placed[i], high, following - pitch)
        following = placed[i]
    previous = -np.inf
    for i in order:                                           # too many to fit: overflow upwards, not onto each other
        placed[i] = max(placed[i], previous + pitch)
        previous = placed[i]
    return placed


def label_column(axis, entries: list[tuple[float, float, str, str, bool]]) -> None:
    """Name each (x, y) point of the axis in a column just right of it, joined by a thin leader line.

    entries: (x, y, text, colour, bold). The axis limits must be final: positions are axes fractions.
    """
    if not entries:
        return
    axis.get_xlim(), axis.get_ylim()                          # apply any pending autoscaling before reading them
    axis_height_points = axis.get_position().height * axis.figure.get_figheight() * 72.0
    pitch = LABEL_PITCH / axis_height_points
    to_axes = axis.transData + axis.transAxes.inverted()
    desired = [float(to_axes.transform((x, y))[1]) for x, y, *_ in entries]
    for (x, y, text, label_colour, bold), position in zip(entries, spread(desired, pitch, 0.0, 1.0)):
        axis.annotate(text, xy=(x, y), xycoords="data", xytext=(1.03, position), textcoords="axes fraction",
                      fontsize=LABEL_FONT, color=label_colour, va="center", ha="left",
                      fontweight="bold" if bold else "normal", annotation_clip=False, gid=LABEL_GID,
                      arrowprops={"arrowstyle": "-", "color": label_colour, "linewidth": 0.4, "alpha": 0.5,
                                  "shrinkA": 0, "shrinkB": 2})


def label_overlaps(figure) -> list[tuple[str, str]]:
    """Pairs of direct labels whose rendered boxes overlap, and labels that overlap another panel (its
    axes, tick labels, axis labels or title)."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    labels = [text for axis in figure.axes for text in axis.texts if text.get_gid() == LABEL_GID]
    boxes = [Text.get_window_extent(text, renderer) for text in labels]      # the text alone, not its leader line
    overlaps = [(labels[i].get_text(), labels[j].get_text()) for i in range(len(labels))
                for j in range(i + 1, len(labels)) if boxes[i].overlaps(boxes[j])]
    for text, box in zip(labels, boxes):
        overlaps += [(text.get_text(), f"panel {axis.get_title() or index}")
                     for index, axis in enumerate(figure.axes)
                     if axis is not text.axes and axis.get_visible() and box.overlaps(panel_box(axis, renderer))]
    return overlaps


def panel_box(axis, renderer):
    """The box of a panel with its tick labels, axis labels and title, without its direct labels."""
    parts = [axis.get_window_extent(renderer), axis.title.get_window_extent(renderer)]
    for axis_artist in (axis.xaxis, axis.yaxis):
        parts.append(axis_artist.get_tightbbox(renderer))
    return Bbox.union([part for part in parts if part is not None and part.width > 0])


def label_room(texts) -> float:
    """Inches a column of direct labels needs beside its panel (an estimate from the longest text)."""
    longest = max((len(str(t)) for t in texts), default=0)
    return 0.25 + longest * LABEL_FONT * 0.62 / 72.0


def panel_grid(rows: int, columns: int, panel_width: float, panel_height: float, label_width: float,
               labels_per_panel: int):
    """A figure of rows x columns panels with room on the right of each panel for its label column and
    enough height for `labels_per_panel` labels (and the encoding legend above the first row)."""
    panel_height = max(panel_height, labels_per_panel * LABEL_PITCH / 72.0 * 1.05)
    gap, top, bottom, left = 0.8, 0.9, 0.6, 0.75
    width = columns * (left + panel_width + label_width)
    height = top + bottom + rows * panel_height + (rows - 1) * gap
    figure, axes = plt.subplots(rows, columns, squeeze=False, figsize=(width, height))
    # between two panels: the left one's label column, then the right one's tick labels and axis label
    figure.subplots_adjust(left=left / width, right=1 - label_width / width, top=1 - top / height,
                           bottom=bottom / height, wspace=(label_width + left) / panel_width,
                           hspace=gap / panel_height)
    return figure, axes


# ---------------------------------------------------------------------------------------------- figures


def paper_points(tables: pd.DataFrame) -> pd.DataFrame:
    """The paper's published (printed TFLOPs, Avg%) of every row that maps onto it: model, method,
    budget, tflops, accuracy."""
    columns = ["model", "method", "budget", "tflops", "accuracy"]
    if tables.empty:
        return pd.DataFrame(columns=columns)
    unique = tables.drop_duplicates(subset=["model", "method", "budget", "column"])
    keys = ["model", "method", "budget"]
    accuracy = unique[unique["column"] == AVG_PCT][keys + ["paper"]].rename(columns={"paper": "accuracy"})
    printed = unique[unique["column"] == "TFLOPs legacy"][keys + ["paper"]].rename(columns={"paper": "tflops"})
    return accuracy.merge(printed, on=keys).dropna(subset=["accuracy", "tflops"])[columns]


def accuracy_vs_flops(points: pd.DataFrame, published: pd.DataFrame, phases: dict[str, str]):
    data = points.dropna(subset=["accuracy", "tflops"])
    if data.empty:
        return "no run has both a headline score and exact FLOPs (cost_mean.total_flops)"
    models = sorted(data["model"].unique())
    factor, unit = flops_unit_of(pd.concat([data["tflops"], published["tflops"]]))
    most_labels = max(data[data["model"] == m]["method"].nunique() for m in models)
    with style():
        figure, axes = panel_grid(len(models), 1, 7.5, 4.2, label_room(data["method"]), most_labels)
        for axis, model in zip(axes[:, 0], models):
            rows = data[data["model"] == model].sort_values("tflops")
            front = rows[rows["on_frontier"]]
            axis.step(front["tflops"] * factor, front["accuracy"], where="post", color="#999999", linewidth=1.2,
                      zorder=1)
            ends = []
            for method in ordered_methods(rows["method"]):
                line = rows[rows["method"] == method]
                axis.errorbar(line["tflops"] * factor, line["accuracy"],
                              yerr=[(line["accuracy"] - line["low"]).clip(lower=0).fillna(0),
                                    (line["high"] - line["accuracy"]).clip(lower=0).fillna(0)],
                              color=colour(method), marker=marker(method, phases), markersize=5, linewidth=1.0,
                              elinewidth=0.6, capsize=1.5, alpha=0.9, zorder=3)
                ringed = line[line["on_frontier"]]
                axis.scatter(ringed["tflops"] * factor, ringed["accuracy"], s=110, facecolors="none",
                             edgecolors="#333333", linewidths=0.9, zorder=4)
                last = line.iloc[-1]
                ends.append((last["tflops"] * factor, last["accuracy"], method, colour(method),
                             bool(line["on_frontier"].any())))
            paper = published[published["model"] == model]
            for row in paper.itertuples():
                axis.scatter(row.tflops * factor, row.accuracy, s=36, marker=marker(row.method, phases),
                             facecolors="none", edgecolors=colour(row.method), linewidths=1.0, zorder=2)
            axis.set_title(f"{model} ({rows['measure'].iloc[0]})", fontsize=10)
            axis.set_xlabel(f"exact {unit} per sample")
            axis.set_ylabel(rows["measure"].iloc[0] if rows["measure"].iloc[0] != AVG_PCT else "Avg% of vanilla")
            axis.margins(x=0.06, y=0.08)
            label_column(axis, ends)
        extra = [Line2D([], [], color="#999999", linewidth=1.2, label="Pareto frontier"),
                 Line2D([], [], color="#333333", marker="o", markerfacecolor="none", markersize=9, linestyle="none",
                        label="on the frontier")]
        if len(published):
            extra.append(Line2D([], [], color="#555555", marker="o", markerfacecolor="none", linestyle="none",
                                label="paper (printed TFLOPs)"))
        encoding_legend(figure, [phases.get(m, "") for m in data["method"]], extra)
    return figure


def avg_percent_vs_budget(avg_pct: pd.DataFrame, phases: dict[str, str]):
    data = avg_pct.dropna(subset=["avg_pct", "budget_tokens"])
    if data.empty:
        return "Avg% needs a vanilla (budget full) run and at least one reduced run of the same model"
    models = sorted(data["model"].unique())
    most_labels = max(data[data["model"] == m]["method"].nunique() for m in models)
    with style():
        figure, axes = panel_grid(len(models), 1, 7.5, 3.8, label_room(data["method"]), most_labels)
        for axis, model in zip(axes[:, 0], models):
            rows = data[data["model"] == model]
            ends = []
            for method in ordered_methods(rows["method"]):
                line = rows[rows["method"] == method].sort_values("budget_tokens")
                axis.plot(line["budget_tokens"], line["avg_pct"], color=colour(method),
                          marker=marker(method, phases), markersize=5, linewidth=1.0, alpha=0.9)
                ends.append((line["budget_tokens"].iloc[-1], line["avg_pct"].iloc[-1], method, colour(method), False))
            axis.axhline(100.0, color="grey", linestyle="--", linewidth=1)
            axis.set_title(str(model), fontsize=10)
            axis.set_xlabel("budget (average visual tokens per LLM layer)")
            axis.set_ylabel("Avg% of vanilla")
            axis.margins(x=0.06, y=0.08)
            label_column(axis, ends)
        encoding_legend(figure, [phases.get(m, "") for m in data["method"]])
    return figure


def speedup_frame(measure: pd.DataFrame, headline: pd.DataFrame) -> pd.DataFrame:
    """model, method, budget, part ("prefill" | "end to end"), flops_reduction, speedup."""
    rows = []
    vanilla_measure = measure[measure["method"].map(is_vanilla) & (measure["budget"] == FULL)]
    for _, base in vanilla_measure.iterrows():
        model_measure = measure[(measure["model"] == base["model"]) & ~(measure["method"].map(is_vanilla))]
        for _, row in model_measure.iterrows():
            # the time to the first token runs the tower, the projector and the prefill: its FLOPs are all but decode
            for part, seconds, flops in (("prefill", "prefill_s", "tflops_first_token"),
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


def speedup_vs_flops_reduction(measure: pd.DataFrame, headline: pd.DataFrame, phases: dict[str, str]):
    if measure.empty:
        return "no measure files (results/measure/{model}/{method}/b{budget}.json)"
    data = speedup_frame(measure, headline)
    if data.empty:
        return ("speedup needs a measured vanilla run (method vanilla, budget full) and a measured reduced run "
                "of the same model, with latencies and FLOPs")
    panels = data[["model", "part"]].drop_duplicates().sort_values(["model", "part"], ascending=[True, False])
    names = [job_label(method, budget) for method, budget in zip(data["method"], data["budget"])]
    most_labels = int(data.groupby(["model", "part"]).size().max())
    with style():
        figure, axes = panel_grid(1, len(panels), 4.2, 3.6, label_room(names), most_labels)
        for axis, (model, part) in zip(axes[0], panels.itertuples(index=False)):
            subset = data[(data["model"] == model) & (data["part"] == part)]
            top = max(subset["flops_reduction"].max(), subset["speedup"].max(), 1.0) * 1.05
            axis.plot([1.0, top], [1.0, top], color="grey", linestyle="--", linewidth=1)
            ends = []
            for row in subset.itertuples():
                axis.scatter(row.flops_reduction, row.speedup, color=colour(row.method), s=30,
                             marker=marker(row.method, phases), zorder=3)
                ends.append((row.flops_reduction, row.speedup, job_label(row.method, row.budget), colour(row.method),
                             False))
            axis.set_xlim(0.9, top)
            axis.set_ylim(min(0.9, subset["speedup"].min() * 0.95), top)
            axis.set_title(f"{model} · {part}" if data["model"].nunique() > 1 else str(part), fontsize=10)
            axis.set_xlabel("FLOPs reduction (vanilla / method)")
            axis.set_ylabel("speedup (vanilla / method)")
            label_column(axis, ends)
        encoding_legend(figure, [phases.get(m, "") for m in data["method"]],
                        [Line2D([], [], color="grey", linestyle="--", label="ideal: speedup = reduction")])
    return figure


def visual_tokens_per_layer(schedules: pd.DataFrame, phases: dict[str, str]):
    data = schedules.dropna(subset=["visual_tokens"])
    if data.empty:
        return "no run recorded visual tokens per layer (visual_tokens.per_layer)"
    mean = data.groupby(["model", "method", "budget", "layer"], as_index=False)["visual_tokens"].mean()
    mean = mean.astype({"model": object, "method": object, "budget": object})
    mean = mean.assign(phase=mean["method"].map(lambda m: phases.get(m, "other")))
    vanilla = mean[mean["method"].map(is_vanilla)]
    reduced = mean[~mean["method"].map(is_vanilla)]
    if reduced.empty:
        reduced = vanilla
    panels = reduced[["model", "budget", "phase"]].drop_duplicates()
    phase_order = [p for p in PHASE_MARKERS if p in set(panels["phase"])] + \
        sorted(set(panels["phase"]) - set(PHASE_MARKERS))
    rows = [(model, budget) for model in sorted(panels["model"].unique())
            for budget in ordered_budgets(panels.loc[panels["model"] == model, "budget"].unique())]
    most_labels = int(reduced.groupby(["model", "budget", "phase"])["method"].nunique().max())
    with style():
        figure, axes = panel_grid(len(rows), len(phase_order), 3.0, 2.2, label_room(reduced["method"]), most_labels)
        for (model, budget), axis_row in zip(rows, axes):
            for phase, axis in zip(phase_order, axis_row):
                panel = reduced[(reduced["model"] == model) & (reduced["budget"] == budget)
                                & (reduced["phase"] == phase)]
                if panel.empty:
                    axis.set_visible(False)
                    continue
                base = vanilla[vanilla["model"] == model]
                axis.plot(base["layer"], base["visual_tokens"], color=FAMILY_COLOURS["vanilla"], linestyle="--",
                          linewidth=1.0, drawstyle="steps-mid")
                ends = []
                for method in ordered_methods(panel["method"]):
                    line = panel[panel["method"] == method].sort_values("layer")
                    axis.plot(line["layer"], line["visual_tokens"], color=colour(method), linewidth=1.2,
                              drawstyle="steps-mid", alpha=0.9)
                    ends.append((line["layer"].iloc[-1], line["visual_tokens"].iloc[-1], method, colour(method),
                                 False))
                model_name = f"{model} · " if len(rows) and mean["model"].nunique() > 1 else ""
                axis.set_title(f"{model_name}{PHASE_NAMES.get(phase, phase)} · budget {describe(budget)}", fontsize=9)
                axis.set_xlabel("LLM layer", fontsize=8)
                axis.set_ylabel("visual tokens", fontsize=8)
                axis.set_ylim(bottom=0)
                label_column(axis, ends)
        encoding_legend(figure, [], [Line2D([], [], color=FAMILY_COLOURS["vanilla"], linestyle="--",
                                            label="vanilla (unreduced)")])
    return figure


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

"""The one self-contained HTML page: tables inline, figures as base64 data URIs, in-page links only."""
from __future__ import annotations

import base64
import html
import string
from pathlib import Path

import pandas as pd

from ficoco.budget_labels import describe, tflops_target
from ficoco.report import findings
from ficoco.report.aggregate import read_predictions
from ficoco.report.intervals import LEVEL, Bootstrap
from ficoco.report.paper import SERVER_ONLY_COLUMNS, paper_benchmark
from ficoco.report.plots import Figure
from ficoco.report.units import flops_unit_of
from ficoco.report.tables import (AVG, AVG_PCT, COST_COLUMNS, DISPLAY_DECIMALS, is_vanilla, job_label,
                                  ordered_budgets)

TEMPLATE_FIELDS = ("title", "generated", "toc", "body")


def default_template() -> Path:
    """report/template.html of the source tree this package belongs to."""
    return Path(__file__).resolve().parents[2] / "report" / "template.html"


def render(template_text: str, title: str, generated: str, sections: list[tuple[str, str, str]]) -> str:
    """Fill the template; `sections` are (anchor id, heading, inner HTML)."""
    missing = [field for field in TEMPLATE_FIELDS if f"${field}" not in template_text]
    if missing:
        raise ValueError(f"report template lacks the placeholders {', '.join('$' + f for f in missing)}; "
                         f"required: {', '.join('$' + f for f in TEMPLATE_FIELDS)}")
    toc = "\n".join(f'<li><a href="#{anchor}">{html.escape(heading)}</a></li>' for anchor, heading, _ in sections)
    body = "\n".join(f'<section id="{anchor}">\n<h2>{html.escape(heading)}</h2>\n{inner}\n</section>'
                     for anchor, heading, inner in sections)
    return string.Template(template_text).substitute(
        title=html.escape(title), generated=html.escape(generated), toc=toc, body=body)


def anchor(*parts) -> str:
    text = "-".join(str(part) for part in parts).lower()
    return "".join(c if c.isalnum() else "-" for c in text)


def fmt(value, decimals: int = DISPLAY_DECIMALS) -> str:
    return "–" if value is None or pd.isna(value) else f"{value:.{decimals}f}"


def signed(value, decimals: int = DISPLAY_DECIMALS) -> str:
    return "" if value is None or pd.isna(value) else f"{value:+.{decimals}f}"


def interval_text(low, high, decimals: int = DISPLAY_DECIMALS) -> str:
    """"[low, high]", or "" when there is no interval."""
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return ""
    return f"[{low:.{decimals}f}, {high:.{decimals}f}]"


def with_interval(value, low, high, decimals: int = DISPLAY_DECIMALS, signed_value: bool = False) -> str:
    """A number and its interval, for sentences and tables: "89.1 [85.5, 92.6]"."""
    text = signed(value, decimals) if signed_value else fmt(value, decimals)
    bounds = interval_text(low, high, decimals)
    return f"{text} {bounds}" if bounds else text


# ---------------------------------------------------------------------------------------------- tables


def benchmark_header(benchmark: str) -> str:
    column = paper_benchmark(benchmark)
    if column is None:
        return html.escape(benchmark)
    mark = '<sup>†</sup>' if column in SERVER_ONLY_COLUMNS else ""
    return f'{html.escape(benchmark)}<br><span class="paper-col">{html.escape(column)}{mark}</span>'


FLOPS_COLUMNS = ("TFLOPs exact", "TFLOPs overhead", "TFLOPs legacy")
INTERVAL_TITLE = f"{LEVEL:.0%} paired bootstrap interval over samples"


def table_cell(cell: pd.Series, flops_factor: float = 1.0) -> str:
    """One cell; FLOPs cells (stored in TFLOPs) are shown times `flops_factor`, the table's unit."""
    is_flops = cell["column"] in FLOPS_COLUMNS
    decimals = 2 if is_flops else DISPLAY_DECIMALS
    factor = flops_factor if is_flops else 1.0
    ours = fmt(cell["ours"] * factor, decimals)
    if cell["best"]:
        ours = f"<b>{ours}</b>"
    parts = [f'<span class="ours">{ours}</span>']
    bounds = interval_text(cell["low"], cell["high"])
    if bounds:
        parts.append(f'<span class="ci" title="{INTERVAL_TITLE}">{bounds}</span>')
    if pd.notna(cell["paper"]):
        version = f' title="paper {html.escape(str(cell["paper_version"]))}"' if pd.notna(cell["paper_version"]) else ""
        # the interval of ours - paper: the paper's number is a constant
        delta_bounds = interval_text(cell["low"] - cell["paper"], cell["high"] - cell["paper"])
        parts.append(f'<span class="paper"{version}>paper {fmt(cell["paper"] * factor, decimals)} '
                     f'<span class="delta">{signed(cell["delta"] * factor, decimals)}</span>'
                     + (f' <span class="ci">{delta_bounds}</span>' if delta_bounds else "") + "</span>")
    return f'<td class="{"best" if cell["best"] else ""}">{"<br>".join(parts)}</td>'


def paper_table_html(table: pd.DataFrame) -> str:
    """One model x budget table: rows = methods, columns = costs, benchmarks, Avg, Avg%.

    The FLOPs columns take the unit their magnitude needs (TFLOPs for LLaVA-1.5, MFLOPs for the toy)."""
    flops_cells = table[table["column"].isin(FLOPS_COLUMNS)]
    factor, unit = flops_unit_of(pd.concat([flops_cells["ours"], flops_cells["paper"]]))
    columns = list(COST_COLUMNS) + [c for c in dict.fromkeys(table["column"]) if c not in COST_COLUMNS]
    scores = table[table["kind"] == "score"]
    not_averaged = set(scores.loc[~scores["in_avg"].astype(bool), "column"])

    def header(column: str) -> str:
        if column in FLOPS_COLUMNS:
            return html.escape(column.replace("TFLOPs", unit))
        if column in (AVG, AVG_PCT, *COST_COLUMNS):
            return html.escape(column)
        return benchmark_header(column) + ('<br><span class="paper-col">points, not in Avg</span>'
                                           if column in not_averaged else "")

    headers = "".join(f"<th>{header(c)}</th>" for c in columns)
    rows = []
    for (method, budget), cells in table.groupby(["method", "budget"], sort=False):
        by_column = cells.set_index("column", drop=False)
        row_class = ' class="reference"' if bool(cells["reference"].iloc[0]) else ""
        label = html.escape(method) + ("" if budget == table["table_budget"].iloc[0] else f" ({html.escape(budget)})")
        tds = "".join(table_cell(by_column.loc[c], factor) if c in by_column.index else "<td>–</td>"
                      for c in columns)
        rows.append(f"<tr{row_class}><th>{label}</th>{tds}</tr>")
    return (f'<div class="wide"><table class="results"><thead><tr><th>method</th>{headers}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def paper_tables_section(tables: pd.DataFrame) -> str:
    if tables.empty:
        return '<p class="note">No headline scores to tabulate.</p>'
    parts = [
        '<p>Headline score per benchmark. <b>Bold</b>: best reduced method in the column. In brackets under '
        f'a score, Avg or Avg%: its {LEVEL:.0%} bootstrap interval over samples (see Findings). '
        'Under a cell: the paper\'s published number and our difference (ours − paper), where the '
        'model, method, budget and benchmark map onto the paper (budgets 192 / 128 / 64 ↔ its 3.3 / 2.4 / '
        '1.5 TFLOPs labels; vanilla ↔ its vanilla row; v4 numbers unless only v1 has the cell; hover for the '
        'version). Avg is over the row\'s benchmarks scored in percent (a score on another scale, such as '
        'MME\'s points, is marked "not in Avg"); Avg% divides it by vanilla\'s average over the same '
        'benchmarks; the paper\'s Avg and Avg% are recomputed over the same benchmarks. '
        '"TFLOPs exact" is what the model computes per sample (docs/flops.md); "TFLOPs overhead" the matrix '
        'products the method adds to select and merge tokens (scores, similarities, merges), not included in exact. '
        '"TFLOPs legacy" is the paper-style nominal label; the paper number beside it is the TFLOPs it printed.</p>',
        '<p class="note"><sup>†</sup> The paper scored VizWiz and VQAv2 on the servers\' test-dev splits; '
        'the project scores local validation splits, so these differences are not like for like. '
        'The paper\'s baseline rows were copied from other papers, and its 13B rows share one unstated '
        'budget, so reduced 13B runs have no paper numbers beside them.</p>',
    ]
    for model in sorted(tables["model"].unique()):
        model_tables = tables[tables["model"] == model]
        for budget in ordered_budgets(model_tables["table_budget"].unique()):
            table = model_tables[model_tables["table_budget"] == budget]
            parts.append(f'<h3 id="{anchor("table", model, budget)}">{html.escape(model)}, budget '
                         f'{html.escape(describe(budget))}</h3>')
            parts.append(paper_table_html(table))
    return "\n".join(parts)


def frame_html(frame: pd.DataFrame, float_decimals: int = 3) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for value in row:
            if isinstance(value, float):
                cells.append(f"<td>{fmt(value, float_decimals)}</td>")
            else:
                cells.append(f"<td>{'–' if pd.isna(value) else html.escape(str(value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<div class="wide"><table class="plain"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            '</table></div>')


def in_flops_unit(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The frame with its `tflops_*` columns in the unit their magnitude needs, renamed after it
    (`MFLOPs_exact`, ...); and the unit."""
    flops_columns = [column for column in frame.columns if column.startswith("tflops_")]
    factor, unit = flops_unit_of(frame[flops_columns].stack()) if flops_columns else (1.0, "TFLOPs")
    frame = frame.assign(**{column: frame[column] * factor for column in flops_columns})
    return frame.rename(columns={column: column.replace("tflops", unit) for column in flops_columns}), unit


def costs_section(results: pd.DataFrame, measure: pd.DataFrame) -> str:
    headline = results[results["headline"].fillna(False).astype(bool)]
    if headline.empty:
        return '<p class="note">No runs.</p>'
    costs = (headline.groupby(["model", "method", "budget"], as_index=False)
             .agg(benchmarks=("benchmark", "nunique"), visual_tokens=("visual_tokens_layer_avg", "mean"),
                  tflops_exact=("tflops_exact", "mean"), tflops_overhead=("tflops_overhead", "mean"),
                  tflops_prefill=("tflops_prefill", "mean"),
                  tflops_vision=("tflops_vision", "mean"), tflops_decode=("tflops_decode", "mean"),
                  tflops_legacy=("tflops_legacy", "mean"), eval_s_per_sample=("eval_s_per_sample", "mean"),
                  budget_tokens=("budget_tokens", "first"), tflops_predicted=("predicted_tflops", "first"),
                  tflops_first_token=("tflops_first_token", "mean")))
    targets = target_columns(costs)
    costs = costs.drop(columns=["tflops_first_token"])
    if targets.empty:
        costs = costs.drop(columns=["budget_tokens", "tflops_predicted"])
    else:                                             # beside the budget, where a reader looks first
        leading = ["model", "method", "budget", "budget_tokens", "convention", "tflops_target", "tflops_predicted",
                   "tflops_realised"]
        costs = costs.join(targets)
        costs = costs[leading + [column for column in costs.columns if column not in leading]]
    if len(measure):
        measured = measure[["model", "method", "budget", "prefill_s", "per_token_s", "end_to_end_s",
                            "peak_memory_bytes", "throughput"]]
        costs = costs.merge(measured, on=["model", "method", "budget"], how="outer")
        costs["peak_memory_gib"] = costs.pop("peak_memory_bytes") / 2**30
    costs = costs.assign(_vanilla=~costs["method"].map(is_vanilla)).sort_values(["model", "_vanilla", "method"])
    costs = costs.drop(columns="_vanilla").astype({"model": object, "method": object, "budget": object})
    costs, unit = in_flops_unit(costs)
    note = ("" if len(measure) else
            '<p class="note">No measure files: latency, memory and throughput columns are absent.</p>')
    target_note = ("" if "convention" not in costs else
                   f"<p>A TFLOPs budget's row shows the token budget it was solved into (budget_tokens), its target, the "
                   f"cost predicted for the model's typical prompt (its registry's text_tokens; 60 under the nominal "
                   f"convention), and the realised cost under the same convention ({unit}_realised: exact = vision + "
                   f"projector + prefill, the cost up to the first token; nominal = the paper-style label). Under the "
                   f"exact convention the two differ as far as the benchmark's prompts differ from the typical one.</p>")
    return (f"<p>Means over each job's benchmarks of the exact per-sample FLOPs in {unit} (vision + projector + "
            f"LLM prefill + decode; contracts §2, flops.md §7), beside it the selection overhead ({unit}_overhead: "
            "the matrix products the method adds to score, select and merge tokens, not part of exact), the "
            "paper-style nominal label, and the realised layer-averaged visual tokens; measured medians from the "
            "measure jobs, except beside an adaptive method's row: its measure job runs random weights on a "
            "synthetic image, which choose another token count than the evaluated one (the speedup figure shows "
            "that run at its own FLOPs).</p>" + target_note + note
            + frame_html(costs))


def target_columns(costs: pd.DataFrame) -> pd.DataFrame:
    """For the rows of TFLOPs budgets: target, convention and the realised cost under that convention
    (the prediction's counterpart); no columns at all when no row has a TFLOPs budget."""
    targets = costs["budget"].map(tflops_target)
    if targets.isna().all():
        return pd.DataFrame(index=costs.index)          # .empty: no rows of TFLOPs budgets
    convention = targets.map(lambda target: target.convention if target else None)
    realised = costs["tflops_first_token"].where(convention == "exact", costs["tflops_legacy"])
    return pd.DataFrame({"convention": convention,
                         "tflops_target": targets.map(lambda target: target.tflops if target else float("nan")),
                         "tflops_realised": realised.where(convention.notna())}, index=costs.index)


#: Failed samples named per job and reason in the Failures section.
FAILURE_EXAMPLES = 3


def failure_code(error: str) -> list[str]:
    """The reason codes of one failure record's `error`: `bad row: empty_question: '';missing_image`
    -> ["bad row: empty_question", "bad row: missing_image"]; any other error -> its exception type."""
    text = str(error)
    if text.startswith("bad row:"):
        parts = [part.strip() for part in text[len("bad row:"):].split(";") if part.strip()]
        return list(dict.fromkeys(f"bad row: {part.split(':', 1)[0].strip()}" for part in parts)) or ["bad row"]
    return [text.split(":", 1)[0].strip() or "error"]


def failed_records(metrics_path) -> list[dict] | None:
    """The failure records (those with an `error`) of one job's shard predictions; None when there are
    none to read."""
    records = read_predictions(metrics_path)
    return None if records is None else [record for record in records if record.get("error")]


def failure_reasons_frame(failed: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One row per job and reason code: failed samples and a few examples (id: full reason); plus how
    many jobs had no predictions to read."""
    rows, unread = [], 0
    for job in failed.itertuples(index=False):
        records = failed_records(job.source) if pd.notna(job.source) else None
        if records is None:
            unread += int(bool(pd.notna(job.failures) and job.failures))
            continue
        by_code: dict[str, list[dict]] = {}
        for record in records:
            for code in failure_code(record["error"]):
                by_code.setdefault(code, []).append(record)
        for code, members in sorted(by_code.items()):
            examples = "; ".join(f"{r.get('id')}: {str(r['error'])[:160]}" for r in members[:FAILURE_EXAMPLES])
            rows.append({"model": job.model, "method": job.method, "budget": job.budget, "benchmark": job.benchmark,
                         "reason": code, "samples": len(members), "examples": examples})
    columns = ["model", "method", "budget", "benchmark", "reason", "samples", "examples"]
    return pd.DataFrame(rows, columns=columns), unread


def failures_section(results: pd.DataFrame) -> str:
    """Jobs with failed samples or no headline score, then every failure reason of those jobs with
    its count and a few example samples (bad rows: `bad row: <code>`; generation errors: the
    exception type), read from the predictions beside each metrics.json."""
    headline = results[results["headline"].fillna(False).astype(bool)]
    failed = headline[(headline["failures"].fillna(0) > 0) | headline["value"].isna()]
    if failed.empty:
        return "<p>Every job scored every sample.</p>"
    columns = ["model", "method", "budget", "benchmark", "samples", "failures", "value", "source"]
    parts = ["<p>Jobs with failed samples or no headline score.</p>",
             frame_html(failed[columns].astype({c: object for c in columns if c != "value"}))]
    reasons, unread = failure_reasons_frame(failed)
    if len(reasons):
        parts.append("<p>Failed samples by reason. A bad row (an image that does not decode in full, an empty "
                     "question, missing or empty answers, bad metadata, text that is not UTF-8, ...) is "
                     "counted as a failure and left out of the score; see docs/benchmarks.md.</p>")
        parts.append(frame_html(reasons.astype(object)))
    if unread:
        parts.append(f'<p class="note">{unread} job(s) with failures have no shard predictions beside their '
                     "metrics.json, so their reasons are not listed.</p>")
    return "\n".join(parts)


def figures_section(figures: list[Figure]) -> str:
    parts = []
    for figure in figures:
        parts.append(f'<figure id="{anchor("figure", figure.key)}"><figcaption><b>{html.escape(figure.title)}.</b> '
                     f'{html.escape(figure.caption)}</figcaption>')
        if figure.note:
            parts.append(f'<p class="note">Not drawn: {html.escape(figure.note)}.</p>')
        else:
            data = base64.b64encode(Path(figure.path).read_bytes()).decode("ascii")
            parts.append(f'<img alt="{html.escape(figure.title)}" src="data:image/png;base64,{data}">')
        parts.append("</figure>")
    return "\n".join(parts)


def data_section(results: pd.DataFrame) -> str:
    headline = results[results["headline"].fillna(False).astype(bool)]
    columns = ["model", "method", "phase", "budget", "benchmark", "metric", "value", "samples", "failures",
               "tflops_exact", "tflops_overhead", "tflops_legacy", "visual_tokens_layer_avg"]
    numbers = ("value", "tflops_exact", "tflops_overhead", "tflops_legacy", "visual_tokens_layer_avg")
    frame, unit = in_flops_unit(headline[columns].astype({c: object for c in columns if c not in numbers}))
    return (f"<p>{len(results)} rows in the tidy table (results.csv / results.parquet), {len(headline)} jobs. "
            f"The headline rows (FLOPs per sample in {unit}; results.csv keeps TFLOPs):</p><details><summary>show the table</summary>" + frame_html(frame) + "</details>")


def toy_models_frame(manifests: dict[str, dict]) -> pd.DataFrame:
    """One row per trained toy model of the run: how it was built and where its tower's CLS attends."""
    rows = []
    for model, manifest in sorted(manifests.items()):
        training = manifest.get("training_result")
        if manifest.get("source") != "toy" or not training:
            continue
        cls = training.get("cls") or {}
        clip = (training.get("stages") or {}).get("clip") or {}
        percent = {key: 100 * cls[key] for key in ("cls_share_on_objects", "object_patch_share") if key in cls}
        rows.append({
            "model": model,
            "recipe": (manifest.get("request", {}).get("training") or {}).get("recipe", "end-to-end"),
            "training (s)": training.get("seconds"),
            "held-out accuracy (%)": training.get("val_accuracy"),
            "CLS attention on object patches (%)": percent.get("cls_share_on_objects"),
            "object patches' share of all patches (%)": percent.get("object_patch_share"),
            "× their share": cls.get("ratio"),
            "tower's image → caption retrieval (%)": clip.get("retrieval_accuracy"),
        })
    return pd.DataFrame(rows)


def toy_models_section(manifests: dict[str, dict], findings: pd.DataFrame) -> str | None:
    """"About the toy model": None when no toy model of the run was trained.

    findings: `tables.paper_findings` of the run's toy models.
    """
    frame = toy_models_frame(manifests)
    if frame.empty:
        return None
    toy_findings = findings[findings["model"].isin(frame["model"])]
    if toy_findings.empty:
        reproduced = ("<p>No method pair of this run has a consistent ordering in the paper and scores at three "
                      "budgets (it needs a FiCoCo method and a baseline the paper prints at all three budgets, each "
                      "with a mean over every benchmark, on vanilla's samples, at three of this run's budgets).</p>")
    else:
        count = int(toy_findings["reproduced"].sum())
        reproduced = (f"<h3>What this run reproduces of the paper's findings</h3><p>Of the paper's "
                      f"{len(toy_findings)} FiCoCo-against-baseline orderings that hold at all three of its "
                      f"LLaVA-1.5-7B budgets (printed Avg) and that this run can judge, it reproduces {count} "
                      "at all three (each pair's scores at the three largest budgets both methods scored, paired with "
                      "the paper's by rank; a pair missing a budget, or scored there on other samples than vanilla's, "
                      "is not judged).</p>"
                      + frame_html(toy_findings.assign(reproduced=toy_findings["reproduced"].map(
                          {True: "yes", False: "no"})).astype(object)))
    return ("<p>The toy model is trained on the synthetic world (docs/toy.md). The CLS-reading methods "
            "(FiCoCo-V's semantic term, EViT, TopK-CLS, VisionZip, PruMerge) assume that the tower's CLS "
            "attends to the content: the share of the feature layer's CLS attention (head mean) on the "
            "object patches says how far this tower does; a tower trained inside LLaVA (recipe end-to-end) "
            "gives CLS no purpose, a CLIP-style pretrained one (recipe staged) does. Held-out accuracy: "
            "validation rows, unreduced. A dash: not recorded by the build.</p>"
            + frame_html(frame.astype({"model": object, "recipe": object}), float_decimals=1) + reproduced)


def overview_section(results: pd.DataFrame, measure: pd.DataFrame) -> str:
    headline = results[results["headline"].fillna(False).astype(bool)]

    def names(column: str) -> str:
        return ", ".join(html.escape(str(v)) for v in sorted(headline[column].unique())) or "–"

    return (f"<ul><li>models: {names('model')}</li><li>methods: {names('method')}</li>"
            f"<li>budgets: {', '.join(map(describe, ordered_budgets(headline['budget'].unique()))) or '–'}</li>"
            f"<li>benchmarks: {names('benchmark')}</li><li>jobs: {len(headline)}; measure files: {len(measure)}</li>"
            "</ul><p>Budgets are average visual tokens per LLM decoder layer; \"full\" is unreduced; "
            "\"adaptive\" is an adaptive method's one run (a count per image; see its realised visual tokens); "
            "a TFLOPs target (\"2.4 TFLOPs (exact)\") runs, for each method, the token budget whose predicted "
            "cost is closest to it (the costs section shows that budget, the prediction and the realised cost). "
            "Costs are computed from the token counts each run executed, never from a label.</p>"
            + data_caveats_html(headline))


def data_caveats_html(headline: pd.DataFrame) -> str:
    """Scores that are not of the benchmark as pinned: jobs that ran on its first rows only (the config's `limit`),
    and benchmarks read from their fallback namespace (unpinned). Empty when there are none."""
    notes = []
    limited = headline[headline["rows_limit"].notna()]
    for limit, group in limited.groupby("rows_limit", sort=True):
        notes.append(f"{len(group)} of {len(headline)} jobs ran on the first {int(limit)} rows of their benchmark "
                     f"only (the config's <code>limit</code>): their scores are of those rows, not of the benchmark, "
                     f"and not comparable with published numbers.")
    fallback = headline[headline["fallback_data"].notna()]
    for (benchmark, data), group in fallback.groupby(["benchmark", "fallback_data"], sort=True):
        jobs = f"{len(group)} job" + ("s" if len(group) != 1 else "")
        notes.append(f"{html.escape(str(benchmark))} ({jobs}) was read from its fallback "
                     f"<code>{html.escape(str(data))}</code>, not from the pinned revision of its registry entry: "
                     f"the rows may differ from the pinned ones.")
    return "".join(f'<p class="note"><b>Data:</b> {note}</p>' for note in notes)


# ---------------------------------------------------------------------------------------------- findings


def findings_section(tables: pd.DataFrame, points: pd.DataFrame, boot: Bootstrap, results: pd.DataFrame) -> str:
    """What the run found (findings.py), each number with its interval; `points` are
    `findings.accuracy_points(tables)`, which the figures draw too."""
    if tables.empty:
        return '<p class="note">No headline scores: nothing to report.</p>'
    by_path = pd.Series(boot.paths, dtype=object).value_counts()
    benchmark_path = int(by_path.get("benchmark", 0))
    parts = [f"<p>Intervals are {boot.level:.0%} percentile intervals of a bootstrap over samples (up to "
             f"{boot.most_replicates()} resamples, seeded): every method of a model and benchmark is scored on the "
             "same resamples, so a difference between two methods is paired, and Avg% is paired with vanilla. A "
             "difference is called <b>real</b> when its interval excludes 0, <b>within noise</b> otherwise. "
             + (f"{benchmark_path} job(s) whose headline is not a mean per-sample score (e.g. POPE's F1, MME's "
                "acc + acc+) are recomputed by their benchmark's own aggregate on the first resamples "
                "(docs/report.md)." if benchmark_path else "") + "</p>"]
    parts += frontier_html(points)
    best = findings.best_per_budget(tables, boot)
    parts.append(f'<h3 id="{anchor("findings", "best")}">Best method per budget</h3>')
    parts.append("<p>The reduced method with the highest Avg at each budget, the methods whose paired "
                 "difference from it is within noise, and those with no Avg, which are not ranked: a benchmark "
                 "without a score, or one scored on other samples than vanilla's (other samples failed).</p>")
    parts.append(frame_html(interval_columns(best, "Avg").astype(object), float_decimals=1))
    parts += versus_html(findings.ficoco_against_best_baseline(tables, boot))
    parts += paper_comparison_html(*findings.paper_differences(tables))
    parts += failures_summary_html(results)
    if len(boot.skipped):
        parts.append(f'<h3 id="{anchor("findings", "no-interval")}">Jobs without an interval</h3>')
        parts.append(frame_html(boot.skipped.astype(object)))
    return "\n".join(parts)


def interval_columns(frame: pd.DataFrame, value: str, signed_value: bool = False) -> pd.DataFrame:
    """`value` shown with its interval (from `low`, `high`), those two columns dropped."""
    shown = [with_interval(v, low, high, signed_value=signed_value)
             for v, low, high in zip(frame[value], frame["low"], frame["high"])]
    return frame.assign(**{value: shown}).drop(columns=["low", "high"])


def frontier_html(points: pd.DataFrame) -> list[str]:
    parts = [f'<h3 id="{anchor("findings", "frontier")}">Pareto frontier</h3>']
    if points.empty:
        return parts + ['<p class="note">No run has both an accuracy and exact FLOPs.</p>']
    for model, group in points.groupby("model", sort=True):
        factor, unit = flops_unit_of(group["tflops"])
        front = group[group["on_frontier"]].sort_values("tflops")
        measure = group["measure"].iloc[0]
        steps = "; ".join(f"<b>{html.escape(job_label(row.method, row.budget))}</b> "
                          f"({row.tflops * factor:.2f} {unit}, {with_interval(row.accuracy, row.low, row.high)})"
                          for row in front.itertuples())
        parts.append(f"<p>{html.escape(model)}: {len(front)} of {len(group)} runs are on the frontier of {measure} "
                     f"against exact {unit} per sample (no other run costs no more and scores at least as high), "
                     f"cheapest first: {steps}.</p>")
    return parts


def versus_html(versus: pd.DataFrame) -> list[str]:
    parts = [f'<h3 id="{anchor("findings", "ficoco")}">FiCoCo against the best baseline</h3>']
    if versus.empty:
        return parts + ['<p class="note">No budget has both a FiCoCo method and a baseline.</p>']
    sentences = []
    for row in versus.to_dict("records"):
        difference = with_interval(row["difference"], row["low"], row["high"], signed_value=True)
        judged = {"ahead": "ahead: a real difference", "behind": "behind: a real difference",
                  "within noise": "within noise", "no interval": "no interval"}[row["verdict"]]
        sentences.append(f"<li>{html.escape(str(row['model']))}, budget {html.escape(describe(str(row['budget'])))}: "
                         f"{html.escape(row['FiCoCo'])} against {html.escape(row['best baseline'])}: {difference} "
                         f"points of Avg ({judged}).</li>")
    shown = interval_columns(versus, "difference", signed_value=True)
    return parts + [f"<ul>{''.join(sentences)}</ul>", frame_html(shown.astype(object), float_decimals=1)]


def paper_comparison_html(outside: pd.DataFrame, compared: int) -> list[str]:
    parts = [f'<h3 id="{anchor("findings", "paper")}">Against the paper</h3>']
    scope = ("Judged here: the paper's rows at our setting, its vanilla and its own FiCoCo-V (whose labels the "
             "authors equate with the tokens it delivers), on the benchmarks it scored locally, from runs of every "
             "row of the pinned data. Its baseline rows were copied from other papers' settings, and its in-LLM "
             "methods' TFLOPs labels are not our layer averages: the tables show them beside ours, unjudged.")
    if compared == 0:
        return parts + ["<p>No score of this run both maps onto such a cell of the paper's tables and has an "
                        f"interval. {scope}</p>"]
    parts.append(f"<p>{len(outside)} of the {compared} scores that map onto the paper differ from its number by "
                 f"more than our interval (the paper's number lies outside it). {scope}</p>")
    if len(outside):
        parts.append(frame_html(interval_columns(outside, "ours").astype(object), float_decimals=1))
    return parts


def failures_summary_html(results: pd.DataFrame) -> list[str]:
    headline = results[results["headline"].fillna(False).astype(bool)]
    failed = headline[headline["failures"].fillna(0) > 0]
    parts = [f'<h3 id="{anchor("findings", "failures")}">Failures</h3>']
    if failed.empty:
        return parts + [f"<p>Every one of the {len(headline)} jobs scored every sample.</p>"]
    return parts + [f'<p>{int(failed["failures"].sum())} failed samples in {len(failed)} of {len(headline)} jobs '
                    '(<a href="#failures">Failures</a> lists them by reason).</p>']

"""Aggregate every run into the tidy results table, then render paper-style tables, seaborn figures
and one self-contained HTML page; the W&B aggregate run logs the table and the figures.

CLI entry points (see docs/report.md):
    ficoco aggregate --results results/ --out results/summary/
    ficoco aggregate --metrics <metrics.json ...> --measures <measure json ...> --out results/summary/
    ficoco report --summary results/summary/ --out report/report.html
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from ficoco.report.aggregate import (Summary, build_summary, find_measure_files, find_metrics_files, read_summary,
                                     write_summary)
from ficoco.report.intervals import BENCHMARK_REPLICATES, REPLICATES

__all__ = ["main_aggregate", "main_report", "aggregate_results", "render_report",
           "Summary", "build_summary", "read_summary"]


def aggregate_results(metrics_files, measure_files, out_dir: str | Path) -> Summary:
    summary = build_summary(list(metrics_files), list(measure_files))
    write_summary(summary, out_dir)
    return summary


def main_aggregate(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ficoco aggregate",
                                     description="Collect every metrics.json (and measure JSON) into the tidy table.")
    parser.add_argument("--results", help="results directory to search (runs/*/*/*/b*/metrics.json, "
                                          "measure/*/*/b*.json); default results/ unless --metrics is given")
    parser.add_argument("--metrics", nargs="*", default=None, help="metrics.json files (instead of searching)")
    parser.add_argument("--measures", nargs="*", default=None, help="measure JSON files (instead of searching)")
    parser.add_argument("--out", default="results/summary", help="output directory (default results/summary)")
    args = parser.parse_args(argv)
    results_dir = args.results or ("results" if args.metrics is None else None)
    metrics = args.metrics if args.metrics is not None else find_metrics_files(results_dir)
    if args.measures is not None:
        measures = args.measures
    else:
        measures = find_measure_files(results_dir) if results_dir else []
    try:
        summary = aggregate_results(metrics, measures, args.out)
    except ValueError as error:
        print(f"ficoco aggregate: {error}", file=sys.stderr)
        return 1
    jobs = int(summary.results["headline"].sum())
    print(f"aggregate: {jobs} jobs, {len(summary.results)} rows, {len(summary.measure)} measure files -> {args.out}")
    return 0


def render_report(summary_dir: str | Path, out: str | Path, figures_dir: str | Path | None = None,
                  template: str | Path | None = None, paper_version: str = "v4", title: str = "ficoco report",
                  wandb_dir: str | Path | None = None, model_manifests=(),
                  replicates: int = REPLICATES, benchmark_dirs: dict[str, Path] | None = None,
                  benchmark_replicates: int = BENCHMARK_REPLICATES) -> Path:
    """Write the page `out`, the PNGs and paper_tables.csv (in `figures_dir`), log them to W&B; return `out`.

    model_manifests: the run's `resources/models/<model>/manifest.json` files; trained toy models get
    an "About the toy model" section. replicates: bootstrap resamples behind every interval;
    benchmark_replicates: how many of them a headline that is not a mean is recomputed on (intervals.py).
    benchmark_dirs: benchmark name -> its fetched directory, for the drill-down's questions and images.
    """
    from ficoco.report import drilldown, files, findings, intervals, page, paper, plots, tables, wandb_log

    out = Path(out)
    figures_dir = Path(figures_dir) if figures_dir else Path(summary_dir).parent / "report"
    template = Path(template) if template else page.default_template()
    if not template.is_file():
        raise ValueError(f"report template {template} not found; pass --template PATH")
    summary = read_summary(summary_dir)
    reference = paper.paper_reference(paper.load_paper_results(), paper_version)
    headline = tables.headline_scores(summary.results)
    boot = intervals.bootstrap(summary.samples, headline, replicates=replicates,
                               benchmark_replicates=benchmark_replicates)
    paper_tables = tables.paper_tables(summary.results, reference, boot)
    files.write_csv(paper_tables, figures_dir / "paper_tables.csv")
    points = findings.accuracy_points(paper_tables)
    figures = plots.make_figures(headline, points, paper_tables, summary.schedules, summary.measure, figures_dir)
    toy_models = page.toy_models_section(read_model_manifests(model_manifests),
                                         tables.paper_findings(headline, reference))
    sections = [
        ("overview", "Overview", page.overview_section(summary.results, summary.measure)),
        ("findings", "Findings", page.findings_section(paper_tables, points, boot, summary.results)),
        *([("toy-model", "About the toy model", toy_models)] if toy_models else []),
        ("tables", "Accuracy tables (paper style)", page.paper_tables_section(paper_tables)),
        ("figures", "Figures", page.figures_section(figures)),
        ("costs", "Costs, latency and memory", page.costs_section(summary.results, summary.measure)),
        ("disagreements", "Disagreement drill-down",
         drilldown.disagreement_section(summary.samples, benchmark_dirs or {})),
        ("failures", "Failures", page.failures_section(summary.results)),
        ("data", "Data", page.data_section(summary.results)),
    ]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    files.write_text(out, page.render(template.read_text(encoding="utf-8"), title, generated, sections))
    run_dir = Path(wandb_dir) if wandb_dir else Path(summary_dir).parent / "wandb" / "aggregate"
    wandb_log.log_report(summary.results, paper_tables, figures, run_dir=run_dir,
                         config={"summary_dir": str(summary_dir), "paper_version": paper_version})
    return out


def read_model_manifests(paths) -> dict[str, dict]:
    """model name (its directory's name) -> manifest, for `resources/models/<model>/manifest.json` paths."""
    import json

    manifests = {}
    for path in map(Path, paths):
        try:
            manifests[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"model manifest {path} cannot be read ({error}); valid: the JSON file fetch_model "
                             f"or build_toy_model writes") from error
    return manifests


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def main_report(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ficoco report", description="Render the HTML report from the summary.")
    parser.add_argument("--summary", default="results/summary", help="directory written by `ficoco aggregate`")
    parser.add_argument("--out", default="report/report.html", help="the HTML page (default report/report.html)")
    parser.add_argument("--figures", default=None, help="directory for the PNGs and paper_tables.csv "
                                                        "(default: <summary>/../report, i.e. results/report)")
    parser.add_argument("--template", default=None, help="HTML template (default: report/template.html)")
    parser.add_argument("--paper-version", default="v4", choices=["v4", "v1"],
                        help="which paper version's numbers to show where both have the cell (default v4)")
    parser.add_argument("--title", default="ficoco report")
    parser.add_argument("--wandb-dir", default=None,
                        help="where the W&B aggregate run writes (default: <summary>/../wandb/aggregate)")
    parser.add_argument("--model-manifests", nargs="*", default=[],
                        help="the run's resources/models/<model>/manifest.json (toy models get an 'About' section)")
    parser.add_argument("--benchmark-manifests", nargs="*", default=[],
                        help="the run's resources/benchmarks/<benchmark>/manifest.json (the drill-down shows "
                             "their questions and images)")
    parser.add_argument("--replicates", type=positive_int, default=REPLICATES,
                        help=f"bootstrap resamples behind every interval (default {REPLICATES})")
    parser.add_argument("--benchmark-replicates", type=positive_int, default=BENCHMARK_REPLICATES,
                        help="resamples on which a headline that is not a mean per-sample score (POPE, MME, MMBench, "
                             f"LLaVA-W) is recomputed by its benchmark, about 4 s per POPE job at the default "
                             f"{BENCHMARK_REPLICATES}")
    args = parser.parse_args(argv)
    try:
        out = render_report(args.summary, args.out, args.figures, args.template, args.paper_version, args.title,
                            args.wandb_dir, args.model_manifests, args.replicates,
                            {Path(path).parent.name: Path(path).parent for path in args.benchmark_manifests},
                            args.benchmark_replicates)
    except ValueError as error:
        print(f"ficoco report: {error}", file=sys.stderr)
        return 1
    print(f"report: {out.resolve()}")
    return 0

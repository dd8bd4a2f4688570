"""The whole pipeline's output, checked: a small toy grid run through Snakemake from an empty results
folder, then the numbers it produced, the W&B runs it wrote and the report a browser shows.

The grid has methods of every phase (vision, projector, LLM, both, an adaptive one) at two budgets,
the unreduced model, and a row limit. Every check compares against an independent source: the
plan `ficoco grid --json` prints, the prompt length the processor gives, vanilla's own counts,
or the summary table the report is rendered from.
"""
from __future__ import annotations

import json
import re
import subprocess
from html.parser import HTMLParser

import pandas as pd
import pytest

from pipeline import GOLDEN_BUDGETS, GOLDEN_LIMIT, GOLDEN_METHODS, planned_jobs, read_jsonl

METHODS, BUDGETS, LIMIT = GOLDEN_METHODS, GOLDEN_BUDGETS, GOLDEN_LIMIT


@pytest.fixture(scope="module")
def golden(golden_run):
    repo, config = golden_run
    jobs = planned_jobs(repo, config)
    records = {}
    for job in jobs:
        shard = (repo / "results/runs" / job["model"] / job["benchmark"] / job["method"] / f"b{job['budget']}" /
                 f"shard{job['shard']}of{job['shards']}" / "predictions.jsonl")
        records[job["method"], job["budget"]] = read_jsonl(shard)
    summary = pd.read_csv(repo / "results/summary/results.csv", dtype={"budget": str})
    for job in jobs:
        if job["planned"]["fitted"]:
            job["planned"] = fitted_plan(repo, job)
    return {"repo": repo, "config": config, "jobs": jobs, "records": records, "summary": summary}


def fitted_plan(repo, job: dict) -> dict:
    """A calibrated job's plan from its calibration artifact (the grid lists it as fitted): the visual
    tokens each layer's attention sees, counted here from the fitted deletions."""
    artifact = json.loads((repo / "results/calibration" / job["model"] / job["method"] /
                           f"b{job['budget']}.json").read_text())
    n0, deletions = job["planned"]["visual_tokens"], artifact["fit"]["deletions"]
    attention_sees = [n0 - sum(deletions[:layer]) for layer in range(len(deletions))]
    assert artifact["budget"] == int(job["budget"]) and 0 < min(attention_sees)
    assert sum(attention_sees) / len(attention_sees) <= int(job["budget"]) < n0
    assert artifact["fit"]["layer_average"] == pytest.approx(sum(attention_sees) / len(attention_sees))
    return {**job["planned"], "delivered": n0, "llm_visual": attention_sees}


def ran(records: list[dict]) -> list[dict]:
    return [record for record in records if not record.get("error")]


def test_every_job_ran_every_row(golden):
    assert {job["method"] for job in golden["jobs"]} == set(METHODS)
    for (method, budget), records in golden["records"].items():
        assert len(records) == LIMIT and len(ran(records)) == LIMIT, (method, budget)


def test_vanilla_counts_are_the_full_prompt_in_every_layer(golden):
    """Vanilla's recorded lengths equal the processor's prompt length, computed here from the rows."""
    from transformers import AutoProcessor

    from ficoco import benchmarks
    from ficoco.benchmarks.fetch import load_local

    repo = golden["repo"]
    vanilla = next(job for job in golden["jobs"] if job["method"] == "vanilla")
    visual = vanilla["planned"]["visual_tokens"]
    processor = AutoProcessor.from_pretrained(repo / "resources/models/toy-llava", local_files_only=True)
    dataset, _ = load_local(repo / "resources/benchmarks/toy-shapes-mini")
    bench = benchmarks.get("toy-shapes")
    template = "USER: <image>\n{prompt} ASSISTANT:"
    for record in golden["records"]["vanilla", "full"]:
        row = dataset[record["row"]]
        text = template.replace("{prompt}", bench.prompt(row, {}))
        prompt_length = processor(images=[row["image"].convert("RGB")], text=[text], return_tensors="pt")[
            "input_ids"].shape[1]
        counts = record["counts"]
        assert counts["visual_delivered"] == visual
        assert counts["llm"] == [prompt_length] * len(counts["llm"])
        assert counts["llm_visual"] == [visual] * len(counts["llm"])


def test_realised_visual_tokens_per_layer_equal_each_schedule(golden):
    vanilla = {record["id"]: record["counts"] for record in golden["records"]["vanilla", "full"]}
    for job in golden["jobs"]:
        planned = job["planned"]
        for record in ran(golden["records"][job["method"], job["budget"]]):
            counts = record["counts"]
            full = vanilla[record["id"]]
            if planned["llm_visual"] is None:                     # adaptive: one count per image
                delivered = counts["visual_delivered"]
                assert 0 < delivered < planned["visual_tokens"], (job["method"], delivered)
                assert counts["llm_visual"] == [delivered] * len(counts["llm"])
            else:
                assert counts["llm_visual"] == planned["llm_visual"], (job["method"], job["budget"])
                assert counts["visual_delivered"] == planned["delivered"]
            # the text tokens are untouched: every layer's length is vanilla's minus the visual tokens removed
            removed = [planned["visual_tokens"] - visual for visual in counts["llm_visual"]]
            assert counts["llm"] == [length - cut for length, cut in zip(full["llm"], removed)]


def test_exact_flops_are_positive_below_vanilla_and_fall_with_the_budget(golden):
    headline = golden["summary"][golden["summary"]["headline"].astype(bool)]
    flops = {(row.method, row.budget): row.tflops_exact for row in headline.itertuples()}
    assert all(value > 0 for value in flops.values()), flops
    vanilla = flops["vanilla", "full"]
    for (method, budget), value in flops.items():
        if method != "vanilla":
            assert value < vanilla, (method, budget, value, vanilla)
    high, low = (str(budget) for budget in sorted(BUDGETS, reverse=True))
    budgeted = {method for method, budget in flops if budget == high}
    assert len(budgeted) == len(METHODS) - 2                        # all but vanilla and the adaptive one
    for method in budgeted:
        assert flops[method, low] < flops[method, high], method
    for (method, budget), records in golden["records"].items():     # every sample, not only the mean
        for record in ran(records):
            cost = record["cost"]
            assert cost["total_flops"] > 0 and cost["prefill_flops"] > 0 and cost["vision_flops"] > 0, method


def test_selection_overhead_is_recorded_and_reported_beside_exact_flops(golden):
    """Every sample records its overhead; vanilla and FitPrune add none, every other method of the grid
    scores or merges with matrix products; the summary's tflops_overhead is the mean of the samples' costs."""
    headline = golden["summary"][golden["summary"]["headline"].astype(bool)].set_index(["method", "budget"])
    for (method, budget), records in golden["records"].items():
        samples = ran(records)
        for record in samples:
            macs = record["counts"]["overhead_macs"]
            assert record["cost"]["overhead_flops"] == 2 * macs, method
            # FitPrune sums the probabilities its layers' attention computes anyway: no product
            assert (macs == 0) if method in ("vanilla", "fitprune") else (macs > 0), (method, budget, macs)
        mean = sum(record["cost"]["overhead_flops"] for record in samples) / len(samples) / 1e12
        assert headline.loc[(method, str(budget)), "tflops_overhead"] == pytest.approx(mean, rel=1e-6), method


def test_summary_has_accuracy_latency_and_failure_columns(golden):
    summary = golden["summary"]
    for column in ("value", "failures", "eval_s_per_sample", "prefill_s", "end_to_end_s", "tflops_exact"):
        assert column in summary.columns, column
    headline = summary[summary["headline"].astype(bool)]
    assert headline["value"].notna().all() and (headline["failures"] == 0).all()
    assert (headline["eval_s_per_sample"] > 0).all()
    measured = headline[headline["method"] == "vanilla"]                # the one measured method
    assert len(measured) == 1 and (measured["prefill_s"] > 0).all() and (measured["end_to_end_s"] > 0).all()


def test_one_wandb_offline_run_per_evaluate_job_and_one_for_aggregate(golden):
    repo = golden["repo"]
    evaluate_runs = sorted((repo / "results/runs").glob("**/wandb/offline-run-*"))
    assert len(evaluate_runs) == len(golden["jobs"]), [str(path) for path in evaluate_runs]
    aggregate_runs = sorted((repo / "results/wandb").glob("aggregate/**/offline-run-*"))
    assert len(aggregate_runs) == 1, [str(path) for path in aggregate_runs]


class TableText(HTMLParser):
    """The text of every cell of every `table.results`, row by row."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.headings: list[str] = []            # the last <h3> before each table ("model, budget B")
        self._heading: list[str] | None = None
        self._last_heading = ""
        self._depth = 0
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "h3":
            self._heading = []
        elif tag == "table" and ("class", "results") in attrs:
            self.tables.append([])
            self.headings.append(self._last_heading)
            self._depth = 1
        elif self._depth and tag == "tr":
            self._row = []
        elif self._depth and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "h3" and self._heading is not None:
            self._last_heading = "".join(self._heading).strip()
            self._heading = None
        if not self._depth:
            return
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None
        elif tag == "table":
            self._depth = 0

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._heading is not None:
            self._heading.append(data)


def test_the_report_in_chromium_shows_the_same_nonzero_numbers(golden):
    """The page as headless Chromium renders it: each results table's FLOPs column shows the summary's
    mean exact FLOPs in the table's unit, and none of them reads 0."""
    page = golden["repo"] / "report/report.html"
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and "</html>" in dom.stdout, dom.stderr[-2000:]
    parser = TableText()
    parser.feed(dom.stdout)
    assert parser.tables
    headline = golden["summary"][golden["summary"]["headline"].astype(bool)]
    factors = {"TFLOPs": 1.0, "GFLOPs": 1e3, "MFLOPs": 1e6}
    checked = 0
    for heading, table in zip(parser.headings, parser.tables):
        table_budget = heading.rsplit("budget ", 1)[1]
        header = table[0]
        column = next(i for i, name in enumerate(header) if re.fullmatch(r"[TGM]FLOPs exact", name))
        factor = factors[header[column].split()[0]]
        for row in table[1:]:
            label = row[0]                                  # "method", or "method (its budget)"
            method, _, budget = label.partition(" (")
            budget = budget.rstrip(")") or table_budget
            shown = float(row[column].split()[0])
            expected = headline.loc[(headline["method"] == method) & (headline["budget"] == budget), "tflops_exact"]
            assert len(expected) == 1, (label, table_budget)
            assert shown > 0 and shown == round(float(expected.iloc[0]) * factor, 2), (label, shown, expected)
            checked += 1
    assert checked >= len(golden["jobs"])


def test_every_evaluate_log_starts_with_the_environment(golden):
    """Each job ran in a warm child (the grid runs under `ficoco warm`), then `ficoco doctor` at the head of its
    log: versions, the adapter self-check, the W&B mode."""
    logs = sorted((golden["repo"] / "logs/evaluate").glob("**/*.log"))
    assert len(logs) == len(golden["jobs"])
    for log in logs:
        head = log.read_text().splitlines()[:20]
        assert head[0].startswith("ficoco warm: running in a warm child (pid "), (log, head[:3])
        head = head[1:]
        assert head[0].startswith("ficoco doctor: python: "), (log, head[:3])
        assert any(line.startswith("ficoco doctor: transformers: ") and "(tested;" in line for line in head), log
        # the self-check of the job's model's adapter only (the toy model is a LLaVA)
        assert "ficoco doctor: adapter self-check (LLaVA): passed" in " ".join(head), log
        assert "Qwen2-VL" not in " ".join(head), log
        assert "ficoco doctor: wandb mode: offline" in " ".join(head), log

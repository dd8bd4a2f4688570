"""The report's "Disagreement drill-down": the samples on which the runs of one model disagree most.

Averages hide *which* samples a reduction method loses. For each (model, benchmark) this section
picks the samples whose per-job scores (one job = one method x budget) spread the most, and shows
each with its image (a small inline thumbnail), question, reference answers and the predictions of
every job, grouped by identical text so that 25 methods x 4 budgets stay readable.

Input is the per-sample table (`aggregate.SAMPLE_COLUMNS`, `Summary.samples`) and the fetched
benchmark directories (question text and images come from there). A benchmark whose directory is
missing or unreadable is still shown, without question and image, with a note saying why: the
report never fails because of this section.

Everything is html-escaped; images are base64 data URIs; the only markup is classes for the
template's CSS (`drill`, `thumb`, ...); the page gets no links and no scripts.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ficoco.report.aggregate import SAMPLE_COLUMNS
from ficoco.report.tables import is_vanilla, job_label, ordered_benchmarks, ordered_budgets, ordered_methods

#: A job counts as right on a sample when its score is at least this (binary scores: the right ones;
#: VQA accuracy min(#annotators/3, 1): two annotators or more).
RIGHT_SCORE = 0.5
#: Disagreements are rounded to this many decimals before ranking, so that float noise in the
#: standard deviation never decides the order of two equally split samples.
RANK_DECIMALS = 9
#: Predictions longer than this are cut in the page (grouping uses the full text).
SHOWN_PREDICTION_CHARACTERS = 240
#: A load error named in a note is cut to this many characters.
SHOWN_ERROR_CHARACTERS = 200
JOB_KEYS = ["model", "benchmark", "method", "budget", "id"]
SAMPLE_KEYS = ["model", "benchmark", "id"]
FRAME_COLUMNS = ["model", "benchmark", "id", "row", "answers", "disagreement", "vanilla_score",
                 "correct_jobs", "scored_jobs"]


# ---------------------------------------------------------------------------------------------- selecting


def job_records(samples: pd.DataFrame | None) -> pd.DataFrame:
    """The per-sample table with every `SAMPLE_COLUMNS` column (missing ones NA), one row per job x
    sample: a repeated record of one job (a shard run twice) is kept once, the first by journal path,
    so that no job votes twice."""
    if samples is None:
        samples = pd.DataFrame()
    frame = samples.reindex(columns=list(SAMPLE_COLUMNS)).astype(SAMPLE_COLUMNS)
    frame = frame.sort_values(["predictions"], kind="mergesort", na_position="last")
    return frame.drop_duplicates(subset=JOB_KEYS, keep="first").reset_index(drop=True)


def sample_statistics(jobs: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, benchmark, id): the spread of the jobs' scores and how vanilla fared.

    disagreement = population standard deviation of the scores of the jobs that scored the sample
    (failed jobs, NaN, left out): 0 when every job scored it the same, 0.5 at most (half the jobs
    fully right, half fully wrong). It needs no majority, so it works for fractional scores too."""
    scores = jobs["score"].astype("float64")
    work = jobs.assign(
        score=scores,
        right=(scores >= RIGHT_SCORE).astype("int64"),
        vanilla=scores.where(jobs["method"].map(lambda m: pd.notna(m) and is_vanilla(str(m))).astype(bool)),
    )
    stats = work.groupby(SAMPLE_KEYS, sort=False, dropna=False).agg(
        row=("row", "first"), answers=("answers", "first"),
        disagreement=("score", lambda s: s.dropna().std(ddof=0) if s.notna().sum() else float("nan")),
        vanilla_score=("vanilla", "mean"), correct_jobs=("right", "sum"), scored_jobs=("score", "count"),
    ).reset_index()
    stats["disagreement"] = stats["disagreement"].astype("float64").round(RANK_DECIMALS)
    return stats.astype({"row": "Int64", "correct_jobs": "int64", "scored_jobs": "int64"})


def disagreement_frame(samples: pd.DataFrame, per_benchmark: int = 24) -> pd.DataFrame:
    """For each (model, benchmark), the up to `per_benchmark` samples on which the jobs disagree most.

    disagreement: the population standard deviation of the per-job scores of a sample, failed jobs
    left out (see `sample_statistics`); only samples scored by at least 2 jobs and with a
    disagreement above 0 are kept. Equal disagreements (for binary scores: the same split, e.g.
    3 right of 10 and 7 right of 10) are ordered so the most telling sample comes first: vanilla
    right before vanilla wrong (no vanilla last), then fewer jobs right (vanilla right but most
    reduced runs wrong is the case a reader is looking for), then by id: the order never depends
    on the input's row order.

    Columns: model, benchmark, id, row, answers, disagreement, vanilla_score (NaN without a scored
    vanilla job), correct_jobs (score >= RIGHT_SCORE), scored_jobs; models alphabetically,
    benchmarks in the paper's order, samples most disagreeing first.
    """
    stats = sample_statistics(job_records(samples))
    chosen = stats[(stats["scored_jobs"] >= 2) & (stats["disagreement"] > 0)]
    if chosen.empty:
        return pd.DataFrame({column: pd.Series(dtype=dtype) for column, dtype in frame_dtypes().items()})
    benchmark_rank = {name: rank for rank, name in enumerate(ordered_benchmarks(chosen["benchmark"].unique()))}
    ranked = chosen.assign(_benchmark=chosen["benchmark"].map(benchmark_rank),
                           _vanilla=chosen["vanilla_score"].fillna(-1.0))
    ranked = ranked.sort_values(["model", "_benchmark", "disagreement", "_vanilla", "correct_jobs", "id"],
                                ascending=[True, True, False, False, True, True], kind="mergesort")
    top = ranked.groupby(["model", "benchmark"], sort=False).head(max(int(per_benchmark), 0))
    return top[FRAME_COLUMNS].reset_index(drop=True).astype(frame_dtypes())


def frame_dtypes() -> dict[str, str]:
    return {"model": "string", "benchmark": "string", "id": "string", "row": "Int64", "answers": "string",
            "disagreement": "float64", "vanilla_score": "float64", "correct_jobs": "int64", "scored_jobs": "int64"}


# ---------------------------------------------------------------------------------------------- jobs


def job_order(jobs: pd.DataFrame) -> pd.DataFrame:
    """Jobs in the report's order: vanilla, baselines, the FiCoCo family; larger budgets first."""
    method_rank = {m: i for i, m in enumerate(ordered_methods(jobs["method"].astype(str)))}
    budget_rank = {b: i for i, b in enumerate(ordered_budgets(jobs["budget"].astype(str)))}
    keyed = jobs.assign(_m=jobs["method"].astype(str).map(method_rank), _b=jobs["budget"].astype(str).map(budget_rank))
    return keyed.sort_values(["_m", "_b"], kind="mergesort").drop(columns=["_m", "_b"])


def failure_label(error: Any) -> str:
    """`failed: bad row: empty_question` / `failed: RuntimeError`: the reason codes of a failure, the
    same as the Failures section names them."""
    from ficoco.report.page import failure_code   # late: page may import this module

    if error is None or pd.isna(error) or not str(error).strip():
        return "failed: no score"
    return "failed: " + ", ".join(failure_code(str(error)))


def prediction_groups(jobs: pd.DataFrame) -> list[dict]:
    """The predictions of one sample's jobs grouped by identical text (failed jobs by failure label).

    Each group: text (None for failures), label, scores (of its jobs), jobs (labels, in report order),
    kind ("right", "wrong", "mixed" when its jobs scored it on both sides of RIGHT_SCORE, "failed").
    Order: right groups first, then by how many jobs share it, then by text."""
    groups: dict[tuple, dict] = {}
    for job in job_order(jobs).itertuples(index=False):
        failed = pd.isna(job.score)
        text = None if failed else ("" if pd.isna(job.prediction) else str(job.prediction))
        key = ("failed", failure_label(job.error)) if failed else ("scored", text)
        group = groups.setdefault(key, {"text": text, "label": key[1], "scores": [], "jobs": []})
        group["jobs"].append(job_label(str(job.method), str(job.budget)))
        if not failed:
            group["scores"].append(float(job.score))
    for group in groups.values():
        group["kind"] = group_kind(group["scores"])

    def order(group: dict) -> tuple:
        mean = sum(group["scores"]) / len(group["scores"]) if group["scores"] else -1.0
        return (group["kind"] == "failed", -mean, -len(group["jobs"]), group["label"])

    return sorted(groups.values(), key=order)


def group_kind(scores: list[float]) -> str:
    if not scores:
        return "failed"
    right = [score >= RIGHT_SCORE for score in scores]
    return "right" if all(right) else "wrong" if not any(right) else "mixed"


# ---------------------------------------------------------------------------------------------- benchmark data


def read_benchmark(bench_dir: str | Path | None, name: str) -> tuple[Any, str | None]:
    """`(SafeRows | None, why not)`: the fetched rows of one benchmark, or the reason a note gives.
    Never raises: an unreadable benchmark costs the section its questions and images, not the report."""
    if bench_dir is None:
        return None, f"no fetched directory was given for benchmark {name}"
    try:
        from ficoco.benchmarks.fetch import load_local

        rows, _ = load_local(bench_dir, safe=True)
    except Exception as error:  # noqa: BLE001 - any failure becomes a note
        from ficoco.benchmarks.rows import describe_error

        return None, f"{bench_dir} could not be read ({describe_error(error)[:SHOWN_ERROR_CHARACTERS]})"
    return rows, None


def id_index(rows) -> dict[str, int]:
    """id -> row index of a fetched benchmark (only needed when a sample's `row` is stale); empty when
    the ids cannot be read."""
    try:
        return {str(rid): index for index, rid in enumerate(rows.dataset.data.column("id").to_pylist())}
    except Exception:  # noqa: BLE001 - the row index stays the only way in
        return {}


def find_row(rows, ids: dict[str, int] | None, sample_id: str, row: Any) -> tuple[dict | None, dict[str, int] | None]:
    """`(row dict | None, id index)`: the benchmark row of a sample, by its `row` when that row carries
    its id, else by id (the index is built once, on first need, and handed back for reuse)."""
    if row is not None and not pd.isna(row) and 0 <= int(row) < len(rows):
        candidate = rows[int(row)]
        if str(candidate.get("id")) == sample_id:
            return candidate, ids
    if ids is None:
        ids = id_index(rows)
    return (rows[ids[sample_id]] if sample_id in ids else None), ids


def thumbnail_uri(cell: Any, thumbnail_px: int) -> str | None:
    """A data URI of the image, resized so its long side is `thumbnail_px`: PNG when the stored image
    is a PNG or has transparency, JPEG otherwise (smaller for photos). None when there is no image or
    it does not decode (the row checks name why; this section only shows)."""
    from PIL import Image

    from ficoco.benchmarks.rows import decode_image

    image, problem = decode_image(cell)
    if image is None or problem:
        return None
    try:
        as_png = image.format == "PNG" or image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        width, height = image.size
        scale = thumbnail_px / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = image.convert("RGBA" if as_png else "RGB").resize(size, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        small.save(buffer, format="PNG" if as_png else "JPEG", **({"optimize": True} if as_png else {"quality": 85}))
    except Exception:  # noqa: BLE001 - an odd image costs its thumbnail only
        return None
    kind = "png" if as_png else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


# ---------------------------------------------------------------------------------------------- html


def escape(value: Any) -> str:
    return html.escape("" if value is None or (not isinstance(value, (list, dict)) and pd.isna(value)) else str(value))


def heading_id(model: str, benchmark: str, taken: set[str]) -> str:
    """`disagree-<model>-<benchmark>`: lower case, alphanumerics and "-" only; `-2`, `-3`... when two
    names map to the same id (`a_b` and `a.b`), so every heading keeps its own anchor."""
    text = f"disagree-{model}-{benchmark}".lower()
    base = "".join(c if (c.isascii() and c.isalnum()) else "-" for c in text)
    candidate, number = base, 1
    while candidate in taken:
        number += 1
        candidate = f"{base}-{number}"
    taken.add(candidate)
    return candidate


def shown_prediction(text: str) -> str:
    if text == "":
        return "(empty)"
    if len(text) > SHOWN_PREDICTION_CHARACTERS:
        return f"“{html.escape(text[:SHOWN_PREDICTION_CHARACTERS])}…” ({len(text)} characters)"
    return f"“{html.escape(text)}”"


def score_text(scores: list[float]) -> str:
    """Nothing for 0/1 scores (the mark says it); the score, or the range, when any is fractional."""
    if all(score in (0.0, 1.0) for score in scores) and len(set(scores)) == 1:
        return ""
    low, high = min(scores), max(scores)
    return f" (score {low:.2f})" if low == high else f" (scores {low:.2f}–{high:.2f})"


def prediction_item(group: dict) -> str:
    jobs = ", ".join(html.escape(job) for job in group["jobs"])
    if group["kind"] == "failed":
        return f'<li class="pred-failed">{html.escape(group["label"])} — {jobs}</li>'
    mark = {"right": "✓", "wrong": "✗", "mixed": "±"}[group["kind"]]
    return (f'<li class="pred-{group["kind"]}">{shown_prediction(group["text"])} {mark}'
            f'{score_text(group["scores"])} — {jobs}</li>')


def question_html(row: Mapping | None) -> str:
    if row is None:
        return ""
    question = row.get("question")
    parts = [f'<p class="question">{escape(question) if question else "(no question text)"}</p>']
    choices = row.get("choices")
    if isinstance(choices, list) and choices:
        items = "".join(f"<li>{escape(choice)}</li>" for choice in choices)
        parts.append(f'<ol class="choices" type="A">{items}</ol>')
    return "".join(parts)


def journals_html(jobs: pd.DataFrame) -> str:
    """The journal (shard predictions.jsonl) of every job, as text: the page links nowhere."""
    items = "".join(f"<li>{escape(job_label(str(job.method), str(job.budget)))}: "
                    f"<code>{escape(job.predictions)}</code></li>" for job in job_order(jobs).itertuples(index=False))
    return (f'<details class="journals"><summary>Journals ({len(jobs)} jobs)</summary>'
            f"<ul>{items}</ul></details>")


def sample_html(sample, jobs: pd.DataFrame, row: Mapping | None, thumbnail: str | None) -> str:
    """One compact block: thumbnail, what was asked, what was expected, who answered what."""
    vanilla = "" if pd.isna(sample.vanilla_score) else (
        f' · vanilla {"✓" if sample.vanilla_score >= RIGHT_SCORE else "✗"}')
    where = "" if pd.isna(sample.row) else f" · row {int(sample.row)}"
    image = f'<img class="thumb" alt="image of sample {escape(sample.id)}" src="{thumbnail}">' if thumbnail else ""
    predictions = "".join(prediction_item(group) for group in prediction_groups(jobs))
    return (f'<div class="drill">{image}<div class="drill-body">'
            f'<p class="drill-head"><b>{escape(sample.id)}</b>{where} · disagreement {sample.disagreement:.2f}'
            f' · right {sample.correct_jobs}/{sample.scored_jobs}{vanilla}</p>'
            f'{question_html(row)}'
            f'<p class="answers">Reference: {escape(sample.answers) if pd.notna(sample.answers) else "–"}</p>'
            f'<ul class="preds">{predictions}</ul>{journals_html(jobs)}</div></div>')


def intro_html(per_benchmark: int) -> str:
    return ("<p>For each model and benchmark, the (up to) "
            f"{int(per_benchmark)} samples on which its runs (method × budget) disagree most. Disagreement is the "
            "standard deviation of the per-run scores of a sample: 0 when every run scores it the same, 0.5 when "
            "half the runs get it fully right and half fully wrong. Failed runs are listed but not counted; only "
            "samples scored by at least two runs are considered. Equal disagreements: samples vanilla gets right "
            "first, then those fewer runs get right, then by id. Predictions are grouped by identical text: "
            f"✓ right (score ≥ {RIGHT_SCORE}), ✗ wrong, ± both among runs with the same text.</p>")


def disagreement_section(samples: pd.DataFrame, benchmark_dirs: Mapping[str, str | Path],
                         per_benchmark: int = 24, thumbnail_px: int = 96) -> str:
    """The section's HTML (the caller wraps it in its <section>): an intro, then per (model, benchmark)
    an `<h3 id="disagree-...">` and one `drill` block per sample of `disagreement_frame`. A benchmark
    without readable data in `benchmark_dirs` gets a note and its samples without question or image."""
    jobs = job_records(samples)
    if jobs.empty:
        return '<p class="note">No per-sample predictions to compare (the summary holds no samples).</p>'
    chosen = disagreement_frame(jobs, per_benchmark)
    if chosen.empty:
        return ('<p class="note">No sample has disagreeing scores: on every sample scored by two runs or '
                "more, every run scored the same.</p>")
    members = jobs.merge(chosen[SAMPLE_KEYS], on=SAMPLE_KEYS)
    by_sample = {key: group for key, group in members.groupby(SAMPLE_KEYS, sort=False)}
    benchmarks = {name: read_benchmark(benchmark_dirs.get(name), name) for name in chosen["benchmark"].unique()}
    ids: dict[str, dict[str, int] | None] = {}
    parts, taken = [intro_html(per_benchmark)], set()
    for (model, benchmark), selected in chosen.groupby(["model", "benchmark"], sort=False):
        rows, why = benchmarks[benchmark]
        parts.append(f'<h3 id="{heading_id(model, benchmark, taken)}">{escape(model)}, {escape(benchmark)}</h3>')
        if why:
            parts.append(f'<p class="note">No question text or images for {escape(benchmark)}: {escape(why)}.</p>')
        # one benchmark open, the others folded: the page stays short enough to read and to screenshot
        parts.append(f'<details{" open" if len(taken) == 1 else ""}><summary>{len(selected)} samples</summary>')
        not_found = []
        for sample in selected.itertuples(index=False):
            row = None
            if rows is not None:
                row, ids[benchmark] = find_row(rows, ids.get(benchmark), str(sample.id), sample.row)
                if row is None:
                    not_found.append(str(sample.id))
            thumbnail = thumbnail_uri(row.get("image"), thumbnail_px) if row is not None else None
            parts.append(sample_html(sample, by_sample[(model, benchmark, sample.id)], row, thumbnail))
        parts.append("</details>")
        if not_found:
            parts.append(f'<p class="note">Not in the fetched {escape(benchmark)} (refetched since the runs?): '
                         f'{escape(", ".join(not_found))}.</p>')
    calm = sorted(set(map(tuple, jobs[["model", "benchmark"]].astype(str).values.tolist()))
                  - set(map(tuple, chosen[["model", "benchmark"]].astype(str).values.tolist())))
    if calm:
        parts.append('<p class="note">No disagreement at all on: '
                     + escape(", ".join(f"{model} / {benchmark}" for model, benchmark in calm)) + ".</p>")
    return "\n".join(parts)

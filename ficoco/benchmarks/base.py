"""The benchmark interface (docs/contracts.md §5), the normalised row format, bad rows,
sharding and the GPT-judge call.

A benchmark is an instance of a `Benchmark` subclass defined in its own module (gqa.py, ...).
The registry (`ficoco.benchmarks.get`) hands out those instances; they hold no mutable state.

Normalised row (every benchmark): `id` (unique string), `image` (datasets Image, may be None),
`question` (string), `answers` (list of string), `choices` (list of string), `meta` (JSON string
of benchmark-specific fields). A row that cannot be scored correctly (missing image where one is
required, an image that does not decode in full, empty answer list, empty question, bad meta, ...)
is kept and flagged with `meta["bad_row"] = reason` (the checks live in rows.py); its
`score_sample` returns `{"score": None, "bad_row": reason}` and `aggregate` counts it under
`bad_rows` instead of the metric.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

from ficoco.benchmarks.rows import (NORMALISED_COLUMNS, check_fields, decode_image, describe_error,
                                    image_cell, reason, reason_code, stored_meta)
from ficoco.benchmarks.scoring import vqa_accuracy

# --------------------------------------------------------------------------------------------
# Normalised rows


def normalised_features():
    """The datasets Features of a normalised benchmark (imported lazily: datasets is slow)."""
    from datasets import Features, Image, List, Value

    return Features({
        "id": Value("string"),
        "image": Image(),
        "question": Value("string"),
        "answers": List(Value("string")),
        "choices": List(Value("string")),
        "meta": Value("string"),
    })


def row_meta(row: Mapping) -> dict:
    """The decoded `meta` of a normalised row (a dict; `{}` when absent or empty)."""
    meta = row.get("meta")
    if meta is None or meta == "":
        return {}
    if isinstance(meta, Mapping):
        return dict(meta)
    return json.loads(meta)


def image_or_none(value):
    """A raw image cell as stored (undecoded `{"bytes", "path"}` dict or PIL image), or None when
    it carries no image at all."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        if not value.get("bytes") and not value.get("path"):
            return None
        return {"bytes": value.get("bytes"), "path": value.get("path")}
    return value


def image_table(dataset, key: str = "id", image: str = "image") -> dict:
    """`{key value: stored image struct}` for a dataset with an image column, read as Arrow so the
    images are not decoded (used to join images onto questions, e.g. GQA)."""
    table = dataset.with_format("arrow")[:]
    return dict(zip(table.column(key).to_pylist(), table.column(image).to_pylist()))


def scoring_of(record: Mapping) -> Mapping:
    """The scoring dict of a journal record (contracts §6 keeps it under "scoring"); a bare
    score_sample result is accepted too."""
    scoring = record.get("scoring")
    return scoring if isinstance(scoring, Mapping) else record


def percent(values: Sequence[float]) -> float | None:
    """Mean of 0..1 values as a percentage; None for an empty list."""
    return 100.0 * sum(values) / len(values) if values else None


def grouped_percent(scorings: Iterable[Mapping], key: str) -> dict:
    """`{group: percent of its scores}` (sorted by group) over the scorings whose `key` is set."""
    groups: dict[str, list[float]] = {}
    for s in scorings:
        if s.get(key):
            groups.setdefault(s[key], []).append(s["score"])
    return {k: percent(v) for k, v in sorted(groups.items())}


def answer_strings(answers) -> list:
    """Ground truths as strings: a list of strings, or of dicts with an "answer" field (VQAv2).
    A null answer stays None, so that the row is flagged (`null_answer`) instead of scored against
    the text "None"."""
    out = []
    for answer in answers or []:
        value = answer.get("answer") if isinstance(answer, dict) else answer
        out.append(None if value is None else str(value))
    return out


def yes_no_answers(raw: Mapping) -> list[str]:
    """The raw `answer` cell lower-cased and stripped, as a one-element answer list ([] when empty)."""
    answer = str(raw.get("answer") or "").strip().lower()
    return [answer] if answer else []


# --------------------------------------------------------------------------------------------
# The interface

class Benchmark:
    """Base class: loader hooks, generic normalisation, bad-row handling, score/aggregate wrappers.

    Subclasses set the class attributes and implement `to_row`, `prompt`, `_score`, `_aggregate`
    (and `load_raw` / `select_rows` when the raw data needs joining or filtering).
    """

    name: str = ""
    #: LLaVA-1.5 generation length for this benchmark (benchmarks.md §1).
    max_new_tokens: int = 128
    #: One line for docs and listings.
    metric: str = ""
    #: Rows without an image are bad rows.
    requires_image: bool = True
    #: Rows with an empty answer list are bad rows.
    requires_answers: bool = True
    #: The headline `score` is a percentage (0-100). False for a score on another scale (MME's points), which the
    #: report shows but leaves out of every average over benchmarks (Avg, Avg%).
    headline_percent: bool = True
    #: Meta fields every row needs (the aggregate groups by them): a row without one is a bad row.
    required_meta: tuple[str, ...] = ()
    #: Option name -> default. Options not listed here are rejected.
    option_defaults: Mapping[str, Any] = MappingProxyType({})
    #: Options that change which rows are fetched (recorded in the manifest, checked on load).
    fetch_options: tuple[str, ...] = ()
    #: GPT-judged benchmarks (off by default, need OPENAI_API_KEY).
    needs_judge: bool = False

    def __init__(self, name: str | None = None):
        if name is not None:
            self.name = name
        if not self.name:
            raise ValueError(f"{type(self).__name__} needs a name")

    def __repr__(self) -> str:
        return f"<benchmark {self.name}>"

    # -- options ----------------------------------------------------------------------------
    def resolve_options(self, options: Mapping | None = None) -> dict:
        """Options merged over the defaults; unknown names raise ValueError naming the valid ones."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            valid = ", ".join(sorted(self.option_defaults)) or "(none)"
            raise ValueError(f"benchmark {self.name!r}: unknown option(s) {', '.join(unknown)}; "
                             f"valid options: {valid}")
        return {**self.option_defaults, **options}

    def fetch_option_values(self, options: Mapping | None) -> dict:
        """The resolved values of the options that change the fetched rows."""
        resolved = self.resolve_options(options)
        return {key: resolved[key] for key in self.fetch_options}

    # -- loading (called by ficoco.benchmarks.fetch) ------------------------------------------
    def load_raw(self, load: Callable, entry: Mapping):
        """Return `(raw_dataset, context)`. `load(config, split)` is `datasets.load_dataset` bound
        to the source and revision; `entry` is this benchmark's registry entry."""
        return load(entry.get("config"), entry["split"]), None

    def select_rows(self, raw, options: Mapping) -> tuple[Any, dict]:
        """Apply fetch-time options (subsets, category filters). Returns the dataset and extra
        manifest fields describing the selection."""
        return raw, {}

    def to_row(self, raw: Mapping, index: int, context) -> dict:
        """One raw row -> a normalised row with `meta` as a dict (bad rows are flagged later)."""
        raise NotImplementedError

    def bad_row_reasons(self, row: Mapping, meta: Mapping) -> list[str]:
        """Reasons a normalised row cannot be scored as-is (empty list: a good row)."""
        reasons = []
        if self.requires_image and row.get("image") is None:
            reasons.append("missing_image")
        if self.requires_answers and not any(str(a).strip() for a in row.get("answers") or []):
            reasons.append("empty_answers")
        for key in self.required_meta:
            if meta.get(key) is None or meta.get(key) == "":
                reasons.append(reason("missing_meta", f"{key} is {meta.get(key)!r}"))
        return reasons

    def normalise_row(self, raw: Mapping, index: int, context) -> dict:
        """`to_row` + bad-row checks + JSON meta: exactly the stored column values.

        Never raises: a raw row `to_row` cannot read, a missing, empty, wrongly typed or undecodable
        field, and an image that does not decode in full (PIL `load()`: truncated files, non-image
        bytes) each flag the row (`meta["bad_row"]`, see rows.py); the row is kept. The image cell
        is stored as it came (bytes not re-encoded), even when it does not decode.
        """
        read = list(raw.get("_problems") or [])     # raw text that was not UTF-8 (fetch.normalise)
        try:
            row = self.to_row(raw, index, context)
        except Exception as error:  # noqa: BLE001 - one unreadable raw row must not stop the fetch
            problems = [*read, reason("unreadable_row", describe_error(error))]
            return {"id": f"<unreadable row {index}>", "image": None, "question": "", "answers": [], "choices": [],
                    "meta": stored_meta({}, problems)}
        fields, meta, problems = check_fields(row, requires_answers=self.requires_answers)
        problems[:0] = read
        meta.pop("bad_row", None)           # flagged here, by these checks only
        if any(reason_code(p) == "missing_id" for p in problems):
            fields["id"] = f"<no id: row {index}>"
        image, problem = image_cell(row.get("image"))
        if problem is None and image is not None:
            _, problem = decode_image(image)
            if problem and isinstance(image, Mapping) and image.get("bytes") is None:
                image = None        # only a path that does not open: nothing to keep (saving would fail)
        if problem:
            problems.append(problem)
        out = {**fields, "image": image}
        try:
            problems.extend(self.bad_row_reasons(out, meta))
        except Exception as error:  # noqa: BLE001
            problems.append(reason("unreadable_row", f"bad_row_reasons: {describe_error(error)}"))
        out["meta"] = stored_meta(meta, problems)
        return {column: out[column] for column in NORMALISED_COLUMNS}

    # -- prompts and scoring ----------------------------------------------------------------
    def prompt(self, row: Mapping, options: Mapping | None = None) -> str:
        """The text after `<image>\\n` (the conversation template is applied by the caller)."""
        raise NotImplementedError

    def score_sample(self, prediction, row: Mapping) -> dict:
        """`{"score": float in 0..1 | None, "parsed": ..., "failed": bool, ...}`.

        None/non-string predictions are scored as the empty string. Bad rows give score None.
        """
        meta = row_meta(row)
        if meta.get("bad_row"):
            return {"score": None, "parsed": None, "failed": False, "bad_row": meta["bad_row"]}
        text = "" if prediction is None else str(prediction)
        return self._score(text, row, meta)

    def _score(self, prediction: str, row: Mapping, meta: Mapping) -> dict:
        raise NotImplementedError

    def aggregate(self, records: Iterable[Mapping]) -> dict:
        """Metrics over journal records: the headline under "score" (percent) plus `samples`,
        `scored`, `bad_rows` (flagged rows, excluded from the metric) and `failures` (answers the
        extraction rule could not parse, counted wrong; plus records without a score, e.g. a
        generation error, which are excluded from the metric).

        A record is a bad row when its scoring carries `bad_row` or its `error` starts with
        "bad row" (how the evaluate job records rows it did not run). Where samples are judged together
        (`group_of`), a group with a bad row or an unscored record is left out whole, counted in
        `incomplete_groups`.
        """
        records = list(records)
        bad = errored = 0
        scored, incomplete = [], set()
        for record in records:
            scoring = scoring_of(record)
            if scoring.get("bad_row") or str(record.get("error") or "").startswith("bad row"):
                bad += 1
            elif scoring.get("score") is None:
                errored += 1
            else:
                scored.append((record, scoring))
                continue
            incomplete.add(self.group_of(str(record.get("id"))))
        incomplete.discard(None)
        judged = [scoring for record, scoring in scored
                  if not incomplete or self.group_of(str(record.get("id"))) not in incomplete]
        metrics = self._aggregate(judged)
        metrics["samples"] = len(records)
        metrics["scored"] = len(judged)
        metrics["bad_rows"] = bad
        metrics["failures"] = errored + sum(1 for _, s in scored if s.get("failed"))
        if incomplete:
            metrics["incomplete_groups"] = len(incomplete)
        return metrics

    def group_of(self, sample_id: str):
        """The group a sample is judged with (MMBench: a question's circular variants; MME: an image's
        questions), from its id; None: judged alone. Judged on the rest of its group, a sample that was never
        answered would count as right."""
        return None

    def _aggregate(self, scorings: list[Mapping]) -> dict:
        """Metrics from the scorings that have a score. Default: mean per-sample score x 100."""
        return {"score": percent([float(s["score"]) for s in scorings])}

    # -- fetching ---------------------------------------------------------------------------
    def fetch(self, out_dir, revision: str | None = None, options: Mapping | None = None) -> dict:
        """Download at the pinned revision, normalise, write `out_dir` (see fetch.fetch_benchmark)."""
        from ficoco.benchmarks.fetch import fetch_benchmark

        return fetch_benchmark(self.name, out_dir, revision=revision, options=options)


class VQAAccuracyBenchmark(Benchmark):
    """Open-answer benchmarks scored with VQA accuracy (EvalAI normalisation; TextVQA, VQAv2,
    VizWiz). With `group_key` set, each scoring carries that meta field and the aggregate adds
    the per-group accuracy under `group_label`."""

    #: Meta field to break the accuracy down by (None: headline only).
    group_key: str | None = None
    #: Aggregate key of the per-group breakdown.
    group_label: str = ""

    def vqa_row(self, raw: Mapping, meta: Mapping) -> dict:
        """A normalised row from a raw VQA row (`question_id`, `image`, `question`, `answers`)."""
        return {
            "id": str(raw["question_id"]),
            "image": raw.get("image"),
            "question": raw["question"],
            "answers": answer_strings(raw.get("answers")),
            "choices": [],
            "meta": meta,
        }

    def _score(self, prediction, row, meta):
        scoring = {"score": vqa_accuracy(prediction, row["answers"]), "parsed": prediction, "failed": False}
        if self.group_key:
            scoring[self.group_key] = meta.get(self.group_key)
        return scoring

    def _aggregate(self, scorings):
        metrics = {"score": percent([s["score"] for s in scorings])}
        if self.group_key:
            metrics[self.group_label] = grouped_percent(scorings, self.group_key)
        return metrics


class YesNoBenchmark(Benchmark):
    """Benchmarks whose ground truth is "yes" or "no" (MME, POPE): any other answer is a bad row."""

    def bad_row_reasons(self, row, meta):
        reasons = super().bad_row_reasons(row, meta)
        if row["answers"] and row["answers"][0] not in ("yes", "no"):
            reasons.append("answer_not_yes_no")
        return reasons


# --------------------------------------------------------------------------------------------
# Sharding

def shard_rows(n_rows: int, shard_index: int, num_shards: int) -> range:
    """The contiguous block of row indices of one shard.

    The first `n_rows % num_shards` shards get one extra row; the blocks are in order, disjoint
    and cover `range(n_rows)` exactly once. Deterministic (no randomness, no data access).
    """
    for label, value in (("n_rows", n_rows), ("shard_index", shard_index), ("num_shards", num_shards)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{label} must be an integer, got {value!r}")
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in 0..{num_shards - 1}, got {shard_index}")
    base, extra = divmod(n_rows, num_shards)
    start = shard_index * base + min(shard_index, extra)
    stop = start + base + (1 if shard_index < extra else 0)
    return range(start, stop)


def merge_records(record_lists: Iterable[Iterable[Mapping]], ids: Sequence[str] | None = None) -> list:
    """Concatenate shard records and order them by original row index.

    A record's position is its `"row"` field (the row index the evaluate job stores; `"index"` is
    accepted too) or, when it has neither, the position of its `"id"` in `ids` (the dataset's id
    column). Raises ValueError on two records for one row or a record that cannot be placed.
    """
    position_of_id = {rid: i for i, rid in enumerate(ids)} if ids is not None else None
    keyed = []
    seen: dict[int, object] = {}
    for records in record_lists:
        for record in records:
            pos = record.get("row", record.get("index"))
            if pos is None:
                if position_of_id is None or record.get("id") not in position_of_id:
                    raise ValueError(f"record {record.get('id')!r} has no 'row' and its id is not in `ids`; "
                                     "pass the dataset's id column as ids=")
                pos = position_of_id[record["id"]]
            pos = int(pos)
            if pos in seen:
                raise ValueError(f"two records for row {pos} (ids {seen[pos]!r} and {record.get('id')!r})")
            seen[pos] = record.get("id")
            keyed.append((pos, record))
    keyed.sort(key=lambda item: item[0])
    return [record for _, record in keyed]


# --------------------------------------------------------------------------------------------
# GPT judge (MM-Vet, LLaVA-W)

API_KEY_ENV = "OPENAI_API_KEY"
API_BASE_ENV = "OPENAI_BASE_URL"


class JudgeUnavailable(RuntimeError):
    """A GPT-judged benchmark was scored without an API key."""


def require_api_key(benchmark: str) -> str:
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise JudgeUnavailable(
            f"benchmark {benchmark!r} is scored by a GPT judge and needs an OpenAI API key in the "
            f"environment variable {API_KEY_ENV}; it is not set. Set {API_KEY_ENV} (and optionally "
            f"{API_BASE_ENV}) or leave {benchmark!r} out of the config's benchmarks.")
    return key


@dataclass(frozen=True)
class OpenAIJudge:
    """`judge(prompt) -> text` through the OpenAI chat-completions HTTP API (no SDK needed).

    The key is read from OPENAI_API_KEY at call time; `model` is recorded with every score.
    """

    benchmark: str
    model: str
    temperature: float = 0.0
    max_tokens: int = 256
    timeout_s: float = 120.0

    def __call__(self, prompt: str) -> str:
        key = require_api_key(self.benchmark)
        base = os.environ.get(API_BASE_ENV, "https://api.openai.com/v1").rstrip("/")
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }).encode()
        request = urllib.request.Request(
            f"{base}/chat/completions", data=body, method="POST",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read().decode())
        except urllib.error.HTTPError as error:  # pragma: no cover - needs the network
            raise RuntimeError(f"judge call to {base} failed: HTTP {error.code} {error.reason}") from error
        return payload["choices"][0]["message"]["content"]


class JudgedBenchmark(Benchmark):
    """A benchmark scored by a GPT judge: `judge(prompt) -> text`.

    Off by default in configs. `score_sample(prediction, row, judge=None)`: without a judge the
    OpenAI judge is built from the options' `judge_model`, which needs OPENAI_API_KEY (a clear
    JudgeUnavailable error otherwise). Tests pass a fake judge.
    """

    needs_judge = True
    max_new_tokens = 1024
    judge_temperature: float = 0.0

    def check_ready(self, options: Mapping | None = None) -> None:
        """Raise JudgeUnavailable now (before any generation) when no API key is set."""
        require_api_key(self.name)

    def make_judge(self, options: Mapping | None = None) -> Callable[[str], str]:
        resolved = self.resolve_options(options)
        require_api_key(self.name)
        return OpenAIJudge(self.name, resolved["judge_model"], temperature=self.judge_temperature)

    def score_sample(self, prediction, row: Mapping, judge: Callable[[str], str] | None = None) -> dict:
        meta = row_meta(row)
        if meta.get("bad_row"):
            return {"score": None, "parsed": None, "failed": False, "bad_row": meta["bad_row"]}
        if judge is None:
            judge = self.make_judge()
        text = "" if prediction is None else str(prediction)
        result = self._judge(text, row, meta, judge)
        result["judge_model"] = getattr(judge, "model", type(judge).__name__)
        return result

    def _judge(self, prediction: str, row: Mapping, meta: Mapping, judge: Callable[[str], str]) -> dict:
        raise NotImplementedError

    def _score(self, prediction, row, meta):  # pragma: no cover - judged benchmarks use _judge
        raise NotImplementedError("judged benchmarks are scored through score_sample(..., judge=...)")

    @staticmethod
    def judge_models(scorings: Sequence[Mapping]) -> list[str]:
        return sorted({str(s.get("judge_model")) for s in scorings if s.get("judge_model")})

"""VizWiz-VQA validation (benchmarks.md §2, §3.1).

Data: `lmms-lab/VizWiz-VQA`, default config, split `val` (4,319; `test` is submission-only).
Prompt: question (`str.capitalize`) + "\\nWhen the provided information is insufficient, respond
with 'Unanswerable'." + short-answer suffix. Metric: VQA accuracy (EvalAI normalisation).
Not comparable with the paper's VizWiz column (test-dev on the evaluation server).
"""
from __future__ import annotations

from ficoco.benchmarks.base import Benchmark, percent
from ficoco.benchmarks.scoring import SHORT_ANSWER_SUFFIX, capitalize_question, vqa_accuracy
from ficoco.benchmarks.textvqa import answer_strings

UNANSWERABLE_LINE = "\nWhen the provided information is insufficient, respond with 'Unanswerable'."


class VizWizBenchmark(Benchmark):
    name = "vizwiz"
    max_new_tokens = 128
    metric = "VQA accuracy % (EvalAI normalisation), val split"

    def to_row(self, raw, index, context):
        return {
            "id": str(raw["question_id"]),
            "image": raw.get("image"),
            "question": raw["question"],
            "answers": answer_strings(raw.get("answers")),
            "choices": [],
            "meta": {"category": raw.get("category")},
        }

    def prompt(self, row, options=None):
        self.resolve_options(options)
        return capitalize_question(row["question"]) + UNANSWERABLE_LINE + SHORT_ANSWER_SUFFIX

    def _score(self, prediction, row, meta):
        return {"score": vqa_accuracy(prediction, row["answers"]), "parsed": prediction, "failed": False,
                "category": meta.get("category")}

    def _aggregate(self, scorings):
        by_category: dict[str, list[float]] = {}
        for s in scorings:
            if s.get("category"):
                by_category.setdefault(s["category"], []).append(s["score"])
        return {"score": percent([s["score"] for s in scorings]),
                "per_category": {k: percent(v) for k, v in sorted(by_category.items())}}


VIZWIZ = VizWizBenchmark()

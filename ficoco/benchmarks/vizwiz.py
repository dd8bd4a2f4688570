"""VizWiz-VQA validation (benchmarks.md §2, §3.1).

Data: `lmms-lab/VizWiz-VQA`, default config, split `val` (4,319; `test` is submission-only).
Prompt: question (`str.capitalize`) + "\\nWhen the provided information is insufficient, respond
with 'Unanswerable'." + short-answer suffix. Metric: VQA accuracy (EvalAI normalisation).
Not comparable with the paper's VizWiz column (test-dev on the evaluation server).
"""
from __future__ import annotations

from ficoco.benchmarks.base import VQAAccuracyBenchmark
from ficoco.benchmarks.scoring import SHORT_ANSWER_SUFFIX, capitalize_question

UNANSWERABLE_LINE = "\nWhen the provided information is insufficient, respond with 'Unanswerable'."


class VizWizBenchmark(VQAAccuracyBenchmark):
    name = "vizwiz"
    max_new_tokens = 128
    metric = "VQA accuracy % (EvalAI normalisation), val split"
    group_key = "category"
    group_label = "per_category"

    def to_row(self, raw, index, context):
        return self.vqa_row(raw, {"category": raw.get("category")})

    def prompt(self, row, options=None):
        self.resolve_options(options)
        return capitalize_question(row["question"]) + UNANSWERABLE_LINE + SHORT_ANSWER_SUFFIX


VIZWIZ = VizWizBenchmark()

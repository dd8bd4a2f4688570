"""LLaVA-Bench in-the-wild (optional, GPT-judged; benchmarks.md §2, §3.9). Off by default:
needs OPENAI_API_KEY.

Data: `lmms-lab/llava-bench-in-the-wild`, default config, split `train` (60 questions, 24
images); `gpt_answer` is the reference answer written by text-only GPT-4, `caption` the context.
Prompt: the question only. Metric: for each question a GPT judge sees the context, the question,
the reference answer (Assistant 1) and the model's answer (Assistant 2) with a per-category rule
(conv / detail / complex) and returns two scores from 1 to 10 on its first line. Relative score =
100 x mean(model score) / mean(reference score), overall and per category. The judge model is
recorded; LLaVA used gpt-4-0314 at temperature 0.2 (retired), so the default judge differs.

The rule texts below are this project's own wording of LLaVA's per-category rules. A reply whose
first line does not hold two scores in 1..10 is a failure and is left out of the means.
"""
from __future__ import annotations

from types import MappingProxyType

from ficoco.benchmarks.base import JudgedBenchmark

DEFAULT_JUDGE_MODEL = "gpt-4o-2024-11-20"

_COMMON_RULE = (
    "You see a description of the image (the context), not the image itself. Rate the helpfulness, "
    "relevance, accuracy and level of detail of both answers. Give each assistant an overall score "
    "from 1 to 10, where a higher score means better overall performance. On the first line, write "
    "only the two scores, for Assistant 1 and Assistant 2, separated by a space. From the second line "
    "on, explain your evaluation briefly, without letting the order of the answers or their length "
    "influence you.")

RULES = MappingProxyType({
    "conv": "Two AI assistants answered a user's question about an image in a conversation. " + _COMMON_RULE,
    "detail": "Two AI assistants were asked to describe an image in detail. " + _COMMON_RULE,
    "complex": "Two AI assistants answered a question about an image that needs reasoning. " + _COMMON_RULE,
})

JUDGE_TEMPLATE = """[Context]
{context}

[Question]
{question}

[Assistant 1]
{reference}

[End of Assistant 1]

[Assistant 2]
{prediction}

[End of Assistant 2]

[System]
{rule}
"""


def parse_pair(text: str) -> tuple[float, float] | None:
    """(reference score, model score) from the first line of the judge's reply, or None."""
    lines = str(text).strip().splitlines()
    if not lines:
        return None
    parts = lines[0].replace(",", " ").split()
    if len(parts) != 2:
        return None
    try:
        first, second = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    if not (1.0 <= first <= 10.0 and 1.0 <= second <= 10.0):
        return None
    return first, second


class LLaVAWildBenchmark(JudgedBenchmark):
    name = "llava_wild"
    metric = "GPT-judged relative score % = 100 x mean(model) / mean(reference); per category"
    option_defaults = MappingProxyType({"judge_model": DEFAULT_JUDGE_MODEL})
    judge_temperature = 0.2

    def to_row(self, raw, index, context):
        reference = raw.get("gpt_answer")
        return {
            "id": str(raw["question_id"]),
            "image": raw.get("image"),
            "question": raw["question"],
            "answers": [str(reference)] if reference not in (None, "") else [],
            "choices": [],
            "meta": {"category": raw.get("category"), "context": raw.get("caption") or "",
                     "image_id": raw.get("image_id")},
        }

    def bad_row_reasons(self, row, meta):
        reasons = super().bad_row_reasons(row, meta)
        if meta.get("category") not in RULES:
            reasons.append("unknown_category")
        return reasons

    def prompt(self, row, options=None):
        self.resolve_options(options)
        return row["question"]

    def _judge(self, prediction, row, meta, judge):
        reply = judge(JUDGE_TEMPLATE.format(context=meta.get("context", ""), question=row["question"],
                                            reference=row["answers"][0], prediction=prediction,
                                            rule=RULES[meta["category"]]))
        pair = parse_pair(reply)
        if pair is None:
            return {"score": None, "parsed": None, "failed": True, "judge_reply": reply,
                    "category": meta["category"]}
        reference, model = pair
        return {"score": model / reference, "parsed": [reference, model], "failed": False,
                "reference_score": reference, "model_score": model, "judge_reply": reply,
                "category": meta["category"]}

    def _aggregate(self, scorings):
        def relative(rows):
            if not rows:
                return None
            return 100.0 * sum(r["model_score"] for r in rows) / sum(r["reference_score"] for r in rows)

        categories = sorted({s["category"] for s in scorings})
        return {"score": relative(scorings),
                "per_category": {c: relative([s for s in scorings if s["category"] == c]) for c in categories},
                "model_mean": (sum(s["model_score"] for s in scorings) / len(scorings)) if scorings else None,
                "reference_mean": (sum(s["reference_score"] for s in scorings) / len(scorings)) if scorings else None,
                "judge_models": self.judge_models(scorings)}


LLAVA_WILD = LLaVAWildBenchmark()

"""MM-Vet (optional, GPT-judged; benchmarks.md §2, §3.8). Off by default: needs OPENAI_API_KEY.

Data: `lmms-lab/MMVet`, default config, split `test` (218 questions).
Prompt: the question only (no suffix, no chain-of-thought preamble); generation as LLaVA
(greedy, max_new_tokens 1024). Metric: a GPT judge grades each answer against the ground truth
(`<AND>`: every element needed; `<OR>`: any one suffices) with a score in {0.0, 0.1, ..., 1.0};
benchmark score = mean x 100, with a per-capability breakdown. The judge model is recorded.

The grading prompt below is this project's own wording of that rule, not the official MM-Vet
few-shot prompt, so scores are comparable across this project's runs but not guaranteed to match
the official evaluator. An unparsable judge reply counts as 0.0 and as a failure.
"""
from __future__ import annotations

import re
from types import MappingProxyType

from ficoco.benchmarks.base import JudgedBenchmark, percent

DEFAULT_JUDGE_MODEL = "gpt-4o-2024-11-20"

GRADER_PROMPT = """You grade an AI assistant's answer to a question about an image by comparing it with the ground-truth answer.
Rules:
- In the ground truth, "<AND>" joins elements that must all be present in the answer for full credit.
- "<OR>" joins alternatives; any one of them present is enough for full credit.
- Give a correctness score between 0.0 (totally wrong) and 1.0 (totally right) in steps of 0.1; an answer that is partly right gets partial credit.
- Reply with the score only, for example 0.6.

Question: {question}
Ground truth: {answer}
Answer to grade: {prediction}
Score:"""

_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_grade(text: str) -> float | None:
    """The first number in the judge's reply if it lies in [0, 1] (rounded to 0.1), else None."""
    match = _NUMBER.search(str(text))
    if match is None:
        return None
    value = float(match.group())
    return round(value, 1) if 0.0 <= value <= 1.0 else None


class MMVetBenchmark(JudgedBenchmark):
    name = "mmvet"
    metric = "GPT-judged score % (mean x 100); per capability"
    option_defaults = MappingProxyType({"judge_model": DEFAULT_JUDGE_MODEL})
    judge_temperature = 0.0

    def to_row(self, raw, index, context):
        capability = raw.get("capability") or []
        if isinstance(capability, str):
            capability = [c.strip() for c in capability.split(",") if c.strip()]
        answer = raw.get("answer")
        return {
            "id": str(raw["question_id"]),
            "image": raw.get("image"),
            "question": raw["question"],
            "answers": [str(answer)] if answer not in (None, "") else [],
            "choices": [],
            "meta": {"capabilities": list(capability), "image_source": raw.get("image_source")},
        }

    def prompt(self, row, options=None):
        self.resolve_options(options)
        return row["question"]

    def _judge(self, prediction, row, meta, judge):
        reply = judge(GRADER_PROMPT.format(question=row["question"], answer=row["answers"][0],
                                           prediction=prediction))
        grade = parse_grade(reply)
        return {"score": 0.0 if grade is None else grade, "parsed": grade, "failed": grade is None,
                "judge_reply": reply, "capabilities": meta.get("capabilities") or []}

    def _aggregate(self, scorings):
        by_capability: dict[str, list[float]] = {}
        for s in scorings:
            for capability in s.get("capabilities") or []:
                by_capability.setdefault(capability, []).append(s["score"])
        return {"score": percent([s["score"] for s in scorings]),
                "per_capability": {k: percent(v) for k, v in sorted(by_capability.items())},
                "judge_models": self.judge_models(scorings)}


MMVET = MMVetBenchmark()

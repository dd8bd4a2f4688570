"""ScienceQA test, IMG and FULL (benchmarks.md §2, §3.5).

Data: `lmms-lab/ScienceQA`, configs `ScienceQA-IMG` (2,017 questions, all with an image) and
`ScienceQA-FULL` (4,241; text-only questions have no image and run without image tokens).
Registered as two benchmarks: `scienceqa_img` and `scienceqa_full`.
Prompt: `Context: {hint}\\n` (only for a non-empty hint) + question + `\\nA. ...` + MC suffix.
Metric: LLaVA's letter parse (llava/eval/eval_science_qa.py: a bare letter, "X. ...", or
`The answer is ([A-Z]).` exactly once, its dot matching any character; no match or a letter
outside the item's choices is wrong); both report IMG accuracy (questions with an image) and overall
accuracy (all questions). The headline is the variant's own: IMG accuracy for `scienceqa_img` (the project's
primary SQA number), overall accuracy for `scienceqa_full`, because that is what the paper's SQA column
reports (benchmarks.md §4) and the report puts FULL's headline beside it.
"""
from __future__ import annotations

from ficoco.benchmarks.base import Benchmark, image_or_none, percent, row_meta
from ficoco.benchmarks.scoring import (MC_SUFFIX, option_lines, parse_scienceqa_letter,
                                       scienceqa_choice_index)


class ScienceQABenchmark(Benchmark):
    max_new_tokens = 1024
    metric = "letter accuracy %: IMG and overall (headline: IMG for scienceqa_img, overall for scienceqa_full)"

    def __init__(self, name: str, variant: str):
        if variant not in ("img", "full"):
            raise ValueError(f"scienceqa variant must be 'img' or 'full', got {variant!r}")
        self.variant = variant
        # FULL holds text-only questions: no image is not a bad row there.
        self.requires_image = variant == "img"
        super().__init__(name)

    def to_row(self, raw, index, context):
        choices = list(raw["choices"])             # a null choice is a bad row (bad_choices), not the text "None"
        answer = raw.get("answer")
        valid = isinstance(answer, int) and 0 <= answer < len(choices)
        image = image_or_none(raw.get("image"))
        return {
            "id": f"{self.variant}-{index:05d}",
            "image": image,
            "question": raw["question"],
            "answers": [chr(ord("A") + answer)] if valid else [],
            "choices": choices,
            "meta": {"index": index, "answer_index": answer, "hint": raw.get("hint") or "",
                     "has_image": image is not None, "subject": raw.get("subject"), "category": raw.get("category"),
                     "grade": raw.get("grade"), "topic": raw.get("topic"), "task": raw.get("task")},
        }

    def prompt(self, row, options=None):
        self.resolve_options(options)
        hint = row_meta(row).get("hint") or ""
        context = f"Context: {hint}\n" if hint.strip() else ""
        return context + row["question"] + option_lines(row["choices"]) + MC_SUFFIX

    def _score(self, prediction, row, meta):
        letter = parse_scienceqa_letter(prediction)
        index = scienceqa_choice_index(letter, len(row["choices"]))
        correct = index >= 0 and letter == row["answers"][0]
        return {"score": float(correct), "parsed": letter, "failed": letter is None,
                "has_image": bool(meta.get("has_image"))}

    def _aggregate(self, scorings):
        with_image = [s["score"] for s in scorings if s.get("has_image")]
        overall = percent([s["score"] for s in scorings])
        headline = percent(with_image) if self.variant == "img" else overall
        return {"score": headline, "img_accuracy": percent(with_image), "accuracy": overall,
                "img_questions": len(with_image), "variant": self.variant}


SCIENCEQA_IMG = ScienceQABenchmark("scienceqa_img", "img")
SCIENCEQA_FULL = ScienceQABenchmark("scienceqa_full", "full")

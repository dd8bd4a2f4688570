"""GQA testdev-balanced (benchmarks.md §2, §3.2).

Data: `lmms-lab/GQA`, config `testdev_balanced_instructions` (split `testdev`) for the questions;
the images live in config `testdev_balanced_images` (split `testdev`) and are joined on
`imageId` == image `id`. A question whose image is missing is kept and flagged (bad row).
Prompt: question + short-answer suffix. Metric: LLaVA's exact match (strip, drop trailing '.',
lower-case, compare with the answer), reported overall and per structural question type.
"""
from __future__ import annotations

from ficoco.benchmarks.base import Benchmark, grouped_percent, image_table, percent
from ficoco.benchmarks.scoring import SHORT_ANSWER_SUFFIX, gqa_normalize


class GQABenchmark(Benchmark):
    name = "gqa"
    max_new_tokens = 128
    metric = "exact match (LLaVA rule), accuracy %"

    def load_raw(self, load, entry):
        questions = load(entry["config"], entry["split"])
        images_entry = entry.get("images")
        if not images_entry:
            raise ValueError("gqa: the registry entry needs `images: {config, split}` for the image config")
        images = load(images_entry["config"], images_entry.get("split", entry["split"]))
        return questions, image_table(images)

    def to_row(self, raw, index, lookup):
        answer = raw.get("answer")
        types = raw.get("types") or {}
        return {
            "id": raw["id"],
            "image": lookup.get(raw["imageId"]),
            "question": raw["question"],
            "answers": [answer] if answer else [],
            "choices": [],
            "meta": {"image_id": raw["imageId"], "full_answer": raw.get("fullAnswer"),
                     "is_balanced": raw.get("isBalanced"), "structural": types.get("structural"),
                     "semantic": types.get("semantic"), "detailed": types.get("detailed")},
        }

    def prompt(self, row, options=None):
        self.resolve_options(options)
        return row["question"] + SHORT_ANSWER_SUFFIX

    def _score(self, prediction, row, meta):
        parsed = gqa_normalize(prediction)
        return {"score": float(parsed == row["answers"][0]), "parsed": parsed, "failed": False,
                "structural": meta.get("structural")}

    def _aggregate(self, scorings):
        return {"score": percent([s["score"] for s in scorings]),
                "per_structural_type": grouped_percent(scorings, "structural")}


GQA = GQABenchmark()

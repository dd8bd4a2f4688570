"""POPE on COCO: adversarial, popular, random (benchmarks.md §2, §3.4).

Data: `lmms-lab/POPE`, default config, split `test` (9,000 rows; a `category` column names the
sampling). Option `categories` (default all three) selects categories at fetch time.
Prompt: question + short-answer suffix. Metric (LLaVA rule): parse yes/no (a piece equal to
"No", "not" or "no" before the first '.' means no), then per category precision, recall, F1,
accuracy and yes-ratio (share of predictions that are yes); headline = mean of the per-category F1.
"""
from __future__ import annotations

from types import MappingProxyType

from ficoco.benchmarks.base import YesNoBenchmark, yes_no_answers
from ficoco.benchmarks.scoring import SHORT_ANSWER_SUFFIX, binary_metrics, parse_pope_answer

POPE_CATEGORIES = ("adversarial", "popular", "random")


class POPEBenchmark(YesNoBenchmark):
    name = "pope"
    max_new_tokens = 128
    metric = "mean F1 % over adversarial/popular/random (LLaVA parse); accuracy, precision, recall, yes-ratio"
    required_meta = ("category",)         # the aggregate groups by it
    option_defaults = MappingProxyType({"categories": POPE_CATEGORIES})
    fetch_options = ("categories",)

    def resolve_options(self, options=None):
        resolved = super().resolve_options(options)
        categories = resolved["categories"]
        if isinstance(categories, str) or not categories or any(c not in POPE_CATEGORIES for c in categories):
            raise ValueError(f"pope option categories must be a non-empty list drawn from "
                             f"{', '.join(POPE_CATEGORIES)}; got {categories!r}")
        resolved["categories"] = sorted(set(categories))
        return resolved

    def select_rows(self, raw, options):
        wanted = set(options["categories"])
        if wanted == set(POPE_CATEGORIES):
            return raw, {}
        return raw.filter(lambda category: category in wanted, input_columns=["category"]), {}

    def to_row(self, raw, index, context):
        return {
            "id": f"{raw['category']}/{raw['question_id']}",
            "image": raw.get("image"),
            "question": raw["question"],
            "answers": yes_no_answers(raw),
            "choices": [],
            "meta": {"category": raw["category"], "question_id": raw["question_id"],
                     "image_source": raw.get("image_source")},
        }

    def prompt(self, row, options=None):
        self.resolve_options(options)
        return row["question"] + SHORT_ANSWER_SUFFIX

    def _score(self, prediction, row, meta):
        parsed = parse_pope_answer(prediction)
        truth = row["answers"][0]
        return {"score": float(parsed == truth), "parsed": parsed, "failed": False, "truth": truth,
                "category": meta.get("category")}

    def _aggregate(self, scorings):
        per_category = {}
        for category in sorted({s["category"] for s in scorings}):
            rows = [s for s in scorings if s["category"] == category]
            metrics = binary_metrics([s["parsed"] for s in rows], [s["truth"] for s in rows])
            per_category[category] = {key: (100.0 * value if key in ("precision", "recall", "f1", "accuracy", "yes_ratio")
                                            else value) for key, value in metrics.items()}
        f1s = [m["f1"] for m in per_category.values()]
        accuracies = [m["accuracy"] for m in per_category.values()]
        return {
            "score": sum(f1s) / len(f1s) if f1s else None,
            "f1_mean": sum(f1s) / len(f1s) if f1s else None,
            "accuracy_mean": sum(accuracies) / len(accuracies) if accuracies else None,
            "per_category": per_category,
        }


POPE = POPEBenchmark()

"""MME (benchmarks.md §2, §3.3).

Data: `lmms-lab/MME`, default config, split `test` (2,374 questions: two per image, 14 subtasks
in the `category` column; `question_id` names the image).
Prompt: LLaVA's `llava_mme.jsonl` text: the question with "Please answer yes or no." and the
whitespace before it removed (one or two spaces in MME), then the short-answer suffix; without
the phrase the suffix is appended to the question as it is.
Metric: per subtask acc (% questions) + acc+ (% images with both questions right); Perception =
sum of 10 subtasks (max 2000), Cognition = sum of 4 (max 800); headline = P + C.
"""
from __future__ import annotations

from ficoco.benchmarks.base import YesNoBenchmark, percent, yes_no_answers
from ficoco.benchmarks.scoring import SHORT_ANSWER_SUFFIX, parse_mme_answer

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "ocr")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
YES_NO_PHRASE = "Please answer yes or no."


def llava_mme_question(question: str) -> str:
    """The question part of LLaVA's MME prompt (before the short-answer suffix).

    LLaVA's `llava_mme.jsonl` (playground/data/eval/MME, haotian-liu/LLaVA) holds each MME question
    without "Please answer yes or no." and without the space(s) before it: a question ending in
    "?  Please answer yes or no." (two spaces, as some MME questions do) becomes "...?" + suffix,
    never "...? " + suffix. Its inverse, `convert_answer_to_mme.py` (same folder, `__main__`),
    removes the suffix, strips, and looks the question up again with " Please answer yes or no."
    or, failing that, "  Please answer yes or no." appended; this function is the matching forward
    step: delete the phrase, then strip. Without the phrase the question is returned unchanged.
    """
    if YES_NO_PHRASE not in question:
        return question
    return question.replace(YES_NO_PHRASE, "").strip()


def _image_key(subtask: str, question_id: str) -> str:
    """The image a question is about: its question_id ("<subtask>/<file>" in lmms-lab/MME)."""
    question_id = str(question_id)
    return question_id if question_id.startswith(f"{subtask}/") else f"{subtask}/{question_id}"


class MMEBenchmark(YesNoBenchmark):
    name = "mme"
    max_new_tokens = 128
    metric = "Perception + Cognition (sum of per-subtask acc + acc+)"
    headline_percent = False              # points, up to 2,800: not averaged with percentages
    required_meta = ("subtask",)          # the aggregate groups by it

    def to_row(self, raw, index, context):
        return {
            "id": f"{raw['question_id']}#{index}",
            "image": raw.get("image"),
            "question": raw["question"],
            "answers": yes_no_answers(raw),
            "choices": [],
            "meta": {"subtask": raw["category"], "image_key": _image_key(raw["category"], raw["question_id"])},
        }

    def prompt(self, row, options=None):
        self.resolve_options(options)
        return llava_mme_question(row["question"]) + SHORT_ANSWER_SUFFIX

    def _score(self, prediction, row, meta):
        parsed = parse_mme_answer(prediction)
        return {"score": float(parsed == row["answers"][0]), "parsed": parsed, "failed": parsed == "other",
                "subtask": meta["subtask"], "image_key": meta["image_key"]}

    def group_of(self, sample_id: str) -> str | None:
        question_id, separator, _ = sample_id.rpartition("#")   # "<question_id>#<row>" (to_row): the image
        return question_id if separator else None

    def _aggregate(self, scorings):
        subtasks = {}
        for name in sorted({s["subtask"] for s in scorings}):
            rows = [s for s in scorings if s["subtask"] == name]
            images: dict[str, list[float]] = {}
            for s in rows:
                images.setdefault(s["image_key"], []).append(s["score"])
            acc = percent([s["score"] for s in rows])
            acc_plus = percent([float(all(v == 1.0 for v in scores)) for scores in images.values()])
            subtasks[name] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                              "questions": len(rows), "images": len(images)}
        by_lower = {name.lower(): value for name, value in subtasks.items()}
        perception = sum(by_lower[n]["score"] for n in PERCEPTION if n in by_lower)
        cognition = sum(by_lower[n]["score"] for n in COGNITION if n in by_lower)
        known = set(PERCEPTION) | set(COGNITION)
        return {
            "score": perception + cognition if subtasks else None,
            "perception": perception,
            "cognition": cognition,
            "subtasks": subtasks,
            "missing_subtasks": sorted(known - set(by_lower)),
            "unknown_subtasks": sorted(name for name in subtasks if name.lower() not in known),
        }


MME = MMEBenchmark()

"""SEED-Bench, image questions (benchmarks.md §2, §3.7).

Data: `lmms-lab/SEED-Bench`, default config, split `test`, filtered to `data_type == "image"`
(the image column is a list of images; an image question has one). Registered as `seed_image`.
Prompt: question + `\\nA. ...\\nD. ...` + MC suffix. Metric (LLaVA rule,
scripts/convert_seed_for_submission.py `eval_single`): right iff the whole stripped answer equals
the answer letter (case-sensitive; "Answer: C", "C." and "c" are wrong and counted as failures);
accuracy overall and per question type.
"""
from __future__ import annotations

from ficoco.benchmarks.base import Benchmark, image_or_none, percent
from ficoco.benchmarks.scoring import FOUR_OPTION_LETTERS, MC_SUFFIX, option_lines, parse_seed_answer

CHOICE_COLUMNS = ("choice_a", "choice_b", "choice_c", "choice_d")


class SEEDBenchmark(Benchmark):
    name = "seed_image"
    max_new_tokens = 128
    metric = "accuracy % on image questions (whole answer == letter, LLaVA rule); per question type"

    def load_raw(self, load, entry):
        raw = load(entry.get("config"), entry["split"])
        return raw.filter(lambda kind: kind == "image", input_columns=["data_type"]), None

    def to_row(self, raw, index, context):
        images = raw.get("image")
        if isinstance(images, list):
            present = [image_or_none(i) for i in images]
            present = [i for i in present if i is not None]
            image = present[0] if present else None
        else:
            image = images
        answer = str(raw.get("answer") or "").strip().upper()
        return {
            "id": str(raw["question_id"]),
            "image": image,
            "question": raw["question"],
            # a letter that is no option leaves no answer: a bad row (empty_answers), as in MMBench
            "answers": [answer] if answer and answer in FOUR_OPTION_LETTERS else [],
            "choices": [raw.get(c) for c in CHOICE_COLUMNS],        # a null choice is a bad row (bad_choices)
            "meta": {"question_type_id": raw.get("question_type_id"), "data_id": raw.get("data_id"),
                     "data_type": raw.get("data_type"), "raw_answer": answer},
        }

    def prompt(self, row, options=None):
        self.resolve_options(options)
        return row["question"] + option_lines(row["choices"]) + MC_SUFFIX

    def _score(self, prediction, row, meta):
        letter = parse_seed_answer(prediction)
        return {"score": float(letter is not None and letter == row["answers"][0]), "parsed": letter,
                "failed": letter is None, "question_type_id": meta.get("question_type_id")}

    def _aggregate(self, scorings):
        by_type: dict[str, list[float]] = {}
        for s in scorings:
            by_type.setdefault(str(s.get("question_type_id")), []).append(s["score"])
        return {"score": percent([s["score"] for s in scorings]),
                "per_question_type": {k: percent(v) for k, v in sorted(by_type.items())}}


SEED_IMAGE = SEEDBenchmark()

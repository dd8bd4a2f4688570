"""MMBench dev, English and Chinese (benchmarks.md §2, §3.6).

Data: `lmms-lab/MMBench`, configs `en` and `cn`, split `dev`. The circular variants are separate
rows: a base question has `index` < 10^6, its rotations base + k*10^6. Registered as `mmbench`
(EN) and `mmbench_cn` (CN).
Prompt: `{hint}\\n` (when present) + question + `\\nA. ...` (options A.. up to the first empty one)
+ the MC suffix (CN: LLaVA's "\\n请直接回答选项字母。").
Metric: static extraction (bare letter; punctuated forms; unique option text; else wrong), then
circular accuracy: a base question counts only if every variant in its group is right. Reported
overall and per category, plus single-pass accuracy on the base rows.
"""
from __future__ import annotations

from ficoco.benchmarks.base import Benchmark, percent, row_meta
from ficoco.benchmarks.scoring import (FOUR_OPTION_LETTERS, MC_SUFFIX, MC_SUFFIX_CN, extract_mmbench_letter,
                                       is_missing_text, option_lines)

CIRCULAR_STRIDE = 1_000_000


class MMBenchBenchmark(Benchmark):
    max_new_tokens = 1024
    metric = "circular accuracy % (static extraction); per category; single-pass base-row accuracy"

    def __init__(self, name: str, lang: str):
        if lang not in ("en", "cn"):
            raise ValueError(f"mmbench language must be 'en' or 'cn', got {lang!r}")
        self.lang = lang
        super().__init__(name)

    def to_row(self, raw, index, context):
        question_index = int(raw["index"])
        options = {}
        for letter in FOUR_OPTION_LETTERS:             # A-D, as LLaVA's script reads them
            value = raw.get(letter)
            if is_missing_text(value):
                break
            options[letter] = str(value)
        hint = raw.get("hint")
        answer = str(raw.get("answer") or "").strip()
        category = raw.get("category")
        l2 = raw.get("L2-category", raw.get("l2-category"))
        return {
            "id": str(question_index),
            "image": raw.get("image"),
            "question": raw["question"],
            "answers": [answer] if answer in options else [],
            "choices": list(options.values()),
            "meta": {"index": question_index, "group": question_index % CIRCULAR_STRIDE,
                     "round": question_index // CIRCULAR_STRIDE, "options": options,
                     "hint": None if is_missing_text(hint) else str(hint),
                     "category": None if is_missing_text(category) else str(category),
                     "l2_category": None if is_missing_text(l2) else str(l2),
                     "source": raw.get("source"), "raw_answer": answer},
        }

    def prompt(self, row, options=None):
        self.resolve_options(options)
        hint = row_meta(row).get("hint")
        text = (f"{hint}\n" if hint else "") + row["question"] + option_lines(row["choices"])
        return text + (MC_SUFFIX_CN if self.lang == "cn" else MC_SUFFIX)

    def _score(self, prediction, row, meta):
        letter = extract_mmbench_letter(prediction, meta.get("options") or {})
        return {"score": float(letter is not None and letter == row["answers"][0]), "parsed": letter,
                "failed": letter is None, "group": meta["group"], "round": meta["round"],
                "category": meta.get("category")}

    def group_of(self, sample_id: str) -> int | None:
        # the id is the row's `index` (to_row); another id names no group
        return int(sample_id) % CIRCULAR_STRIDE if sample_id.isdigit() else None

    def _aggregate(self, scorings):
        groups: dict[int, list] = {}
        for s in scorings:
            groups.setdefault(int(s["group"]), []).append(s)
        circular = {}
        category_of = {}
        for group, rows in groups.items():
            circular[group] = float(all(r["score"] == 1.0 for r in rows))
            base = [r for r in rows if r["round"] == 0]
            category_of[group] = (base or rows)[0].get("category")
        per_category: dict[str, list[float]] = {}
        for group, correct in circular.items():
            per_category.setdefault(str(category_of[group]), []).append(correct)
        base_rows = [s["score"] for s in scorings if s["round"] == 0]
        return {
            "score": percent(list(circular.values())),
            "circular_accuracy": percent(list(circular.values())),
            "groups": len(circular),
            "per_category": {k: percent(v) for k, v in sorted(per_category.items())},
            "single_pass_accuracy": percent(base_rows),
            "base_rows": len(base_rows),
        }


MMBENCH_EN = MMBenchBenchmark("mmbench", "en")
MMBENCH_CN = MMBenchBenchmark("mmbench_cn", "cn")

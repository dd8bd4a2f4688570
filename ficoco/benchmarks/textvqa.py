"""TextVQA validation (benchmarks.md §2, §3.1).

Data: `lmms-lab/textvqa`, default config, split `validation` (5,000 questions, 10 answers each).
Prompt: question (`str.capitalize`) + [`\\nReference OCR token: t1, t2, ...` in OCR mode] +
short-answer suffix. Option `ocr: true|false` (default true: LLaVA-1.5's protocol, needed for the
paper's 58.2; in OCR mode the line is emitted even when the token list is empty).
Metric: VQA accuracy with the EvalAI normaliser.
"""
from __future__ import annotations

from types import MappingProxyType

from ficoco.benchmarks.base import VQAAccuracyBenchmark, row_meta
from ficoco.benchmarks.scoring import SHORT_ANSWER_SUFFIX, capitalize_question


class TextVQABenchmark(VQAAccuracyBenchmark):
    name = "textvqa"
    max_new_tokens = 128
    metric = "VQA accuracy % (EvalAI normalisation)"
    option_defaults = MappingProxyType({"ocr": True})

    def to_row(self, raw, index, context):
        return self.vqa_row(raw, {"question_id": raw["question_id"], "image_id": raw.get("image_id"),
                                  "ocr_tokens": [str(t) for t in (raw.get("ocr_tokens") or []) if t is not None],
                                  "set_name": raw.get("set_name")})

    def prompt(self, row, options=None):
        ocr = self.resolve_options(options)["ocr"]
        if not isinstance(ocr, bool):
            raise ValueError(f"textvqa option ocr must be true or false, got {ocr!r}")
        text = capitalize_question(row["question"])
        if ocr:
            text += "\nReference OCR token: " + ", ".join(row_meta(row).get("ocr_tokens") or [])
        return text + SHORT_ANSWER_SUFFIX


TEXTVQA = TextVQABenchmark()

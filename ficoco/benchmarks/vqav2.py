"""VQAv2 validation (benchmarks.md §2, §3.1).

Data: `lmms-lab/VQAv2`, default config, split `validation` (214,354; test-dev/test are
server-only, so numbers are not comparable with the paper's column). Option `subset_size: N`
(with `seed`, default 0) draws a deterministic subset at fetch time: sort the question ids, shuffle
them with `random.Random(seed)`, take the first N (rows keep their dataset order). The chosen ids
and their sha256 are stored in the manifest under `subset` (copied into metrics.json by the
evaluate job, so a subset score is labelled as such).
Prompt: question + short-answer suffix. Metric: VQA accuracy (EvalAI normalisation).
"""
from __future__ import annotations

import hashlib
import random
from types import MappingProxyType

from ficoco.benchmarks.base import VQAAccuracyBenchmark
from ficoco.benchmarks.scoring import SHORT_ANSWER_SUFFIX


def choose_subset(question_ids, size: int, seed: int) -> list:
    """The chosen question ids (sorted): sort all ids, shuffle with Random(seed), take `size`."""
    ordered = sorted(set(question_ids))
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= len(ordered):
        raise ValueError(f"vqav2 subset_size must be an integer in 1..{len(ordered)}, got {size!r}")
    random.Random(seed).shuffle(ordered)
    return sorted(ordered[:size])


def ids_hash(question_ids) -> str:
    return "sha256:" + hashlib.sha256(",".join(str(q) for q in question_ids).encode()).hexdigest()


class VQAv2Benchmark(VQAAccuracyBenchmark):
    name = "vqav2"
    max_new_tokens = 128
    metric = "VQA accuracy % (EvalAI normalisation), validation split (or a labelled subset)"
    option_defaults = MappingProxyType({"subset_size": None, "seed": 0})
    fetch_options = ("subset_size", "seed")
    group_key = "answer_type"
    group_label = "per_answer_type"

    def select_rows(self, raw, options):
        size = options["subset_size"]
        if size is None:
            return raw, {"subset": None}
        seed = options["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"vqav2 option seed must be an integer, got {seed!r}")
        ids = raw["question_id"]
        chosen = choose_subset(ids, size, seed)
        wanted = set(chosen)
        indices = [i for i, qid in enumerate(ids) if qid in wanted]
        subset = {"size": size, "seed": seed, "of": len(ids), "sha256": ids_hash(chosen), "question_ids": chosen}
        return raw.select(indices), {"subset": subset}

    def to_row(self, raw, index, context):
        return self.vqa_row(raw, {"question_id": raw["question_id"], "image_id": raw.get("image_id"),
                                  "answer_type": raw.get("answer_type"), "question_type": raw.get("question_type"),
                                  "multiple_choice_answer": raw.get("multiple_choice_answer")})

    def prompt(self, row, options=None):
        self.resolve_options(options)
        return row["question"] + SHORT_ANSWER_SUFFIX


VQAV2 = VQAv2Benchmark()

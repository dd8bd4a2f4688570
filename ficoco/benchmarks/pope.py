"""POPE on COCO: adversarial, popular, random (benchmarks.md §2, §3.4).

Data: `lmms-lab/POPE`, default config, split `test` (9,000 rows; a `category` column names the
sampling). Fetch-time options:
- `categories` (default all three) keeps only these categories;
- `question_set` (default `llava`) keeps LLaVA-1.5's 8,910 questions: the rows of LLaVA's
  `llava_pope_test.jsonl`, which has every adversarial and popular question but 2,910 of the 3,000
  random ones. The random questions it keeps are listed in `data/pope_llava_questions.json` (with
  their provenance) and matched to the hub rows by category + COCO image + the object asked about.
  `question_set: full` keeps all 9,000. Data without an `image_source` column cannot be matched:
  it is kept whole, with a warning, and the manifest records `question_set.name = full`.
Prompt: question + short-answer suffix. Metric (LLaVA rule): parse yes/no (a piece equal to
"No", "not" or "no" before the first '.' means no), then per category precision, recall, F1,
accuracy and yes-ratio (share of predictions that are yes); headline = mean of the per-category F1.
"""
from __future__ import annotations

import json
import logging
import re
import warnings
from collections import Counter
from pathlib import Path
from types import MappingProxyType

from ficoco.benchmarks.base import YesNoBenchmark, yes_no_answers
from ficoco.benchmarks.scoring import SHORT_ANSWER_SUFFIX, binary_metrics, parse_pope_answer

log = logging.getLogger(__name__)

POPE_CATEGORIES = ("adversarial", "popular", "random")
QUESTION_SETS = ("llava", "full")
#: LLaVA-1.5's POPE question set (see the file's `source` for where it comes from).
LLAVA_QUESTION_SET_PATH = Path(__file__).resolve().parent / "data" / "pope_llava_questions.json"
#: At most this many unmatched questions are named in an error.
SHOWN_MISSING = 5

#: "Is there a dog in the image?"; LLaVA's own file writes "imange" after "an" ("Is there an
#: umbrella in the imange?"), so both spellings are read.
_QUESTION = re.compile(r"^\s*Is there an? (?P<object>.+?) in the (?:image|imange)\?\s*$")
_TRAILING_NUMBER = re.compile(r"(\d+)(?:\.jpg)?\s*$")


def question_object(question) -> str | None:
    """The object a POPE question asks about ("dining table"), or None for any other text."""
    match = _QUESTION.match(str(question or ""))
    return match.group("object") if match else None


def coco_image_id(image_source) -> int | None:
    """The COCO image id in an image name ("COCO_val2014_000000310196[.jpg]" -> 310196), or None."""
    match = _TRAILING_NUMBER.search(str(image_source or ""))
    return int(match.group(1)) if match else None


def question_identity(category, image_source, question) -> tuple | None:
    """(category, COCO image id, object): how a hub row is matched to LLaVA's list (None: unreadable)."""
    image, thing = coco_image_id(image_source), question_object(question)
    if image is None or thing is None:
        return None
    return str(category), image, thing


def text_column(raw, name: str) -> list:
    """One column of a datasets.Dataset as Python strings (None stays None), read as bytes so that
    text that is not UTF-8 cannot stop the fetch (it is decoded with replacement characters and
    simply matches nothing)."""
    import pyarrow as pa

    column = raw.with_format("arrow")[name]
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = column.cast(pa.binary())
    values = column.to_pylist()
    return [value.decode("utf-8", "replace") if isinstance(value, bytes) else value for value in values]


def load_question_set(path: str | Path | None = None) -> dict:
    """The question-set file: `rows` per category, and `listed` identities for the categories that
    keep only some questions (categories not listed keep every question)."""
    with open(path or LLAVA_QUESTION_SET_PATH) as handle:
        data = json.load(handle)
    listed = {category: [(category, int(image), str(thing)) for _, image, thing in entries]
              for category, entries in data.get("listed", {}).items()}
    return {"name": data.get("name"), "source": data.get("source"), "rows": dict(data.get("rows", {})),
            "listed": listed}


def _refuse_unmatched(category: str, wanted: list, matched: Counter) -> None:
    """ValueError when a listed question matches no hub row or more than one."""
    missing = [identity for identity in wanted if matched[identity] == 0]
    repeated = [identity for identity in wanted if matched[identity] > 1]
    if not missing and not repeated:
        return
    examples = ", ".join(f"image {image} / {thing!r}" for _, image, thing in (missing or repeated)[:SHOWN_MISSING])
    raise ValueError(f"pope question_set llava: {len(missing)} of LLaVA's {len(wanted)} {category} questions match "
                     f"no row and {len(repeated)} match several (e.g. {examples}); the data is not the POPE "
                     f"release LLaVA used. Use question_set: full to keep every row")


def select_question_set(categories, image_sources, questions, wanted: set, question_set: dict) -> tuple[list, dict]:
    """`(row indices to keep, manifest description)` for the rows of `question_set` in `wanted`
    categories. Columns come as parallel lists; rows keep their dataset order.

    A category with a `listed` entry keeps exactly the rows whose identity is listed (each listed
    question must match one row); any other category keeps all its rows, whose count must equal the
    file's `rows`. Raises ValueError otherwise, naming the category, the counts and examples.
    """
    keep, per_category = [], Counter()
    matched = {category: Counter() for category in question_set["listed"]}
    listed = {category: set(entries) for category, entries in question_set["listed"].items()}
    for index, category in enumerate(categories):
        if category not in wanted:
            continue
        if category in listed:
            identity = question_identity(category, image_sources[index], questions[index])
            if identity not in listed[category]:
                continue
            matched[category][identity] += 1
        keep.append(index)
        per_category[category] += 1
    for category in sorted(wanted):
        if category in listed:
            _refuse_unmatched(category, question_set["listed"][category], matched[category])
        elif per_category[category] != question_set["rows"].get(category):
            raise ValueError(f"pope question_set llava: LLaVA evaluates all {question_set['rows'].get(category)} "
                             f"{category} questions but the data has {per_category[category]}; the data is not the "
                             f"POPE release LLaVA used. Use question_set: full to keep every row")
    source = question_set["source"] or {}
    description = {"name": question_set["name"], "rows": dict(sorted(per_category.items())),
                   "source": f"{source.get('repo')}@{source.get('commit')}:{source.get('path')}"}
    return keep, description


class POPEBenchmark(YesNoBenchmark):
    name = "pope"
    max_new_tokens = 128
    metric = "mean F1 % over adversarial/popular/random (LLaVA parse); accuracy, precision, recall, yes-ratio"
    required_meta = ("category",)         # the aggregate groups by it
    option_defaults = MappingProxyType({"categories": POPE_CATEGORIES, "question_set": "llava"})
    fetch_options = ("categories", "question_set")

    def resolve_options(self, options=None):
        resolved = super().resolve_options(options)
        categories = resolved["categories"]
        if isinstance(categories, str) or not categories or any(c not in POPE_CATEGORIES for c in categories):
            raise ValueError(f"pope option categories must be a non-empty list drawn from "
                             f"{', '.join(POPE_CATEGORIES)}; got {categories!r}")
        resolved["categories"] = sorted(set(categories))
        if resolved["question_set"] not in QUESTION_SETS:
            raise ValueError(f"pope option question_set {resolved['question_set']!r} is not a question set; valid: "
                             f"{', '.join(QUESTION_SETS)} (LLaVA's 8,910 questions, or all 9,000)")
        return resolved

    def select_rows(self, raw, options):
        wanted = set(options["categories"])
        if options["question_set"] == "llava" and "image_source" in raw.column_names:
            columns = [text_column(raw, name) for name in ("category", "image_source", "question")]
            keep, description = select_question_set(*columns, wanted, load_question_set())
            return raw.select(keep), {"question_set": description}
        description = {"name": "full"}
        if options["question_set"] == "llava":
            # Not POPE's COCO layout (no image names to match LLaVA's list by): nothing can be
            # matched, so every row is kept, loudly, and the manifest says so.
            description = {"name": "full", "requested": "llava",
                           "reason": "the data has no image_source column to match LLaVA's questions by"}
            message = (f"pope question_set llava: the data has no image_source column (columns: "
                       f"{', '.join(raw.column_names)}), so LLaVA's question list cannot be matched; keeping "
                       f"every row (the manifest records question_set.name = full)")
            log.warning(message)
            warnings.warn(message, UserWarning, stacklevel=2)
        if wanted != set(POPE_CATEGORIES):
            raw = raw.filter(lambda category: category in wanted, input_columns=["category"])
        return raw, {"question_set": description}

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

"""MMMU validation (the FiCoCo paper's v4 Table 2 column "MMMU"), as the MMMU authors evaluate LLaVA.

Data: `MMMU/MMMU`, one config per subject (the 30 of `SUBJECTS`), split `validation` (30 questions
each, 900 in all), concatenated in `SUBJECTS` order. Columns: `id`, `question`, `options` (a Python
list literal as a string), `image_1` … `image_7`, `answer`, `question_type` ("multiple-choice" or
"open"), `subfield`, `img_type`, `topic_difficulty`, `explanation`.

Reference: the MMMU repository's LLaVA evaluation (`mmmu/run_llava.py`, `mmmu/utils/data_utils.py`
`construct_prompt` with `configs/llava1.5.yaml`, `mmmu/utils/eval_utils.py`); each rule below says
which part it follows.

- Image: `image_1`, the one image the reference script passes to LLaVA; the `<image k>` references
  stay in the text as written. The script's random-answer branch for questions with several images
  in their options looks for `<img='…'>` references, which the hub data does not contain, so every
  question runs with `image_1`. How many images a question has is kept in `meta["images"]`.
- Prompt (the text after `<image>\\n`): the config's templates are double-quoted YAML scalars whose
  blank lines fold to single newlines, so a multiple-choice prompt is
  `{question}\\n(A) {option}\\n(B) {option}\\n…\\n\\nAnswer with the option's letter from the given choices
  directly.` (each option line ends with a newline) and an open prompt is
  `{question}\\nAnswer the question using a single word or phrase.`
- Multiple choice (`parse_choice`): the letter written as "(X)", else as a bare " X ", else (for a
  response of more than 5 words) the option whose text appears; of several candidates the one
  written last. When nothing is found the reference picks a letter with `random.choice`; here the
  pick is seeded by the question id (`random.Random(id)`), so a rerun scores the same, and the
  scoring says `random_pick` (counted under `failures`).
- Open (`parse_open`, `open_correct`): the reference's key-phrase and number extraction, and its
  match (a number equal after rounding to 2 decimals, or a gold string contained in a predicted one).
- Metric: accuracy over all questions (the reference's micro average), per discipline and per
  subject. Decoding is greedy with at most 128 new tokens, as for every benchmark here.
"""
from __future__ import annotations

import ast
import random
import re

from ficoco.benchmarks.base import Benchmark, grouped_percent, image_or_none, percent

SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."

#: discipline -> its subjects (the dataset's configs), in the reference's order
DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
DISCIPLINE_OF = {subject: discipline for discipline, subjects in DISCIPLINES.items() for subject in subjects}
SUBJECTS = tuple(sorted(DISCIPLINE_OF))
QUESTION_TYPES = ("multiple-choice", "open")
IMAGE_COLUMNS = tuple(f"image_{k}" for k in range(1, 8))


def option_texts(options) -> list[str]:
    """The options cell (a list literal as a string, or a list) as a list of strings."""
    values = ast.literal_eval(options) if isinstance(options, str) else options
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"options is not a list: {options!r}")
    return [str(value) for value in values]


def gold_answers(answer) -> list[str]:
    """The answer cell as a list: a letter, a string, or (some open questions) a list literal of strings."""
    text = str(answer).strip()
    if text.startswith("["):
        try:
            values = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return [text]
        if isinstance(values, (list, tuple)):
            return [str(value) for value in values]
    return [text] if text else []


def subject_of(question_id: str) -> str | None:
    """The subject in an id such as "validation_Art_Theory_12" (None when it names no subject)."""
    _, _, rest = question_id.partition("_")
    subject = rest.rpartition("_")[0]
    return subject if subject in DISCIPLINE_OF else None


def choice_letters(n_options: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n_options)]


# --------------------------------------------------------------------------------------------
# Multiple choice (eval_utils.parse_multi_choice_response)

def parse_choice(response: str, options: list[str], question_id: str) -> tuple[str, bool]:
    """(the chosen letter, whether it was a random pick because no letter or option text was found)."""
    letters = choice_letters(len(options))
    for char in ",.!?;:'":                       # the reference strips these one after another
        response = response.strip(char)
    padded = f" {response} "                     # so that " A " also matches at either end
    candidates = [letter for letter in letters if f"({letter})" in padded]
    bracketed = bool(candidates)
    if not candidates:
        candidates = [letter for letter in letters if f" {letter} " in padded]
    by_text = False
    if not candidates and len(padded.split()) > 5:
        candidates = [letter for letter, text in zip(letters, options) if text.lower() in padded.lower()]
        by_text = bool(candidates)
    if not candidates:
        return random.Random(question_id).choice(letters), True
    if len(candidates) == 1:
        return candidates[0], False

    def last_position(letter: str) -> int:
        if by_text:
            return padded.lower().rfind(options[letters.index(letter)].lower())
        return padded.rfind(f"({letter})" if bracketed else f" {letter} ")

    positions = [last_position(letter) for letter in candidates]
    return candidates[positions.index(max(positions))], False   # the first of equal positions, as argmax


# --------------------------------------------------------------------------------------------
# Open questions (eval_utils.parse_open_response, normalize_str, extract_numbers, eval_open)

KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
TRIVIAL_KEYS = frozenset(":,.!?;'")


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def normalised(text: str) -> list:
    """A number (commas dropped) as its float rounded to 2 decimals; other text lower-cased, a single
    character padded with a space on either side (two forms) so it cannot match inside a word."""
    text = text.strip()
    number = _as_number(text)
    if number is not None:
        return [round(number, 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def numbers_in(text: str) -> list[str]:
    """Numbers written with thousands commas, in scientific notation, and plain, in that order."""
    return _NUMBER_WITH_COMMAS.findall(text) + _NUMBER_SCIENTIFIC.findall(text) + _NUMBER_SIMPLE.findall(text)


def key_phrases(response: str) -> list[str]:
    """Per line of the lower-cased response, the shortest tail after a key indicator ("is ", "so ", …;
    on the last line also "="); the whole response when no line has one.

    The reference also splits at ". " before a capital letter, which never occurs after lower-casing.
    """
    response = response.strip().strip(".").lower()
    lines = response.split("\n")
    phrases = []
    for index, line in enumerate(lines):
        indicators = KEY_INDICATORS + (("=",) if index == len(lines) - 1 else ())
        shortest = ""
        for indicator in indicators:
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):   # an empty tail is replaced by the next one
                    shortest = tail
        if shortest and shortest not in TRIVIAL_KEYS:
            phrases.append(shortest)
    return phrases or [response]


def parse_open(response: str) -> list:
    """The normalised candidates of an open answer: key phrases and every number in them (no duplicates)."""
    phrases = key_phrases(response)
    candidates = phrases + [number for phrase in phrases for number in numbers_in(phrase)]
    return list(dict.fromkeys(form for candidate in candidates for form in normalised(candidate)))


def open_correct(candidates: list, answers: list[str]) -> bool:
    """A numeric candidate equal to a numeric gold, or a gold string contained in a candidate string."""
    golds = [form for answer in answers for form in normalised(answer)]
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(gold, str) and gold in candidate for gold in golds):
                return True
        elif candidate in golds:
            return True
    return False


# --------------------------------------------------------------------------------------------

class MMMUBenchmark(Benchmark):
    name = "mmmu"
    max_new_tokens = 128
    metric = "accuracy % (MMMU rules): overall, per discipline and per subject"
    required_meta = ("subject", "question_type")

    def load_raw(self, load, entry):
        """Every subject's config, concatenated in `SUBJECTS` order (the registry's `config` is not used)."""
        from datasets import concatenate_datasets

        return concatenate_datasets([load(subject, entry["split"]) for subject in SUBJECTS]), None

    def to_row(self, raw, index, context):
        question_type = raw.get("question_type")
        options = option_texts(raw.get("options") or "[]") if question_type == "multiple-choice" else []
        subject = subject_of(str(raw["id"]))
        return {
            "id": str(raw["id"]),
            "image": image_or_none(raw.get("image_1")),
            "question": raw["question"],
            "answers": gold_answers(raw.get("answer") or ""),
            "choices": options,
            "meta": {"subject": subject, "discipline": DISCIPLINE_OF.get(subject), "question_type": question_type,
                     "subfield": raw.get("subfield"), "topic_difficulty": raw.get("topic_difficulty"),
                     "images": sum(image_or_none(raw.get(column)) is not None for column in IMAGE_COLUMNS)},
        }

    def bad_row_reasons(self, row, meta):
        reasons = super().bad_row_reasons(row, meta)
        question_type = meta.get("question_type")
        if question_type is not None and question_type not in QUESTION_TYPES:
            reasons.append(f"question_type_not_{'_or_'.join(QUESTION_TYPES)}")
        elif question_type == "multiple-choice":
            if not row["choices"]:
                reasons.append("no_options")
            elif row["answers"] and row["answers"][0] not in choice_letters(len(row["choices"])):
                reasons.append("answer_not_an_option_letter")
        return reasons

    def prompt(self, row, options=None):
        self.resolve_options(options)
        if row["choices"]:
            lines = "".join(f"({letter}) {text}\n" for letter, text in zip(choice_letters(len(row["choices"])),
                                                                             row["choices"]))
            return f"{row['question']}\n{lines}\n{CHOICE_INSTRUCTION}"
        return f"{row['question']}\n{SHORT_ANSWER_INSTRUCTION}"

    def _score(self, prediction, row, meta):
        if meta["question_type"] == "multiple-choice":
            letter, random_pick = parse_choice(prediction, row["choices"], row["id"])
            correct, parsed = letter in row["answers"], letter
        else:
            random_pick = False
            parsed = parse_open(prediction)
            correct = open_correct(parsed, row["answers"])
        return {"score": float(correct), "parsed": parsed, "failed": random_pick, "random_pick": random_pick,
                "subject": meta["subject"], "discipline": meta.get("discipline")}

    def _aggregate(self, scorings):
        return {"score": percent([s["score"] for s in scorings]),
                "per_discipline": grouped_percent(scorings, "discipline"),
                "per_subject": grouped_percent(scorings, "subject"),
                "random_picks": sum(1 for s in scorings if s.get("random_pick"))}


MMMU = MMMUBenchmark()

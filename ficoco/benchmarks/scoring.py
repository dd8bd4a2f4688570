"""Shared scoring rules (spec: /work/shared/spec/benchmarks.md §3), written from the rule text and
held to LLaVA-1.5's own evaluation scripts where the spec follows them (each section names the
reference file and function it reproduces).

Every function here is pure: a string (and the item's ground truth) in, a parsed answer or a
score out. Benchmark modules combine them; nothing is copied between modules.

Contents
- VQA accuracy with the EvalAI normaliser (§3.1): `normalize_vqa_answer`, `vqa_accuracy`
- GQA exact match (§3.2): `gqa_normalize`, `gqa_exact_match`
- MME yes/no parse (§3.3): `parse_mme_answer`
- POPE yes/no parse and binary metrics (§3.4): `parse_pope_answer`, `binary_metrics`
- ScienceQA letter parse (§3.5): `parse_scienceqa_letter`, `scienceqa_choice_index`
- MMBench static extraction (§3.6): `extract_mmbench_letter`
- SEED whole-answer match (§3.7): `parse_seed_answer`
- Prompt helpers shared by several benchmarks: `capitalize_question`, `option_lines`, suffixes
"""
from __future__ import annotations

import re
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence

# --------------------------------------------------------------------------------------------
# Prompt pieces shared by several benchmarks (benchmarks.md §2)
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
MC_SUFFIX_CN = "\n请直接回答选项字母。"
OPTION_LETTERS = "ABCDE"
FOUR_OPTION_LETTERS = "ABCD"          # MMBench and SEED-Bench: options A-D (benchmarks.md §2)


def capitalize_question(question: str) -> str:
    """Python's `str.capitalize` (first letter upper, the rest lower), as the spec prescribes."""
    return question.capitalize()


def option_lines(options: Sequence[str]) -> str:
    """`\\nA. first\\nB. second...` for the given option texts (letters A, B, C, ... in order)."""
    if len(options) > 26:
        raise ValueError(f"at most 26 options can be lettered, got {len(options)}")
    return "".join(f"\n{chr(ord('A') + i)}. {text}" for i, text in enumerate(options))


def is_missing_text(value) -> bool:
    """True for None, NaN, empty/whitespace strings and the strings 'nan'/'none' (any case).

    MMBench stores absent hints and options as NaN or the string 'nan' depending on the export.
    """
    if value is None:
        return True
    if isinstance(value, float) and value != value:  # NaN
        return True
    text = str(value).strip()
    return text == "" or text.lower() in ("nan", "none")


# --------------------------------------------------------------------------------------------
# §3.1 VQA accuracy with the EvalAI normaliser
#
# Reference (every table and step below reproduces it exactly): the answer processor of LLaVA's own
# TextVQA evaluator, `EvalAIAnswerProcessor` in llava/eval/m4c_evaluator.py (haotian-liu/LLaVA; read
# from its copy in pixas/LLaVA@fbd51158), which is MMF's "processes an answer similar to Eval AI"
# processor. Its tables (contractions, number map, articles, periodStrip, commaStrip, punctuation)
# are the EvalAI VQA challenge evaluator's: Cloud-CV/VQA-Evaluation@993bc7c5,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py (`contractions`, `manualMap`, `articles`,
# `periodStrip`, `commaStrip`, `punct`). The original GT-Vision-Lab/VQA vqaEval.py differs (curly
# apostrophes in the contraction table, ':' and "'" among its punctuation, no '{', '}', '-', '!');
# LLaVA's numbers and the EvalAI servers use the straight-apostrophe version reproduced here.

#: Step 2 characters (`punct` / `PUNCTUATIONS`, in the reference's order). The comma and question
#: mark are already gone after step 1; they are listed because the reference lists them.
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
                   "<", "@", "`", ",", "?", "!")

#: Step 3 number words (`manualMap` / `NUMBER_MAP`).
VQA_NUMBER_WORDS: Mapping[str, str] = MappingProxyType({
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
})

#: Step 3 articles (dropped).
VQA_ARTICLES = frozenset({"a", "an", "the"})


def _evalai_contractions() -> dict[str, str]:
    """The EvalAI contraction table, entry for entry (straight apostrophes), grouped by stem.

    Kept as the reference has it, quirks included, because matching LLaVA's numbers needs the same
    table rather than a better one:
    - the keys "Im", "Ive", "Id've" and "I'dve" start with a capital and are never looked up (step 3
      lower-cases first), so "im" stays "im";
    - "somebody'd" maps to "somebodyd" (the reverse direction);
    - several keys already carry an apostrophe ("let's", "she's", "couldn'tve", ...).
    Ordinary words that look like contractions (its, hell, shell, well, wed, ill, id, were, shed,
    lets) are not in it.
    """
    negations = {
        "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't",
        "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't",
        "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've",
        "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't",
        "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
        "mustnt": "mustn't", "neednt": "needn't", "notve": "not've", "oughtnt": "oughtn't",
        "shant": "shan't", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
        "shouldn'tve": "shouldn't've", "wasnt": "wasn't", "werent": "weren't", "wont": "won't",
        "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    }
    perfects = {
        "couldve": "could've", "mightve": "might've", "mustve": "must've", "shouldve": "should've",
        "wouldve": "would've",
    }
    pronouns = {
        "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
        "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
        "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
        "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
        "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
        "theyre": "they're", "theyve": "they've",
        "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
        "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
        "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
        "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
        "youre": "you're", "youve": "you've",
    }
    indefinites = {
        "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
        "somebodyll": "somebody'll", "somebodys": "somebody's",
        "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
        "someonell": "someone'll", "someones": "someone's",
        "somethingd": "something'd", "somethingd've": "something'd've",
        "something'dve": "something'd've", "somethingll": "something'll",
    }
    wh_and_there = {
        "howd": "how'd", "howll": "how'll", "hows": "how's",
        "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
        "therere": "there're", "theres": "there's",
        "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
        "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
        "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
        "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    }
    others = {
        "let's": "let's", "maam": "ma'am", "oclock": "o'clock", "ow's'at": "'ow's'at",
        "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "twas": "'twas",
    }
    return {**negations, **perfects, **pronouns, **indefinites, **wh_and_there, **others}


#: Built once at import, never mutated.
VQA_CONTRACTIONS: Mapping[str, str] = MappingProxyType(_evalai_contractions())

#: `commaStrip`: one or more commas between two digits (used only as a condition in step 2).
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d),+(?=\d)")
#: `periodStrip`: a period not followed by a digit. The reference's look-behind is written
#: `(?!<=\d)`, a look-ahead for the text "<=digit" that never matches at a period, so it has no effect.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
#: The reference calls `periodStrip.sub("", text, re.UNICODE)`: the flag lands in `count`, so at
#: most re.UNICODE == 32 periods are deleted. Reproduced: an answer with more keeps the rest.
VQA_PERIOD_STRIP_COUNT = int(re.UNICODE)


def vqa_tokenise(text: str) -> str:
    """Step 1 (`word_tokenize`, then newlines/tabs): lower-case; delete , and ?; "'s" -> " 's";
    strip; newlines/tabs -> space; strip."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_punctuation(text: str) -> str:
    """Step 2 (`processPunctuation`): each listed character is deleted when the input has it next to
    a space or has digits around commas, else replaced by a space; then up to 32 periods that are
    not followed by a digit are deleted."""
    original = text
    has_digit_comma_digit = _COMMA_BETWEEN_DIGITS.search(original) is not None
    out = text
    for p in VQA_PUNCTUATION:
        if (p + " ") in original or (" " + p) in original or has_digit_comma_digit:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=VQA_PERIOD_STRIP_COUNT)


def vqa_digits_articles(text: str) -> str:
    """Step 3 (`processDigitArticle`): lower-case, split; number words -> digits; drop articles;
    contractions (looked up on the mapped word); re-join with single spaces."""
    words = []
    for word in text.lower().split():
        word = VQA_NUMBER_WORDS.get(word, word)
        if word in VQA_ARTICLES:
            continue
        words.append(VQA_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """The full normaliser (steps 1-3 of §3.1), applied to predictions and ground truths alike."""
    return vqa_digits_articles(vqa_punctuation(vqa_tokenise(str(text))))


def vqa_accuracy(prediction: str, ground_truths: Sequence[str]) -> float:
    """acc = (1/n) * sum_i min(1, #{j != i : g_j == p} / 3) over normalised answers (0..1).

    Raises ValueError for an empty ground-truth list (such rows are flagged as bad rows and never
    reach this function).
    """
    if not ground_truths:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer, got an empty list")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(g) for g in ground_truths]
    n = len(gts)
    total = 0.0
    for i in range(n):
        matches = sum(1 for j in range(n) if j != i and gts[j] == pred)
        total += min(1.0, matches / 3.0)
    return total / n


# --------------------------------------------------------------------------------------------
# §3.2 GQA exact match (LLaVA rule)

def gqa_normalize(prediction: str) -> str:
    """Strip, remove trailing '.' characters, lower-case (in that order)."""
    return str(prediction).strip().rstrip(".").lower()


def gqa_exact_match(prediction: str, answer: str) -> bool:
    return gqa_normalize(prediction) == answer


# --------------------------------------------------------------------------------------------
# §3.3 MME

def parse_mme_answer(prediction: str) -> str:
    """'yes' | 'no' | 'other' following the MME parse rule."""
    text = str(prediction).lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


# --------------------------------------------------------------------------------------------
# §3.4 POPE

def parse_pope_answer(prediction: str) -> str:
    """'yes' | 'no': cut at the first '.', delete ',', split on single spaces; a piece equal to
    'No', 'not' or 'no' makes the answer 'no', everything else is 'yes'."""
    text = str(prediction)
    if "." in text:
        text = text.split(".", 1)[0]
    pieces = text.replace(",", "").split(" ")
    return "no" if any(piece in ("No", "not", "no") for piece in pieces) else "yes"


def _ratio(num: float, den: float) -> float:
    """num/den, defined as 0.0 when den == 0 (e.g. precision with no positive predictions)."""
    return num / den if den else 0.0


def binary_metrics(predictions: Iterable[str], truths: Iterable[str], positive: str = "yes") -> dict:
    """TP/FP/TN/FN, precision, recall, F1, accuracy and yes-ratio (share of *predictions* that are
    positive). Ratios with a zero denominator are 0.0. All ratios are in 0..1."""
    tp = fp = tn = fn = 0
    for pred, truth in zip(predictions, truths, strict=True):
        if pred == positive:
            if truth == positive:
                tp += 1
            else:
                fp += 1
        else:
            if truth == positive:
                fn += 1
            else:
                tn += 1
    total = tp + fp + tn + fn
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "accuracy": _ratio(tp + tn, total),
        "yes_ratio": _ratio(tp + fp, total),
        "n": total,
    }


# --------------------------------------------------------------------------------------------
# §3.5 ScienceQA letter parsing (LLaVA rule)
#
# Reference: llava/eval/eval_science_qa.py, the `__main__` loop and `get_pred_idx` of LLaVA-1.5
# (haotian-liu/LLaVA; read from its copy in afra-baas/LLaVA@d57f942b, identical in the parse).

#: LLaVA's pattern, kept as written: its "." is a regex dot (any character except a newline), so
#: "The answer is B," / "The answer is B!" / "The answer is B because ..." all read B, while
#: "The answer is B" at the very end, or followed by a newline, does not match.
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_scienceqa_letter(prediction: str, letters: str = OPTION_LETTERS) -> str | None:
    """The option letter, or None (LLaVA's "FAILED").

    1. the stripped prediction is exactly one of `letters`; 2. it has >= 3 characters, starts with
    one of `letters` and continues with ". "; 3. LLaVA's pattern `The answer is ([A-Z]).` (the dot
    matches any character but a newline) matches exactly once (findall). The letter of step 3 may
    be any capital; the caller checks it against the item's choices (`scienceqa_choice_index`).
    """
    text = str(prediction).strip()
    if len(text) == 1 and text in letters:
        return text
    if len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    if len(found) == 1:
        return found[0]
    return None


def scienceqa_choice_index(letter: str | None, n_choices: int, letters: str = OPTION_LETTERS) -> int:
    """LLaVA's `get_pred_idx` (1.5): the letter's position when it is among the first `n_choices`
    of `letters`, else -1 (counted wrong; LLaVA-1.5 returns -1 before its old random-guess line)."""
    if letter is not None and len(letter) == 1 and letter in letters[:n_choices]:
        return letters.index(letter)
    return -1


# --------------------------------------------------------------------------------------------
# §3.6 MMBench static extraction

#: Step 2 punctuated forms, in the order they are tried.
MMBENCH_FORMS = ("X.", "X,", "X:", "X)", "X).", "(X)", "(X).", ":X", ":X,", ":X.", ":X)", ":X).")


def extract_mmbench_letter(prediction: str, options: Mapping[str, str],
                           letters: str = OPTION_LETTERS) -> str | None:
    """The chosen option letter, or None (counted as wrong).

    `options` maps letter -> option text for the item's non-empty options (used in step 3).
    """
    text = str(prediction)
    pieces = text.split()
    # Step 1: bare letters, skipped when "A" is present in a prediction of more than 3 pieces.
    if not ("A" in pieces and len(pieces) > 3):
        bare = [letter for letter in letters if letter in pieces]
        if len(bare) == 1:
            return bare[0]
    # Step 2: punctuated forms in order; the first form matched by exactly one letter decides.
    for form in MMBENCH_FORMS:
        hits = [letter for letter in letters if form.replace("X", letter) in pieces]
        if len(hits) == 1:
            return hits[0]
    # Step 3: exactly one option's text (lower-cased) occurs in the lower-cased prediction.
    lowered = text.lower()
    hits = [letter for letter, option in options.items()
            if option and option.lower() in lowered]
    if len(hits) == 1:
        return hits[0]
    return None


# --------------------------------------------------------------------------------------------
# §3.7 SEED-Bench (LLaVA rule)
#
# Reference: scripts/convert_seed_for_submission.py, `eval_single` (haotian-liu/LLaVA@524a75b7):
# a prediction is right iff `row['text'] == question_data['answer']`, the whole (stripped, by
# llava/eval/model_vqa_loader.py) output equal to the answer letter, case-sensitive. Nothing is
# extracted: "Answer: C", "C." and "c" are all wrong.

SEED_LETTERS = "ABCD"


def parse_seed_answer(prediction: str, letters: str = SEED_LETTERS) -> str | None:
    """The stripped prediction when it is exactly one of `letters` (case-sensitive), else None.

    Comparing this with the answer letter is LLaVA's whole-string equality: None never equals a
    letter, and any other text is neither a letter nor equal to one.
    """
    text = str(prediction).strip()
    return text if len(text) == 1 and text in letters else None

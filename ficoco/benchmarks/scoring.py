"""Shared scoring rules (spec: /work/shared/spec/benchmarks.md §3), written from the rule text.

Every function here is pure: a string (and the item's ground truth) in, a parsed answer or a
score out. Benchmark modules combine them; nothing is copied between modules.

Contents
- VQA accuracy with the EvalAI-style normaliser (§3.1): `normalize_vqa_answer`, `vqa_accuracy`
- GQA exact match (§3.2): `gqa_normalize`, `gqa_exact_match`
- MME yes/no parse (§3.3): `parse_mme_answer`
- POPE yes/no parse and binary metrics (§3.4): `parse_pope_answer`, `binary_metrics`
- ScienceQA letter parse (§3.5): `parse_scienceqa_letter`
- MMBench static extraction (§3.6): `extract_mmbench_letter`
- SEED first letter (§3.7): `first_letter`
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

#: Step 2 punctuation characters (the comma and question mark are already gone after step 1,
#: they are listed for completeness because the rule lists them).
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
                   "<", "@", "`", ",", "?", "!")

#: Step 3 number words.
VQA_NUMBER_WORDS: Mapping[str, str] = MappingProxyType({
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
})

#: Step 3 articles (dropped).
VQA_ARTICLES = frozenset({"a", "an", "the"})


def _build_contractions() -> dict[str, str]:
    """Apostrophe-less contraction -> apostrophe form, written for this project.

    Principle: a form is listed when (1) the apostrophe-less spelling is what annotators and
    models type for a standard contraction, and (2) it is not itself a common English word whose
    meaning would be changed by adding the apostrophe. Step 1 of the normaliser already splits
    "'s" off ("that's" -> "that 's"), so the 's forms below only matter for the apostrophe-less
    spelling ("thats").

    Deliberately NOT listed (ambiguous with an ordinary word): its (possessive), hell (he'll),
    shell (she'll), well (we'll), wed (we'd), ill (I'll), id (I'd), shed (she'd), were (we're).
    Listed despite a second reading: lets (also a verb form), cant and wont (rare nouns), because
    in VQA answers they are overwhelmingly the contractions.
    """
    negations = {  # <verb>nt -> <verb>n't
        "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
        "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
        "havent": "haven't", "isnt": "isn't", "mightnt": "mightn't", "mustnt": "mustn't",
        "neednt": "needn't", "shant": "shan't", "shouldnt": "shouldn't", "wasnt": "wasn't",
        "werent": "weren't", "wont": "won't", "wouldnt": "wouldn't", "aint": "ain't",
    }
    pronouns = {  # pronoun + 'm / 're / 've / 'll / 'd / 's
        "im": "i'm", "ive": "i've",
        "youre": "you're", "youve": "you've", "youll": "you'll", "youd": "you'd",
        "theyre": "they're", "theyve": "they've", "theyll": "they'll", "theyd": "they'd",
        "weve": "we've",
        "hes": "he's", "hed": "he'd", "shes": "she's",
        "thats": "that's", "whats": "what's", "wheres": "where's", "whos": "who's",
        "whys": "why's", "hows": "how's", "theres": "there's", "heres": "here's",
        "lets": "let's", "whod": "who'd", "wholl": "who'll", "whove": "who've",
        "itll": "it'll", "itd": "it'd", "thatll": "that'll", "thered": "there'd",
        "therell": "there'll", "somebodys": "somebody's", "someones": "someone's",
        "somethings": "something's",
    }
    perfects = {  # modal + 've
        "couldve": "could've", "shouldve": "should've", "wouldve": "would've",
        "mightve": "might've", "mustve": "must've",
    }
    return {**negations, **pronouns, **perfects}


#: Built once at import, never mutated.
VQA_CONTRACTIONS: Mapping[str, str] = MappingProxyType(_build_contractions())

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def vqa_tokenise(text: str) -> str:
    """Step 1: lower-case; delete , and ?; "'s" -> " 's"; strip; newlines/tabs -> space; strip."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_punctuation(text: str) -> str:
    """Step 2: the punctuation rule, then delete every '.' that is not followed by a digit."""
    original = text
    has_digit_comma_digit = _DIGIT_COMMA_DIGIT.search(original) is not None
    out = text
    for p in VQA_PUNCTUATION:
        if (p + " ") in original or (" " + p) in original or has_digit_comma_digit:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def vqa_digits_articles(text: str) -> str:
    """Step 3: number words -> digits, drop articles, contractions, re-join with single spaces."""
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
# §3.5 ScienceQA letter parsing

_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z])\.")


def parse_scienceqa_letter(prediction: str, letters: str = OPTION_LETTERS) -> str | None:
    """The option letter, or None (a failure).

    1. the stripped prediction is exactly a letter; 2. it has >= 3 characters, starts with a
    letter and continues with ". "; 3. "The answer is X." (X uppercase, the period literal)
    occurs exactly once. The letter found in step 3 is returned even if it is not among
    `letters`; the caller checks it against the item's choices.
    """
    text = str(prediction).strip()
    if text in letters and len(text) == 1:
        return text
    if len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    if len(found) == 1:
        return found[0]
    return None


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
# §3.7 SEED-Bench

def first_letter(prediction: str) -> str | None:
    """The first character of the stripped prediction, upper-cased; None for an empty answer."""
    text = str(prediction).strip()
    return text[0].upper() if text else None

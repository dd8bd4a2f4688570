"""Scoring rules (benchmarks.md §3) on hand-worked cases.

Every expected value is derived by hand from the rule text; the derivation is in the comment
next to it. Rows are normalised rows (contracts §5) written out directly.
"""
from __future__ import annotations

import json

import pytest

from ficoco import benchmarks
from ficoco.benchmarks.base import JudgeUnavailable
from ficoco.benchmarks.scoring import (VQA_CONTRACTIONS, binary_metrics, extract_mmbench_letter, gqa_exact_match,
                                       normalize_vqa_answer, parse_mme_answer, parse_pope_answer,
                                       parse_scienceqa_letter, parse_seed_answer, vqa_accuracy, vqa_punctuation)


def row(rid, answers, choices=(), question="q?", image="img", **meta):
    return {"id": rid, "image": image, "question": question, "answers": list(answers), "choices": list(choices),
            "meta": json.dumps(meta)}


# ---------------------------------------------------------------------------------------------
# §3.1 VQA normalisation and accuracy

@pytest.mark.parametrize("raw, expected", [
    # step 1 lower-cases; step 2 deletes the final "." (no digit after it); step 3 maps two -> 2
    ("Two dogs.", "2 dogs"),
    # step 3: number words none..ten, "none" -> 0; "eleven" is not in the table
    ("none", "0"), ("Ten", "10"), ("eleven", "eleven"),
    # step 3 drops the articles a / an / the, wherever they are
    ("The Cat", "cat"), ("an apple on a table", "apple on table"), ("a", ""),
    # step 1 deletes "," and "?"; "1,000" -> "1000" before the punctuation step sees it
    ("1,000", "1000"), ("what?", "what"),
    # periods: kept when a digit follows, deleted otherwise (also after a digit)
    ("3.5", "3.5"), ("5.", "5"), ("e.g. yes", "eg yes"),
    # "!" with no space next to it is replaced by a space; "-" with a space next to it is deleted
    ("yes!", "yes"), ("black-and-white", "black and white"), ("hi - there", "hi there"),
    # newlines and tabs become spaces, runs of spaces collapse in step 3
    ("yes\nno\tmaybe", "yes no maybe"),
    # contractions (EvalAI's table): apostrophe-less forms gain the apostrophe; the apostrophe form is
    # left alone; EvalAI's key "Im" is capitalised and never matches lower-cased text, so "im" stays
    ("dont know", "don't know"), ("Don't", "don't"), ("isnt", "isn't"), ("cant", "can't"), ("wont", "won't"),
    ("youre right", "you're right"), ("im", "im"), ("thats it", "that's it"),
    # "its" is ambiguous (possessive) and stays; step 1 splits "'s" off ("it's" -> "it 's")
    ("its", "its"), ("it's", "it 's"),
])
def test_vqa_normaliser(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_contraction_table_excludes_ambiguous_words():
    # EvalAI's table (checked entry by entry in test_benchmarks_llava_parity.py) has none of these
    for word in ("its", "hell", "shell", "well", "wed", "ill", "id", "were", "shed", "lets"):
        assert word not in VQA_CONTRACTIONS


def test_punctuation_step_digit_comma_digit_and_spacing_conditions():
    # a digit-comma-digit anywhere in the input -> every listed character is deleted, not spaced
    assert vqa_punctuation("a/b 1,000") == "ab 1000"
    # no such sequence and no space next to "/" -> "/" becomes a space
    assert vqa_punctuation("a/b") == "a b"
    # the condition looks at the input as it was: "x /y" has " /", so "/" is deleted
    assert vqa_punctuation("x /y") == "x y"


def test_vqa_accuracy_leave_one_out():
    others = ["three"] * 7
    # 10 answers; "two" normalises to "2", so 3 answers equal the prediction "2".
    # i among the 3 matching: 2 other matches -> 2/3 each; i among the 7 others: 3 matches -> 1 each.
    # acc = (3 * 2/3 + 7 * 1) / 10 = 9/10
    assert vqa_accuracy("2", ["two", "two", "2"] + others) == pytest.approx(0.9)
    # 1 matching answer: i = it -> 0 matches; the other 9 -> 1/3 each. acc = 3/10
    assert vqa_accuracy("two", ["two"] + ["three"] * 9) == pytest.approx(0.3)
    # 2 matching: 2 * 1/3 + 8 * 2/3 = 6 -> 0.6
    assert vqa_accuracy("Two.", ["2", "two"] + ["three"] * 8) == pytest.approx(0.6)
    # 4 matching: every leave-one-out set has >= 3 matches -> 1.0
    assert vqa_accuracy("the dog", ["dog"] * 4 + ["cat"] * 6) == pytest.approx(1.0)
    # no match; an empty (malformed) prediction matches nothing
    assert vqa_accuracy("horse", ["dog"] * 10) == 0.0
    assert vqa_accuracy("   ", ["dog"] * 10) == 0.0
    with pytest.raises(ValueError, match="empty list"):
        vqa_accuracy("dog", [])


def test_textvqa_vizwiz_vqav2_score_sample_and_aggregate():
    bench = benchmarks.get("vqav2")
    good = row("1", ["two"] * 3 + ["three"] * 7, answer_type="number")
    other = row("2", ["yes"] * 10, answer_type="yes/no")
    s1 = bench.score_sample("2", good)           # 0.9 (see above: 3 of 10 match)
    s2 = bench.score_sample(None, other)          # None is scored as "": 0.0
    assert s1["score"] == pytest.approx(0.9) and s2["score"] == 0.0
    metrics = bench.aggregate([{"scoring": s1}, {"scoring": s2}])
    assert metrics["score"] == pytest.approx(45.0)            # (0.9 + 0) / 2 * 100
    assert metrics["per_answer_type"] == {"number": pytest.approx(90.0), "yes/no": 0.0}
    viz = benchmarks.get("vizwiz")
    assert viz.score_sample("Unanswerable", row("v", ["unanswerable"] * 10))["score"] == 1.0


# ---------------------------------------------------------------------------------------------
# §3.2 GQA

@pytest.mark.parametrize("prediction, answer, expected", [
    ("Yes.", "yes", True),          # strip, drop trailing ".", lower
    ("yes...", "yes", True),        # every trailing "." goes
    (" Red ", "red", True),
    ("the red", "red", False),      # no article removal in GQA's rule
    ("Yes .", "yes", False),        # strip first, then "." -> "Yes " -> "yes " != "yes"
    ("", "yes", False),
])
def test_gqa_exact_match(prediction, answer, expected):
    assert gqa_exact_match(prediction, answer) is expected


# ---------------------------------------------------------------------------------------------
# §3.3 MME

@pytest.mark.parametrize("prediction, expected", [
    ("Yes", "yes"), ("No.", "no"),                 # exact after lower/strip/delete "."
    ("Y", "yes"), ("n", "no"), ("x", "other"),     # single characters
    ("Yes, there is", "yes"),                      # "yes" within the first 4 characters
    ("Not at all", "no"),                          # "no" within "not "
    ("I think yes", "other"),                      # first 4 chars "i th"
    ("There is no dog", "other"),
    ("", "other"),                                 # empty answer
])
def test_mme_parse(prediction, expected):
    assert parse_mme_answer(prediction) == expected


def test_mme_acc_plus_over_image_pairs_and_totals():
    bench = benchmarks.get("mme")
    rows = [
        row("a1", ["yes"], subtask="existence", image_key="existence/a"),
        row("a2", ["no"], subtask="existence", image_key="existence/a"),
        row("b1", ["yes"], subtask="existence", image_key="existence/b"),
        row("b2", ["no"], subtask="existence", image_key="existence/b"),
        row("c1", ["yes"], subtask="count", image_key="count/c"),
        row("c2", ["no"], subtask="count", image_key="count/c"),
        row("d1", ["yes"], subtask="code_reasoning", image_key="code_reasoning/d"),
        row("d2", ["no"], subtask="code_reasoning", image_key="code_reasoning/d"),
    ]
    predictions = ["Yes", "No", "Yes", "Yes",          # existence: image a both right, b one right
                   "No", "Yes",                         # count: both wrong
                   "yes.", "no"]                        # code_reasoning: both right
    metrics = bench.aggregate([{"scoring": bench.score_sample(p, r)} for p, r in zip(predictions, rows)])
    existence = metrics["subtasks"]["existence"]
    # acc = 3/4 questions = 75; acc+ = 1/2 images = 50; score 125
    assert (existence["acc"], existence["acc_plus"], existence["score"]) == (75.0, 50.0, 125.0)
    assert metrics["subtasks"]["count"]["score"] == 0.0
    assert metrics["subtasks"]["code_reasoning"]["score"] == 200.0
    # perception = existence + count = 125; cognition = code_reasoning = 200; headline P + C
    assert (metrics["perception"], metrics["cognition"], metrics["score"]) == (125.0, 200.0, 325.0)
    assert "landmark" in metrics["missing_subtasks"] and metrics["unknown_subtasks"] == []


def test_mme_subtask_names_are_matched_case_insensitively():
    bench = benchmarks.get("mme")
    scoring = bench.score_sample("Yes", row("o", ["yes"], subtask="OCR", image_key="OCR/x"))
    metrics = bench.aggregate([scoring])
    # one question, one image, both right: 100 + 100 into perception under the data's own name
    assert metrics["perception"] == 200.0 and "OCR" in metrics["subtasks"] and "ocr" not in metrics["missing_subtasks"]


# ---------------------------------------------------------------------------------------------
# §3.4 POPE

@pytest.mark.parametrize("prediction, expected", [
    ("Yes, there is a dog.", "yes"),
    ("No, there is no dog.", "no"),                    # piece "No" (comma deleted)
    ("There is not a dog in the image.", "no"),        # piece "not"
    ("Yes. No.", "yes"),                               # only the text before the first "." counts
    ("NO", "yes"),                                     # the pieces must equal No / not / no exactly
    ("I cannot tell", "yes"),                          # "cannot" is not "not"
    ("Nope", "yes"),
    ("", "yes"),                                       # empty answer: no "no" piece -> yes
])
def test_pope_parse(prediction, expected):
    assert parse_pope_answer(prediction) == expected


def test_binary_metrics_zero_denominators():
    # no positive predictions: TP = FP = 0 -> precision 0 by definition, recall 0, F1 0
    metrics = binary_metrics(["no", "no"], ["yes", "no"])
    assert (metrics["precision"], metrics["recall"], metrics["f1"], metrics["accuracy"], metrics["yes_ratio"]) == \
        (0.0, 0.0, 0.0, 0.5, 0.0)


def test_pope_per_category_and_mean_f1():
    bench = benchmarks.get("pope")
    cases = [  # (category, truth, prediction)
        ("random", "yes", "Yes"), ("random", "yes", "No"), ("random", "no", "Yes"), ("random", "no", "no"),
        ("popular", "yes", "yes"), ("popular", "no", "There is not."),
        ("adversarial", "yes", "no"), ("adversarial", "no", "No."),
    ]
    records = [{"scoring": bench.score_sample(p, row(f"{c}/{i}", [t], category=c))}
               for i, (c, t, p) in enumerate(cases)]
    metrics = bench.aggregate(records)
    random_, popular, adversarial = (metrics["per_category"][c] for c in ("random", "popular", "adversarial"))
    # random: TP 1, FN 1, FP 1, TN 1 -> P = R = F1 = accuracy = 50, yes-ratio 2/4 = 50
    assert (random_["precision"], random_["recall"], random_["f1"], random_["accuracy"], random_["yes_ratio"]) == \
        (50.0, 50.0, 50.0, 50.0, 50.0)
    # popular: TP 1, TN 1 -> P = R = F1 = 100, accuracy 100, yes-ratio 1/2
    assert (popular["f1"], popular["accuracy"], popular["yes_ratio"]) == (100.0, 100.0, 50.0)
    # adversarial: FN 1, TN 1, no yes predictions -> P = R = F1 = 0, accuracy 50, yes-ratio 0
    assert (adversarial["f1"], adversarial["accuracy"], adversarial["yes_ratio"]) == (0.0, 50.0, 0.0)
    # headline: mean F1 = (50 + 100 + 0) / 3 = 50; mean accuracy = (50 + 100 + 50) / 3
    assert metrics["score"] == pytest.approx(50.0)
    assert metrics["accuracy_mean"] == pytest.approx(200.0 / 3)


# ---------------------------------------------------------------------------------------------
# §3.5 ScienceQA

@pytest.mark.parametrize("prediction, expected", [
    ("B", "B"), (" C ", "C"),                          # exactly a letter (after strip)
    ("B. dog", "B"),                                   # letter + ". "
    ("The answer is C.", "C"),                         # the pattern exactly once
    ("The answer is C. The answer is C.", None),       # twice: a failure
    ("I think B", None), ("b", None), ("", None),
    ("A.", None),                                      # 2 characters: not ">= 3 and '. '", no pattern
    ("E", "E"),                                        # a letter; checked against the choices later
])
def test_scienceqa_letter_parse(prediction, expected):
    assert parse_scienceqa_letter(prediction) == expected


def test_scienceqa_letter_outside_the_choices_is_wrong_and_failures_are_counted():
    bench = benchmarks.get("scienceqa_img")
    item = row("s", ["B"], choices=["frog", "dog"], has_image=True)
    assert bench.score_sample("B", item)["score"] == 1.0
    assert bench.score_sample("E", item)["score"] == 0.0         # E is option 5 of 2: wrong
    failed = bench.score_sample("maybe the dog", item)
    assert failed["score"] == 0.0 and failed["failed"] is True
    metrics = bench.aggregate([{"scoring": bench.score_sample(p, item)} for p in ("B", "E", "maybe", None)])
    assert metrics["score"] == 25.0 and metrics["failures"] == 2   # "maybe" and None cannot be parsed


# ---------------------------------------------------------------------------------------------
# §3.6 MMBench

OPTIONS = {"A": "cat", "B": "dog"}


@pytest.mark.parametrize("prediction, options, expected", [
    ("B", OPTIONS, "B"),                                    # step 1: one bare letter
    ("Answer: B", OPTIONS, "B"),
    # "A" present and more than 3 pieces: step 1 skipped; no punctuated form; step 3: only "cat" occurs
    ("A cat is sitting on the mat", OPTIONS, "A"),
    ("A cat is sitting on the mat", {"A": "mouse", "B": "dog"}, None),
    # the guard matters: without it step 1 would take the article "A"; step 3 finds "dog" -> B
    ("A dog is sitting on the mat", OPTIONS, "B"),
    # 3 pieces only: step 1 runs and the bare "A" decides
    ("A is right", OPTIONS, "A"),
    ("The answer is B.", OPTIONS, "B"),                     # step 2, form "X."
    ("(C) a cow", {"A": "cat", "B": "dog", "C": "cow"}, "C"),   # form "(X)"
    ("option :B", OPTIONS, "B"),                            # form ":X"
    ("A or B", OPTIONS, None),                              # step 1 finds two letters; nothing else decides
    ("both dog and cat", OPTIONS, None),                    # step 3 finds two option texts
    ("", OPTIONS, None),
])
def test_mmbench_static_extraction(prediction, options, expected):
    assert extract_mmbench_letter(prediction, options) == expected


def mmbench_row(index, answer, category):
    return row(str(index), [answer], choices=["cat", "dog"], options=OPTIONS, group=index % 1_000_000,
               round=index // 1_000_000, category=category)


def test_mmbench_circular_accuracy_per_category_and_single_pass():
    bench = benchmarks.get("mmbench")
    cases = [  # (index, answer, category, prediction)
        (12, "B", "x", "B"), (1_000_012, "A", "x", "A"),        # group 12: all variants right
        (40, "A", "x", "A"), (1_000_040, "B", "x", "A"),        # group 40: the rotation is wrong
        (7, "B", "y", "I do not know"),                         # group 7: base only, unparsable -> wrong
    ]
    records = [{"scoring": bench.score_sample(p, mmbench_row(i, a, c))} for i, a, c, p in cases]
    metrics = bench.aggregate(records)
    # circular: groups 12 right, 40 wrong, 7 wrong -> 1/3
    assert metrics["score"] == pytest.approx(100 / 3) and metrics["groups"] == 3
    # per category: x has groups 12 (right) and 40 (wrong) -> 50; y has group 7 -> 0
    assert metrics["per_category"] == {"x": 50.0, "y": 0.0}
    # single pass over the base rows 12, 40, 7: right, right, wrong -> 2/3
    assert metrics["single_pass_accuracy"] == pytest.approx(200 / 3)
    assert metrics["failures"] == 1


# ---------------------------------------------------------------------------------------------
# §3.7 SEED

def test_seed_whole_answer_is_the_letter():
    assert parse_seed_answer(" B\n") == "B"          # the stripped answer is exactly a letter
    assert parse_seed_answer("b") is None             # case-sensitive, as LLaVA's string equality
    assert parse_seed_answer("B) dog") is None and parse_seed_answer("   ") is None
    bench = benchmarks.get("seed_image")
    item = row("1", ["B"], choices=["a", "b", "c", "d"], question_type_id=5)
    records = [{"scoring": bench.score_sample(p, item)} for p in ("B", "b.", "The answer is B", "")]
    metrics = bench.aggregate(records)
    # only "B" equals the letter: 1/4 = 25; the other three are failures (wrong)
    assert metrics["score"] == 25.0 and metrics["failures"] == 3 and metrics["per_question_type"] == {"5": 25.0}


# ---------------------------------------------------------------------------------------------
# bad rows and failures in aggregate

def test_bad_rows_and_errors_are_counted_not_averaged():
    bench = benchmarks.get("gqa")
    good = row("g", ["red"], structural="query")
    bad = row("b", ["red"], image=None, bad_row="missing_image")
    assert bench.score_sample("red", bad) == {"score": None, "parsed": None, "failed": False, "bad_row": "missing_image"}
    records = [
        {"scoring": bench.score_sample("red", good)},                             # right
        {"scoring": bench.score_sample("blue", good)},                            # wrong
        {"scoring": bench.score_sample("red", bad)},                              # flagged bad row
        {"error": "bad row: missing_image", "scoring": {"score": None}},          # the evaluate job's form
        {"error": "RuntimeError: CUDA out of memory", "scoring": {"score": None}},  # a failed generation
    ]
    metrics = bench.aggregate(records)
    assert metrics["score"] == 50.0                     # only the two scored samples
    assert (metrics["samples"], metrics["scored"], metrics["bad_rows"], metrics["failures"]) == (5, 2, 2, 1)


# ---------------------------------------------------------------------------------------------
# GPT-judged benchmarks (fake judges; no network)

class FakeJudge:
    model = "fake-judge-1"

    def __init__(self, replies):
        self.replies = list(replies)
        self.prompts = []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        return self.replies.pop(0)


def test_judged_benchmarks_need_the_api_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for name in ("mmvet", "llava_wild"):
        bench = benchmarks.get(name)
        item = row("1", ["ref"], category="conv", context="ctx", capabilities=["ocr"])
        with pytest.raises(JudgeUnavailable, match="OPENAI_API_KEY"):
            bench.score_sample("answer", item)
        with pytest.raises(JudgeUnavailable, match=f"leave '{name}' out of the config"):
            bench.check_ready()


def test_mmvet_grades_with_the_judge_and_breaks_down_by_capability():
    bench = benchmarks.get("mmvet")
    judge = FakeJudge(["0.7", "Score: 1.0", "it is good", "1.5"])
    rows = [row("a", ["-1 <AND> -5"], capabilities=["ocr", "math"]), row("b", ["nike"], capabilities=["ocr"]),
            row("c", ["x"], capabilities=["rec"]), row("d", ["y"], capabilities=["rec"])]
    scorings = [bench.score_sample(p, r, judge=judge) for p, r in zip(["-1, -5", "Nike", "?", "?"], rows)]
    assert "Ground truth: -1 <AND> -5" in judge.prompts[0] and "Answer to grade: -1, -5" in judge.prompts[0]
    assert [s["score"] for s in scorings] == [0.7, 1.0, 0.0, 0.0]
    assert [s["failed"] for s in scorings] == [False, False, True, True]   # no number / out of [0, 1]
    metrics = bench.aggregate([{"scoring": s} for s in scorings])
    # mean (0.7 + 1.0 + 0 + 0) / 4 = 0.425 -> 42.5; ocr: (0.7 + 1.0) / 2 = 85; math 70; rec 0
    assert metrics["score"] == pytest.approx(42.5)
    assert metrics["per_capability"] == {"math": pytest.approx(70.0), "ocr": pytest.approx(85.0), "rec": 0.0}
    assert metrics["judge_models"] == ["fake-judge-1"] and metrics["failures"] == 2


def test_llava_wild_relative_score_per_category():
    bench = benchmarks.get("llava_wild")
    judge = FakeJudge(["8 6\nAssistant 2 misses details.", "7, 7\nEqual.", "Both are fine."])
    rows = [row("0", ["Lake Moraine."], category="conv", context="A lake."),
            row("1", ["A market."], category="detail", context="A market."),
            row("2", ["Yes."], category="complex", context="A cat.")]
    scorings = [bench.score_sample(p, r, judge=judge) for p, r in zip(["A lake.", "Market.", "No."], rows)]
    assert "[Context]\nA lake." in judge.prompts[0] and "[Assistant 1]\nLake Moraine." in judge.prompts[0]
    assert "describe an image in detail" in judge.prompts[1]
    assert scorings[2]["failed"] is True and scorings[2]["score"] is None   # no score pair on line 1
    metrics = bench.aggregate([{"scoring": s} for s in scorings])
    # relative = 100 * (6 + 7) / (8 + 7) = 86.67; conv 100 * 6/8 = 75; detail 100 * 7/7 = 100
    assert metrics["score"] == pytest.approx(1300 / 15)
    assert metrics["per_category"] == {"conv": 75.0, "detail": 100.0}
    assert metrics["failures"] == 1 and metrics["scored"] == 2


def test_the_scoring_code_digest_covers_the_benchmarks_own_module_and_the_shared_ones():
    digests = {name: benchmarks.scoring_code_digest(name) for name in benchmarks.names()}
    assert digests["scienceqa_img"] == digests["scienceqa_full"]          # one module, two variants
    assert digests["mmbench"] == digests["mmbench_cn"]
    assert len(set(digests.values())) == len(digests) - 2 and all(len(d) == 16 for d in digests.values())
    with pytest.raises(ValueError, match="unknown benchmark 'sqa'; valid benchmarks: gqa, "):
        benchmarks.scoring_code_digest("sqa")


def test_a_group_with_an_unanswered_sample_is_left_out_whole():
    """MMBench's circular accuracy counts a question right only if every variant is; MME's acc+ an image only if both
    its questions are. A variant or question that errored (or was a bad row) was never answered: its group is left
    out of the metric, never judged on the rest, and counted."""
    bench = benchmarks.get("mmbench")
    cases = [(12, "B", "x", "B"), (1_000_012, "A", "x", "A"), (40, "A", "x", "A")]
    records = [{"id": str(i), "scoring": bench.score_sample(p, mmbench_row(i, a, c))} for i, a, c, p in cases]
    errored = {"id": "1000040", "error": "RuntimeError: CUDA out of memory", "scoring": {"score": None}}
    metrics = bench.aggregate([*records, errored])
    assert metrics["score"] == 100.0 and metrics["groups"] == 1 and metrics["incomplete_groups"] == 1
    assert metrics["single_pass_accuracy"] == 100.0 and metrics["scored"] == 2 and metrics["failures"] == 1
    assert "incomplete_groups" not in bench.aggregate(records)            # every group whole: judged as before

    mme = benchmarks.get("mme")
    rows = [{"id": f"existence/{image}.png#{n}", "answers": ["yes"], "question": "Is there a cat?",
             "meta": json.dumps({"subtask": "existence", "image_key": f"existence/{image}.png"})}
            for n, image in enumerate(("1", "1", "2", "2"))]
    answered = [{"id": row["id"], "scoring": mme.score_sample("Yes", row)} for row in rows[:3]]
    metrics = mme.aggregate([*answered, {"id": rows[3]["id"], "error": "bad row: missing_image",
                                         "scoring": {"score": None}}])
    existence = metrics["subtasks"]["existence"]
    assert existence["images"] == 1 and existence["acc_plus"] == 100.0 and existence["questions"] == 2
    assert metrics["incomplete_groups"] == 1 and metrics["bad_rows"] == 1

"""Parity with LLaVA-1.5's own evaluation scripts (issue 17, item 3): one test per behaviour.

Each test names the reference file and function whose behaviour it reproduces. References were
read from stored copies of public repositories:
- haotian-liu/LLaVA: scripts/convert_seed_for_submission.py @524a75b7; playground/data/eval/MME/
  convert_answer_to_mme.py and llava_mme.jsonl @32cebc38; playground/data/eval/pope/
  llava_pope_test.jsonl @32cebc38.
- llava/eval/eval_science_qa.py and llava/eval/m4c_evaluator.py of LLaVA-1.5, read from the
  forks afra-baas/LLaVA@d57f942b and pixas/LLaVA@fbd51158 (the stored haotian-liu copy of
  eval_science_qa.py is the pre-1.5 one, @8959d5c3).
- Cloud-CV/VQA-Evaluation@993bc7c5 PythonEvaluationTools/vqaEvaluation/vqaEval.py (EvalAI's
  tables, equal to m4c_evaluator's).
"""
from __future__ import annotations

import json

import pytest

from ficoco import benchmarks
from ficoco.benchmarks.mme import llava_mme_question
from ficoco.benchmarks.scoring import (VQA_ARTICLES, VQA_CONTRACTIONS, VQA_NUMBER_WORDS, VQA_PERIOD_STRIP_COUNT,
                                       VQA_PUNCTUATION, normalize_vqa_answer, parse_scienceqa_letter,
                                       parse_seed_answer, scienceqa_choice_index, vqa_accuracy, vqa_punctuation)

SHORT = "\nAnswer the question using a single word or phrase."


def row(rid, answers, choices=(), question="q?", image="img", **meta):
    return {"id": rid, "image": image, "question": question, "answers": list(answers), "choices": list(choices),
            "meta": json.dumps(meta)}


# ---------------------------------------------------------------------------------------------
# 1. MME prompt: LLaVA's llava_mme.jsonl text

@pytest.mark.parametrize("question, expected", [
    # one space before the phrase (most MME questions) and two (some): both give "...?\nAnswer..."
    ("Is there a train in this image? Please answer yes or no.", "Is there a train in this image?"),
    ("Is there a train in this image?  Please answer yes or no.", "Is there a train in this image?"),
    # llava_mme.jsonl line 3 (code_reasoning/0014.png), from MME's "... '7'? Please answer yes or no."
    ("The image shows a python code. Is the output of the code '7'? Please answer yes or no.",
     "The image shows a python code. Is the output of the code '7'?"),
    # no phrase: the question is kept as it is (the project's rule; MME always has the phrase)
    ("Is the output 5?", "Is the output 5?"),
])
def test_mme_prompt_matches_llava_mme_jsonl(question, expected):
    """haotian-liu/LLaVA playground/data/eval/MME/llava_mme.jsonl holds "<question>\\nAnswer ...",
    the question without the phrase and the space(s) before it; convert_answer_to_mme.py (`__main__`)
    inverts that by stripping and re-appending " Please answer yes or no." or, failing that, the
    two-space form. Our prompt must be the file's text, never "...? \\nAnswer ..."."""
    assert llava_mme_question(question) == expected
    prompt = benchmarks.get("mme").prompt(row("m", ["yes"], question=question, subtask="x", image_key="x/1"), {})
    assert prompt == expected + SHORT
    assert " \n" not in prompt


def test_mme_prompt_inverts_like_convert_answer_to_mme():
    """convert_answer_to_mme.py `__main__`: prompt -> remove the suffix -> strip -> + " Please answer
    yes or no." (or the two-space form when the first is not a ground-truth question) must give back
    the ground-truth question. Reproduced here on both spacings."""
    for question in ("Is it red? Please answer yes or no.", "Is it red?  Please answer yes or no."):
        prompt = benchmarks.get("mme").prompt(row("m", ["yes"], question=question, subtask="x", image_key="x/1"), {})
        stem = prompt.replace("Answer the question using a single word or phrase.", "").strip()
        candidates = [stem + " Please answer yes or no.", stem + "  Please answer yes or no."]
        assert question in candidates


# ---------------------------------------------------------------------------------------------
# 2. ScienceQA letter parse: llava/eval/eval_science_qa.py (`__main__` loop, `get_pred_idx`)

@pytest.mark.parametrize("prediction, expected", [
    # the regex `The answer is ([A-Z]).`: its dot is any character but a newline
    ("The answer is B,", "B"), ("The answer is B!", "B"), ("The answer is B because it is big.", "B"),
    ("The answer is B.", "B"), ("I think The answer is D) dog", "D"),
    ("The answer is Bob", "B"),                        # "Bo" matches: LLaVA reads B
    ("The answer is B", None),                         # nothing after the letter: no match
    ("The answer is B\nbecause", None),                # the dot does not match a newline
    ("The answer is B, The answer is C.", None),       # findall finds two: FAILED
    ("the answer is B.", None),                        # case-sensitive
    ("The answer is Z.", "Z"),                         # any capital; get_pred_idx rejects it later
])
def test_scienceqa_answer_is_pattern_dot_matches_any_character(prediction, expected):
    """eval_science_qa.py `__main__`: `re.compile(r'The answer is ([A-Z]).').findall(pred_text)`,
    exactly one match -> the letter, else "FAILED"."""
    assert parse_scienceqa_letter(prediction) == expected


def test_scienceqa_no_match_and_letters_outside_the_choices_are_wrong():
    """eval_science_qa.py `get_pred_idx` (LLaVA-1.5): a letter among options[:len(choices)] gives its
    index, anything else (FAILED, a letter past the choices) gives -1, which is never the answer;
    the older random guess is dead code after `return -1`."""
    assert scienceqa_choice_index("B", 2) == 1
    assert scienceqa_choice_index("C", 2) == -1 and scienceqa_choice_index("Z", 5) == -1
    assert scienceqa_choice_index(None, 3) == -1
    assert scienceqa_choice_index("F", 6) == -1            # options are A-E only
    bench = benchmarks.get("scienceqa_img")
    item = row("s", ["B"], choices=["frog", "dog", "cat"], has_image=True)
    scored = {p: bench.score_sample(p, item) for p in ("The answer is B,", "The answer is B", "The answer is Z.")}
    assert scored["The answer is B,"]["score"] == 1.0 and scored["The answer is B,"]["failed"] is False
    assert scored["The answer is B"]["score"] == 0.0 and scored["The answer is B"]["failed"] is True
    assert scored["The answer is Z."]["score"] == 0.0 and scored["The answer is Z."]["failed"] is False


# ---------------------------------------------------------------------------------------------
# 3. SEED: scripts/convert_seed_for_submission.py (`eval_single`)

@pytest.mark.parametrize("prediction, correct", [
    ("C", True), (" C\n", True),                       # model_vqa_loader strips the output
    ("Answer: C", False),                              # was read as "A" by the old first-letter rule
    ("C.", False), ("c", False), ("C) cat", False), ("The answer is C", False), ("", False),
])
def test_seed_whole_answer_must_equal_the_letter(prediction, correct):
    """convert_seed_for_submission.py `eval_single`: correct iff `row['text'] == question_data['answer']`
    (the stripped output equals the letter; no extraction, case-sensitive)."""
    assert (parse_seed_answer(prediction) == "C") is correct
    bench = benchmarks.get("seed_image")
    scoring = bench.score_sample(prediction, row("1", ["C"], choices=["a", "b", "c", "d"], question_type_id=5))
    assert scoring["score"] == float(correct)
    assert scoring["failed"] is (not correct)


# ---------------------------------------------------------------------------------------------
# 4. VQA normaliser: EvalAIAnswerProcessor (llava/eval/m4c_evaluator.py) == EvalAI's vqaEval.py

#: The reference's CONTRACTIONS, entry by entry in its order (m4c_evaluator.py, pixas/LLaVA@fbd51158;
#: the same entries, same order, as `contractions` in Cloud-CV/VQA-Evaluation@993bc7c5 vqaEval.py).
EVALAI_CONTRACTIONS = (
    ("aint", "ain't"), ("arent", "aren't"), ("cant", "can't"), ("couldve", "could've"),
    ("couldnt", "couldn't"), ("couldn'tve", "couldn't've"), ("couldnt've", "couldn't've"),
    ("didnt", "didn't"), ("doesnt", "doesn't"), ("dont", "don't"), ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"), ("hadn'tve", "hadn't've"), ("hasnt", "hasn't"), ("havent", "haven't"),
    ("hed", "he'd"), ("hed've", "he'd've"), ("he'dve", "he'd've"), ("hes", "he's"), ("howd", "how'd"),
    ("howll", "how'll"), ("hows", "how's"), ("Id've", "I'd've"), ("I'dve", "I'd've"), ("Im", "I'm"),
    ("Ive", "I've"), ("isnt", "isn't"), ("itd", "it'd"), ("itd've", "it'd've"), ("it'dve", "it'd've"),
    ("itll", "it'll"), ("let's", "let's"), ("maam", "ma'am"), ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"), ("mightn'tve", "mightn't've"), ("mightve", "might've"),
    ("mustnt", "mustn't"), ("mustve", "must've"), ("neednt", "needn't"), ("notve", "not've"),
    ("oclock", "o'clock"), ("oughtnt", "oughtn't"), ("ow's'at", "'ow's'at"), ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"), ("shant", "shan't"), ("shed've", "she'd've"), ("she'dve", "she'd've"),
    ("she's", "she's"), ("shouldve", "should've"), ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"), ("shouldn'tve", "shouldn't've"), ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"), ("somebody'dve", "somebody'd've"), ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"), ("someoned", "someone'd"), ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"), ("someonell", "someone'll"), ("someones", "someone's"),
    ("somethingd", "something'd"), ("somethingd've", "something'd've"), ("something'dve", "something'd've"),
    ("somethingll", "something'll"), ("thats", "that's"), ("thered", "there'd"),
    ("thered've", "there'd've"), ("there'dve", "there'd've"), ("therere", "there're"),
    ("theres", "there's"), ("theyd", "they'd"), ("theyd've", "they'd've"), ("they'dve", "they'd've"),
    ("theyll", "they'll"), ("theyre", "they're"), ("theyve", "they've"), ("twas", "'twas"),
    ("wasnt", "wasn't"), ("wed've", "we'd've"), ("we'dve", "we'd've"), ("weve", "we've"),
    ("werent", "weren't"), ("whatll", "what'll"), ("whatre", "what're"), ("whats", "what's"),
    ("whatve", "what've"), ("whens", "when's"), ("whered", "where'd"), ("wheres", "where's"),
    ("whereve", "where've"), ("whod", "who'd"), ("whod've", "who'd've"), ("who'dve", "who'd've"),
    ("wholl", "who'll"), ("whos", "who's"), ("whove", "who've"), ("whyll", "why'll"), ("whyre", "why're"),
    ("whys", "why's"), ("wont", "won't"), ("wouldve", "would've"), ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"), ("wouldn'tve", "wouldn't've"), ("yall", "y'all"), ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"), ("yall'd've", "y'all'd've"), ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"), ("youd", "you'd"), ("youd've", "you'd've"), ("you'dve", "you'd've"),
    ("youll", "you'll"), ("youre", "you're"), ("youve", "you've"),
)

#: The reference's PUNCTUATIONS (`punct` in EvalAI's vqaEval.py), NUMBER_MAP (`manualMap`), ARTICLES.
EVALAI_PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
                       "`", ",", "?", "!")
EVALAI_NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                     "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
EVALAI_ARTICLES = ("a", "an", "the")


def test_vqa_tables_are_evalai_tables_exactly():
    """m4c_evaluator.py `EvalAIAnswerProcessor` class attributes == our tables, both directions."""
    reference = dict(EVALAI_CONTRACTIONS)
    assert len(reference) == len(EVALAI_CONTRACTIONS) == 120       # no key repeats in the reference
    assert dict(VQA_CONTRACTIONS) == reference
    assert tuple(VQA_PUNCTUATION) == EVALAI_PUNCTUATIONS
    assert dict(VQA_NUMBER_WORDS) == EVALAI_NUMBER_MAP
    assert VQA_ARTICLES == frozenset(EVALAI_ARTICLES)


@pytest.mark.parametrize("raw, expected", [
    # forms the old project table had and EvalAI lacks: left alone now
    ("im here", "im here"), ("ive", "ive"), ("lets go", "lets go"),
    # forms EvalAI has and the old table lacked
    ("oclock", "o'clock"), ("maam", "ma'am"), ("yall", "y'all"), ("twas", "'twas"), ("theyd", "they'd"),
    ("howd", "how'd"), ("whatre", "what're"), ("someonell", "someone'll"), ("hadnt've", "hadn't've"),
    # the reference's reversed entry
    ("somebody'd", "somebodyd"),
    # mapping runs after articles and numbers: "the" dropped, "dont" mapped
    ("The dont", "don't"),
])
def test_vqa_contractions_follow_evalai(raw, expected):
    """m4c_evaluator.py `EvalAIAnswerProcessor.process_digit_article` with its CONTRACTIONS."""
    assert normalize_vqa_answer(raw) == expected


def test_vqa_comma_condition_and_period_strip_count_follow_evalai():
    """`process_punctuation`: COMMA_STRIP is `(?<=\\d)(\\,)+(?=\\d)` (several commas count), and
    `PERIOD_STRIP.sub("", text, re.UNICODE)` passes re.UNICODE (32) as the count."""
    assert vqa_punctuation("a/b 1,,2") == "ab 12"          # digits around two commas: "/" deleted
    # no digit,digit: "/" (no space next to it) becomes a space, "," (has ", ") is deleted
    assert vqa_punctuation("a/b 1, 2") == "a b 1 2"
    assert VQA_PERIOD_STRIP_COUNT == 32
    assert vqa_punctuation("a" + "." * 40) == "a" + "." * 8
    assert normalize_vqa_answer("wait" + "." * 35) == "wait..."


def test_vqa_accuracy_with_evalai_normalisation():
    """TextVQAAccuracyEvaluator: both sides through the processor, then the leave-one-out mean."""
    # "o'clock" answers and a prediction "oclock": equal after the EvalAI table, 10 of 10 -> 1.0
    assert vqa_accuracy("oclock", ["o'clock"] * 10) == 1.0
    # "im" is no longer mapped to "i'm": no match
    assert vqa_accuracy("im", ["i'm"] * 10) == 0.0


# ---------------------------------------------------------------------------------------------
# 5. POPE question set: LLaVA's playground/data/eval/pope/llava_pope_test.jsonl (8,910 questions)

#: The 80 COCO object categories (POPE asks about these only).
COCO_CLASSES = frozenset((
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush"))


def test_shipped_pope_question_set_is_llavas_file():
    """The shipped list is LLaVA's llava_pope_test.jsonl (haotian-liu/LLaVA@32cebc38): adversarial
    ids 1-3000 and popular ids 20000001-20003000 whole, random ids 10000001-10002910 listed."""
    from ficoco.benchmarks.pope import LLAVA_QUESTION_SET_PATH, load_question_set

    raw = json.loads(LLAVA_QUESTION_SET_PATH.read_text())
    assert raw["source"]["repo"] == "haotian-liu/LLaVA"
    assert raw["source"]["path"] == "playground/data/eval/pope/llava_pope_test.jsonl"
    assert raw["source"]["commit"] == "32cebc3809441cc40d8ac7b2855d148308741f2a"
    assert raw["rows"] == {"adversarial": 3000, "popular": 3000, "random": 2910}
    assert sum(raw["rows"].values()) == 8910
    random_ = raw["listed"]["random"]
    assert [qid for qid, _, _ in random_] == list(range(10000001, 10002911))
    assert len(COCO_CLASSES) == 80 and all(thing in COCO_CLASSES for _, _, thing in random_)
    per_image = {}
    for _, image, thing in random_:
        per_image.setdefault(image, []).append(thing)
    assert len(per_image) == 500 and all(4 <= len(things) <= 6 for things in per_image.values())
    # LLaVA's lines 3001-3006 and 3013-3017 (image 429109 keeps 5 of POPE's 6 random questions)
    assert per_image[310196] == ["snowboard", "car", "person", "sandwich", "skis", "couch"]
    assert per_image[429109] == ["person", "sheep", "bicycle", "broccoli", "car"]
    assert random_[-1] == [10002910, 277289, "bus"]
    question_set = load_question_set()
    assert len(set(question_set["listed"]["random"])) == 2910        # no question listed twice


def synthetic_lmms_pope(question_set):
    """lmms-lab/POPE-like columns for the shipped list: 3,000 rows per category; random holds the
    2,910 listed questions plus 90 others (an unlisted object on a listed image)."""
    categories, sources, questions = [], [], []

    def add(category, image, thing, typo=False):
        article = "an" if thing[0] in "aeiou" else "a"
        categories.append(category)
        sources.append(f"COCO_val2014_{image:012d}")
        questions.append(f"Is there {article} {thing} in the {'imange' if typo else 'image'}?")

    for category in ("adversarial", "popular"):
        for n in range(3000):
            add(category, 100000 + n // 6, "person")
    listed = question_set["listed"]["random"]
    for n, (_, image, thing) in enumerate(listed):
        add("random", image, thing, typo=thing[0] in "aeiou")      # LLaVA's "imange" spelling
        if n < 90:
            add("random", image, "hair drier")                       # no listed question asks this
    return categories, sources, questions


def test_llava_question_set_selects_8910_of_9000_rows():
    """LLaVA's llava_pope_test.jsonl: all adversarial and popular questions, 2,910 random ones."""
    from ficoco.benchmarks.pope import POPE_CATEGORIES, load_question_set, select_question_set

    question_set = load_question_set()
    categories, sources, questions = synthetic_lmms_pope(question_set)
    assert len(categories) == 9000
    keep, description = select_question_set(categories, sources, questions, set(POPE_CATEGORIES), question_set)
    assert len(keep) == 8910 and keep == sorted(keep)
    assert description["rows"] == {"adversarial": 3000, "popular": 3000, "random": 2910}
    assert description["name"] == "llava" and "32cebc38" in description["source"]
    assert not any("hair drier" in questions[i] for i in keep)


def test_llava_question_set_refuses_data_that_does_not_match():
    from ficoco.benchmarks.pope import load_question_set, select_question_set

    question_set = load_question_set()
    categories, sources, questions = synthetic_lmms_pope(question_set)
    first = categories.index("random")
    questions[first] = "Is there a zebra in the image?"            # LLaVA's first random question is gone
    with pytest.raises(ValueError, match=r"1 of LLaVA's 2910 random questions match no row .*image 310196 / "
                                         r"'snowboard'.*question_set: full"):
        select_question_set(categories, sources, questions, {"random"}, question_set)
    with pytest.raises(ValueError, match="LLaVA evaluates all 3000 adversarial questions but the data has 2999"):
        select_question_set(categories[1:], sources[1:], questions[1:], {"adversarial"}, question_set)


# A small hub-like POPE repository and a matching question-set file --------------------------

def small_pope_repo(root):
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    S = Value("string")
    features = Features({"id": S, "question_id": S, "question": S, "answer": S, "image_source": S,
                         "image": Image(), "category": S})
    rows = [  # (category, question_id, image, question, answer)
        ("adversarial", "1", 310196, "Is there a snowboard in the image?", "yes"),
        ("adversarial", "2", 310196, "Is there a backpack in the image?", "no"),
        ("popular", "1", 310196, "Is there a snowboard in the image?", "yes"),
        ("popular", "2", 310196, "Is there a dining table in the image?", "no"),
        ("random", "1", 310196, "Is there a snowboard in the image?", "yes"),
        ("random", "2", 210789, "Is there an umbrella in the image?", "yes"),   # listed; hub spells "image"
        ("random", "3", 429109, "Is there a tennis racket in the image?", "no"),  # POPE has it, LLaVA does not
        ("random", "4", 429109, "Is there a sheep in the image?", "no"),
    ]
    data = {"id": [str(i) for i in range(len(rows))], "question_id": [r[1] for r in rows],
            "question": [r[3] for r in rows], "answer": [r[4] for r in rows],
            "image_source": [f"COCO_val2014_{r[2]:012d}" for r in rows],
            "image": [PILImage.new("RGB", (4, 4), (255, 0, 0))] * len(rows), "category": [r[0] for r in rows]}
    (root / "data").mkdir(parents=True)
    Dataset.from_dict(data, features=features).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                    "  - split: test\n    path: data/test-*\n---\n")
    return root


def small_question_set(path):
    path.write_text(json.dumps({
        "name": "llava", "source": {"repo": "haotian-liu/LLaVA", "commit": "test", "path": "test.jsonl"},
        "rows": {"adversarial": 2, "popular": 2, "random": 3},
        "listed": {"random": [[10000001, 310196, "snowboard"], [10000011, 210789, "umbrella"],
                              [10000014, 429109, "sheep"]]}}))
    return path


def fetch_pope(tmp_path, repo, out, options=None):
    import warnings

    from ficoco.benchmarks.fetch import fetch_benchmark, load_local

    registry = {"pope": {"source": "hub", "id": "lmms-lab/POPE", "split": "test", "config": None, "revision": "main"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = fetch_benchmark("pope", out, options=options, registry=registry, source=repo,
                                   cache_dir=tmp_path / "hf-cache")
    dataset, _ = load_local(out)
    return manifest, dataset


def test_pope_fetch_selects_llavas_questions_by_default(tmp_path, monkeypatch):
    """The fetch keeps LLaVA's questions (llava_pope_test.jsonl) unless question_set: full."""
    from ficoco.benchmarks import pope

    monkeypatch.setattr(pope, "LLAVA_QUESTION_SET_PATH", small_question_set(tmp_path / "set.json"))
    repo = small_pope_repo(tmp_path / "repo")
    manifest, ds = fetch_pope(tmp_path, repo, tmp_path / "llava" / "pope")
    assert list(ds["id"]) == ["adversarial/1", "adversarial/2", "popular/1", "popular/2",
                              "random/1", "random/2", "random/4"]              # tennis racket dropped
    assert manifest["options"] == {"categories": ["adversarial", "popular", "random"], "question_set": "llava"}
    assert manifest["question_set"]["rows"] == {"adversarial": 2, "popular": 2, "random": 3}
    assert manifest["question_set"]["source"] == "haotian-liu/LLaVA@test:test.jsonl"

    manifest, ds = fetch_pope(tmp_path, repo, tmp_path / "full" / "pope", {"question_set": "full"})
    assert len(ds) == 8 and manifest["question_set"] == {"name": "full"}
    manifest, ds = fetch_pope(tmp_path, repo, tmp_path / "random" / "pope", {"categories": ["random"]})
    assert list(ds["id"]) == ["random/1", "random/2", "random/4"]
    assert manifest["question_set"]["rows"] == {"random": 3}
    with pytest.raises(ValueError, match="question_set 'all' is not a question set; valid: llava, full"):
        pope.POPE.resolve_options({"question_set": "all"})


def test_pope_without_image_names_keeps_every_row_and_says_so(tmp_path):
    from datasets import Dataset

    from ficoco.benchmarks import pope

    raw = Dataset.from_dict({"question_id": ["1", "2"], "question": ["Is it red?"] * 2, "answer": ["yes", "no"],
                             "category": ["random", "popular"]})
    with pytest.warns(UserWarning, match="no image_source column"):
        kept, extra = pope.POPE.select_rows(raw, pope.POPE.resolve_options({}))
    assert len(kept) == 2 and extra["question_set"]["name"] == "full"
    assert extra["question_set"]["requested"] == "llava"

"""Benchmark loaders, prompts and the fetch/load_local machinery.

Every benchmark is fetched from a tiny local dataset built here with the same columns and types
as its hub dataset, laid out like the hub repository (parquet files + a README.md whose YAML
declares the configs), and read by the same `datasets.load_dataset(<source>, <config>,
split=<split>, revision=<revision>)` call as the real download, with the registry entry from
config/benchmarks.yaml (only `rows` is adapted to the tiny data).
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
import warnings
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from ficoco import benchmarks
from ficoco.benchmarks.base import row_meta
from ficoco.benchmarks.fetch import (data_checksum, fetch_benchmark, is_pinned, load_local, load_registry,
                                     resolve_revision)

REPO_ROOT = Path(__file__).resolve().parents[1]
REGISTRY = yaml.safe_load((REPO_ROOT / "config" / "benchmarks.yaml").read_text())
S = Value("string")
SHORT = "\nAnswer the question using a single word or phrase."
MC = "\nAnswer with the option's letter from the given choices directly."

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def img(color):
    return PILImage.new("RGB", (4, 4), color)


def pixel(image):
    return image.convert("RGB").getpixel((0, 0))


# ---------------------------------------------------------------------------------------------
# hub-like local repositories

def write_repo(root: Path, tables) -> Path:
    """tables: [(config or None, split, Dataset)] -> parquet files + README.md configs."""
    configs: dict[str, list] = {}
    for config, split, dataset in tables:
        folder = config or "data"
        (root / folder).mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(root / folder / f"{split}-00000-of-00001.parquet"))
        configs.setdefault(config or "default", []).append({"split": split, "path": f"{folder}/{split}-*"})
    header = {"configs": [{"config_name": name, "data_files": files} for name, files in configs.items()]}
    (root / "README.md").write_text("---\n" + yaml.safe_dump(header) + "---\n")
    return root


def entry_for(name: str, rows: int | None, **changes) -> dict:
    entry = copy.deepcopy(REGISTRY[name])
    entry["rows"] = rows
    entry.update(changes)
    return {name: entry}


def fetch(name, repo, tmp_path, rows, options=None, out=None):
    out = out or tmp_path / "resources" / "benchmarks" / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # unpinned-revision warnings are tested on their own
        manifest = fetch_benchmark(name, out, options=options, registry=entry_for(name, rows), source=repo,
                                   cache_dir=tmp_path / "hf-cache")
    dataset, loaded_manifest = load_local(out)
    assert loaded_manifest == manifest
    return manifest, dataset, out


def rows_by_id(dataset):
    return {row["id"]: row for row in dataset}


# ---------------------------------------------------------------------------------------------
# raw datasets with the hub columns and types

def gqa_repo(root):
    questions = Dataset.from_dict({
        "id": ["q1", "q2", "q3", "q4"],
        "imageId": ["n1", "n2", "n1", "n9"],            # n9 has no image: a bad row
        "question": ["What color is the car?", "Is it sunny?", "What is on the table?", "Where is the dog?"],
        "answer": ["red", "yes", "cup", "park"],
        "fullAnswer": ["The car is red.", "Yes, it is sunny.", "A cup.", "In the park."],
        "isBalanced": [True, True, True, True],
        "groups": [{"global": "color", "local": "10c-car_color"}] * 4,
        "entailed": [["q9"], [], [], []],
        "equivalent": [["q1"], ["q2"], ["q3"], ["q4"]],
        "types": [{"structural": "query", "semantic": "attr", "detailed": "color"},
                  {"structural": "verify", "semantic": "global", "detailed": "weather"},
                  {"structural": "query", "semantic": "rel", "detailed": "relS"},
                  {"structural": "query", "semantic": "rel", "detailed": "place"}],
        "semanticStr": ["select: car->query: color"] * 4,
    }, features=Features({
        "id": S, "imageId": S, "question": S, "answer": S, "fullAnswer": S, "isBalanced": Value("bool"),
        "groups": {"global": S, "local": S}, "entailed": List(S), "equivalent": List(S),
        "types": {"structural": S, "semantic": S, "detailed": S}, "semanticStr": S}))
    images = Dataset.from_dict({"id": ["n1", "n2", "n3"], "image": [img(RED), img(BLUE), img(GREEN)]},
                               features=Features({"id": S, "image": Image()}))
    return write_repo(root, [("testdev_balanced_instructions", "testdev", questions),
                             ("testdev_balanced_images", "testdev", images)])


def scienceqa_repo(root):
    features = Features({"image": Image(), "question": S, "choices": List(S), "answer": Value("int8"),
                         "hint": S, "task": S, "grade": S, "subject": S, "topic": S, "category": S,
                         "skill": S, "lecture": S, "solution": S})
    common = {"task": "closed choice", "grade": "grade4", "subject": "natural science", "topic": "biology",
              "category": "Classification", "skill": "Identify mammals", "lecture": "", "solution": ""}

    def table(rows):
        return Dataset.from_dict({key: [r.get(key, common.get(key)) for r in rows] for key in features},
                                 features=features)

    img_rows = [
        {"image": img(RED), "question": "Which animal is a mammal?", "choices": ["frog", "dog"], "answer": 1,
         "hint": "Mammals have fur."},
        {"image": img(BLUE), "question": "Which is a fish?", "choices": ["shark", "owl", "cat"], "answer": 0,
         "hint": ""},
    ]
    full_rows = img_rows + [
        {"image": None, "question": "Which word is a noun?", "choices": ["run", "table"], "answer": 1, "hint": ""},
        {"image": img(GREEN), "question": "Broken item", "choices": ["a", "b"], "answer": 5, "hint": ""},
    ]
    return write_repo(root, [("ScienceQA-IMG", "test", table(img_rows)), ("ScienceQA-FULL", "test", table(full_rows))])


def textvqa_repo(root):
    features = Features({"image_id": S, "question_id": Value("int64"), "question": S, "question_tokens": List(S),
                         "image": Image(), "image_width": Value("int64"), "image_height": Value("int64"),
                         "flickr_original_url": S, "flickr_300k_url": S, "answers": List(S),
                         "image_classes": List(S), "set_name": S, "ocr_tokens": List(S)})
    data = {
        "image_id": ["i1", "i2", "i3"], "question_id": [34602, 34603, 34604],
        "question": ["what is THE Sign?", "what brand is this?", "who made it?"],
        "question_tokens": [["what"], ["what"], ["who"]], "image": [img(RED), img(GREEN), img(BLUE)],
        "image_width": [4, 4, 4], "image_height": [4, 4, 4], "flickr_original_url": ["", "", ""],
        "flickr_300k_url": ["", "", ""],
        "answers": [["stop"] * 10, ["nokia"] * 10, []],            # the third has no answers: a bad row
        "image_classes": [[], [], []], "set_name": ["val", "val", "val"],
        "ocr_tokens": [["STOP", "25"], [], ["x"]],
    }
    return write_repo(root, [(None, "validation", Dataset.from_dict(data, features=features))])


def pope_repo(root):
    features = Features({"id": S, "question_id": S, "question": S, "answer": S, "image_source": S,
                         "image": Image(), "category": S})
    cats = ["adversarial", "adversarial", "popular", "popular", "random", "random"]
    data = {"id": [str(i) for i in range(6)], "question_id": ["1", "2", "1", "2", "1", "2"],
            "question": ["Is there a dog in the image?"] * 6,
            "answer": ["yes", "no", "yes", "maybe", "no", "yes"],      # "maybe": a bad row
            "image_source": ["COCO_val2014_000000310196"] * 6, "image": [img(RED)] * 6, "category": cats}
    return write_repo(root, [(None, "test", Dataset.from_dict(data, features=features))])


def mme_repo(root):
    features = Features({"question_id": S, "image": Image(), "question": S, "answer": S, "category": S})
    data = {"question_id": ["existence/000000006040.jpg", "existence/000000006040.jpg",
                            "code_reasoning/0020.png", "code_reasoning/0020.png"],
            "image": [img(RED), img(RED), img(BLUE), img(BLUE)],
            "question": ["Is there a train in this image? Please answer yes or no.",
                         "Is there a bed in this image? Please answer yes or no.",
                         "Is the output 5?", "Is the output 7? Please answer yes or no."],
            "answer": ["Yes", "No", "Yes", "No"],
            "category": ["existence", "existence", "code_reasoning", "code_reasoning"]}
    return write_repo(root, [(None, "test", Dataset.from_dict(data, features=features))])


def mmbench_repo(root):
    def table(index_type, indices):
        features = Features({"index": index_type, "question": S, "hint": S, "answer": S, "A": S, "B": S, "C": S,
                             "D": S, "category": S, "image": Image(), "source": S, "L2-category": S,
                             "comment": S, "split": S})
        data = {
            "index": indices,
            "question": ["What is shown?", "What is shown?", "Which season?"],
            "hint": ["A street scene.", "A street scene.", "nan"],
            "answer": ["B", "A", "B"],
            "A": ["cat", "dog", "winter"], "B": ["dog", "cat", "summer"], "C": ["cow", "cow", "nan"],
            "D": ["pig", "pig", "spring"],
            "category": ["object_localization", "object_localization", "image_scene"],
            "image": [img(RED), img(RED), img(BLUE)], "source": ["s"] * 3,
            "L2-category": ["finegrained_perception", "finegrained_perception", "coarse_perception"],
            "comment": ["nan"] * 3, "split": ["dev"] * 3,
        }
        return Dataset.from_dict(data, features=features)

    return write_repo(root, [("en", "dev", table(S, ["12", "1000012", "40"])),
                             ("cn", "dev", table(Value("int64"), [12, 1000012, 40]))])


def seed_repo(root):
    features = Features({"answer": S, "choice_a": S, "choice_b": S, "choice_c": S, "choice_d": S, "data_id": S,
                         "data_type": S, "question": S, "question_id": S, "question_type_id": Value("int16"),
                         "image": List(Image())})
    data = {"answer": ["A", "C", "B", "D"], "choice_a": ["one", "x", "x", "x"], "choice_b": ["two", "y", "y", "y"],
            "choice_c": ["three", "z", "z", "z"], "choice_d": ["four", "w", "w", "w"],
            "data_id": ["1.jpg", "2.jpg", "v.mp4", "4.jpg"], "data_type": ["image", "image", "video", "image"],
            "question": ["How many cars?", "Where is it?", "What happens?", "What color?"],
            "question_id": ["101", "102", "103", "104"], "question_type_id": [5, 4, 10, 3],
            "image": [[img(RED)], [img(GREEN)], [img(BLUE), img(BLUE)], []]}     # 104 has no image: bad
    return write_repo(root, [(None, "test", Dataset.from_dict(data, features=features))])


def vizwiz_repo(root):
    features = Features({"question_id": S, "image": Image(), "question": S, "answers": List(S), "category": S})
    data = {"question_id": ["VizWiz_val_00000000.jpg", "VizWiz_val_00000001.jpg"],
            "image": [img(RED), img(GREEN)], "question": ["what is THIS?", "which color?"],
            "answers": [["unanswerable"] * 10, ["red"] * 8 + ["pink"] * 2],
            "category": ["unanswerable", "other"]}
    return write_repo(root, [(None, "val", Dataset.from_dict(data, features=features))])


VQAV2_IDS = [5, 3, 9, 1, 7, 11, 4]


def vqav2_repo(root):
    answer = {"answer": S, "answer_confidence": S, "answer_id": Value("int64")}
    features = Features({"question_type": S, "multiple_choice_answer": S, "answers": List(answer),
                         "image_id": Value("int64"), "answer_type": S, "question_id": Value("int64"),
                         "question": S, "image": Image()})
    n = len(VQAV2_IDS)
    data = {"question_type": ["what"] * n, "multiple_choice_answer": ["two"] * n,
            "answers": [[{"answer": "two", "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)]] * n,
            "image_id": list(range(n)), "answer_type": ["number"] * n, "question_id": VQAV2_IDS,
            "question": [f"How many dogs are in picture {q}?" for q in VQAV2_IDS], "image": [img(RED)] * n}
    return write_repo(root, [(None, "validation", Dataset.from_dict(data, features=features))])


def mmvet_repo(root):
    features = Features({"question_id": S, "image": Image(), "question": S, "answer": S, "image_source": S,
                         "capability": S})
    data = {"question_id": ["v1_0", "v1_1"], "image": [img(RED), img(BLUE)],
            "question": ["What is x in the equation?", "What is the brand?"],
            "answer": ["-1 <AND> -5", "nike <OR> Nike"], "image_source": ["a", "b"], "capability": ["ocr,math", "ocr"]}
    return write_repo(root, [(None, "test", Dataset.from_dict(data, features=features))])


def llava_wild_repo(root):
    features = Features({"question_id": Value("int8"), "question": S, "image": Image(), "caption": S,
                         "gpt_answer": S, "category": S, "image_id": S})
    data = {"question_id": [0, 1], "question": ["What is the name of this famous sight?", "Describe the image."],
            "image": [img(RED), img(GREEN)], "caption": ["A mountain lake.", "A busy market."],
            "gpt_answer": ["Lake Moraine.", "A market with stalls."], "category": ["conv", "detail"],
            "image_id": ["001", "002"]}
    return write_repo(root, [(None, "train", Dataset.from_dict(data, features=features))])


def mmmu_repo(root):
    """MMMU/MMMU's layout: one config per subject, two validation questions in each."""
    from ficoco.benchmarks.mmmu import SUBJECTS

    image_columns = {f"image_{k}": Image() for k in range(1, 8)}
    features = Features({"id": S, "question": S, "options": S, "explanation": S, **image_columns, "img_type": S,
                         "answer": S, "topic_difficulty": S, "question_type": S, "subfield": S})
    tables = []
    for subject in SUBJECTS:
        data = {"id": [f"validation_{subject}_1", f"validation_{subject}_2"],
                "question": [f"<image 1> Which {subject}?", "How many? <image 1> <image 2>"],
                "options": ["['red', 'blue', 'green']", "[]"], "explanation": ["", ""],
                "image_1": [img(RED), img(GREEN)], "image_2": [None, img(BLUE)],
                **{f"image_{k}": [None, None] for k in range(3, 8)},
                "img_type": ["['Photos']", "['Diagrams']"], "answer": ["B", "['12', '12.0']"],
                "topic_difficulty": ["Easy", "Hard"], "question_type": ["multiple-choice", "open"],
                "subfield": ["a", "b"]}
        if subject == "Math":
            data["answer"][0] = "Z"                              # not an option's letter: a bad row
        if subject == "Music":
            data["image_1"][1] = None                            # no image: a bad row
        tables.append((subject, "validation", Dataset.from_dict(data, features=features)))
    return write_repo(root, tables)


# ---------------------------------------------------------------------------------------------
# one test per benchmark: normalised rows, bad rows, prompts

def test_gqa_joins_images_on_image_id_and_flags_the_question_without_one(tmp_path):
    manifest, ds, _ = fetch("gqa", gqa_repo(tmp_path / "repo"), tmp_path, rows=4)
    rows = rows_by_id(ds)
    assert list(ds["id"]) == ["q1", "q2", "q3", "q4"] and manifest["rows"] == 4
    assert pixel(rows["q1"]["image"]) == RED and pixel(rows["q3"]["image"]) == RED   # both on image n1
    assert pixel(rows["q2"]["image"]) == BLUE
    assert rows["q4"]["image"] is None and row_meta(rows["q4"])["bad_row"] == "missing_image"
    assert manifest["bad_rows"]["count"] == 1 and manifest["bad_rows"]["by_reason"] == {"missing_image": 1}
    assert rows["q1"]["answers"] == ["red"] and rows["q1"]["choices"] == []
    assert row_meta(rows["q2"])["structural"] == "verify"
    assert manifest["config"] == "testdev_balanced_instructions" and manifest["images"]["config"] == "testdev_balanced_images"
    bench = benchmarks.get("gqa")
    assert bench.prompt(rows["q1"], {}) == "What color is the car?" + SHORT
    assert bench.max_new_tokens == 128
    # the bad row is scored None and counted, never averaged in
    records = [bench.score_sample("Red.", rows["q1"]), bench.score_sample("no", rows["q2"]),
               bench.score_sample("park", rows["q4"])]
    metrics = bench.aggregate(records)
    assert metrics["score"] == 50.0 and metrics["bad_rows"] == 1 and metrics["scored"] == 2


def test_scienceqa_img_and_full_variants(tmp_path):
    repo = scienceqa_repo(tmp_path / "repo")
    _, img_ds, _ = fetch("scienceqa_img", repo, tmp_path, rows=2)
    manifest, full_ds, _ = fetch("scienceqa_full", repo, tmp_path, rows=4)
    assert len(img_ds) == 2 and len(full_ds) == 4
    first = img_ds[0]
    assert first["answers"] == ["B"] and first["choices"] == ["frog", "dog"]
    bench = benchmarks.get("scienceqa_img")
    assert bench.max_new_tokens == 1024
    assert bench.prompt(first, None) == ("Context: Mammals have fur.\nWhich animal is a mammal?\nA. frog\nB. dog" + MC)
    assert bench.prompt(img_ds[1], None) == "Which is a fish?\nA. shark\nB. owl\nC. cat" + MC
    text_only, broken = full_ds[2], full_ds[3]
    assert text_only["image"] is None and "bad_row" not in row_meta(text_only)   # FULL: no image is fine
    assert row_meta(text_only)["has_image"] is False
    assert broken["answers"] == [] and row_meta(broken)["bad_row"] == "empty_answers"
    assert manifest["bad_rows"]["count"] == 1
    # IMG accuracy over the image rows, overall accuracy over all scored rows
    full = benchmarks.get("scienceqa_full")
    records = [full.score_sample("B", full_ds[0]), full.score_sample("B", full_ds[1]),
               full.score_sample("B", full_ds[2]), full.score_sample("A", full_ds[3])]
    metrics = full.aggregate(records)
    # image rows: 0 right, 1 wrong -> 50; all three scored rows: 2 of 3 right. FULL's headline is the overall
    # accuracy (the paper's SQA column), IMG's the image rows'
    assert metrics["img_accuracy"] == 50.0 and metrics["bad_rows"] == 1
    assert metrics["score"] == metrics["accuracy"] == pytest.approx(200 / 3)
    img = benchmarks.get("scienceqa_img")
    metrics = img.aggregate([img.score_sample("B", img_ds[0]), img.score_sample("B", img_ds[1])])
    assert metrics["score"] == metrics["img_accuracy"] == metrics["accuracy"] == 50.0


def test_textvqa_rows_and_ocr_prompt_modes(tmp_path):
    manifest, ds, _ = fetch("textvqa", textvqa_repo(tmp_path / "repo"), tmp_path, rows=3)
    rows = rows_by_id(ds)
    assert set(rows) == {"34602", "34603", "34604"}
    sign = rows["34602"]
    assert row_meta(sign)["ocr_tokens"] == ["STOP", "25"] and len(sign["answers"]) == 10
    assert row_meta(rows["34604"])["bad_row"] == "empty_answers" and manifest["bad_rows"]["count"] == 1
    bench = benchmarks.get("textvqa")
    # str.capitalize lower-cases the rest of the question
    assert bench.prompt(sign, {"ocr": True}) == "What is the sign?\nReference OCR token: STOP, 25" + SHORT
    assert bench.prompt(sign, {}) == "What is the sign?\nReference OCR token: STOP, 25" + SHORT   # default: ocr
    assert bench.prompt(sign, {"ocr": False}) == "What is the sign?" + SHORT
    # OCR mode with an empty token list still emits the line
    assert bench.prompt(rows["34603"], {"ocr": True}) == "What brand is this?\nReference OCR token: " + SHORT
    with pytest.raises(ValueError, match="ocr must be true or false"):
        bench.prompt(sign, {"ocr": "yes"})
    with pytest.raises(ValueError, match="unknown option.*ocrr.*valid options: ocr"):
        bench.prompt(sign, {"ocrr": True})


def test_pope_rows_categories_option_and_bad_answers(tmp_path):
    # question_set full: every row (LLaVA's question set is tested in test_benchmarks_llava_parity.py)
    repo = pope_repo(tmp_path / "repo")
    full = {"question_set": "full"}
    manifest, ds, _ = fetch("pope", repo, tmp_path, rows=6, options=full)
    assert list(ds["id"]) == ["adversarial/1", "adversarial/2", "popular/1", "popular/2", "random/1", "random/2"]
    assert row_meta(ds[3])["bad_row"] == "answer_not_yes_no"
    assert manifest["options"] == {"categories": ["adversarial", "popular", "random"], "question_set": "full"}
    assert benchmarks.get("pope").prompt(ds[0], {}) == "Is there a dog in the image?" + SHORT

    out = tmp_path / "only-random" / "pope"
    options = {"categories": ["random"], **full}
    manifest, ds, _ = fetch("pope", repo, tmp_path, rows=6, options=options, out=out)
    assert list(ds["id"]) == ["random/1", "random/2"] and manifest["rows"] == 2
    assert manifest["options"] == {"categories": ["random"], "question_set": "full"}
    load_local(out, expected_options=options)
    with pytest.raises(ValueError, match="fetched with options"):
        load_local(out, expected_options=full)                    # the config wants all three now
    with pytest.raises(ValueError, match="categories must be a non-empty list drawn from adversarial"):
        benchmarks.get("pope").resolve_options({"categories": ["popular", "rare"]})


def test_mme_rows_prompt_replacement_and_unique_ids(tmp_path):
    _, ds, _ = fetch("mme", mme_repo(tmp_path / "repo"), tmp_path, rows=4)
    assert len(set(ds["id"])) == 4
    assert ds[0]["answers"] == ["yes"] and ds[1]["answers"] == ["no"]
    assert row_meta(ds[0])["image_key"] == row_meta(ds[1])["image_key"] == "existence/000000006040.jpg"
    bench = benchmarks.get("mme")
    assert bench.prompt(ds[0], {}) == "Is there a train in this image?" + SHORT
    assert bench.prompt(ds[2], {}) == "Is the output 5?" + SHORT          # phrase absent: suffix appended


def test_mmbench_en_and_cn_rows_options_and_prompts(tmp_path):
    repo = mmbench_repo(tmp_path / "repo")
    _, en, _ = fetch("mmbench", repo, tmp_path, rows=3)
    _, cn, _ = fetch("mmbench_cn", repo, tmp_path, rows=3)
    for ds in (en, cn):
        assert list(ds["id"]) == ["12", "1000012", "40"]
        base, variant, other = ds[0], ds[1], ds[2]
        assert row_meta(base)["group"] == row_meta(variant)["group"] == 12
        assert row_meta(base)["round"] == 0 and row_meta(variant)["round"] == 1
        assert base["choices"] == ["cat", "dog", "cow", "pig"] and base["answers"] == ["B"]
        # option C is missing ("nan"): the options stop there, D is not shown
        assert other["choices"] == ["winter", "summer"] and row_meta(other)["hint"] is None
    assert benchmarks.get("mmbench").prompt(en[0], {}) == (
        "A street scene.\nWhat is shown?\nA. cat\nB. dog\nC. cow\nD. pig" + MC)
    assert benchmarks.get("mmbench_cn").prompt(cn[2], {}) == "Which season?\nA. winter\nB. summer\n请直接回答选项字母。"
    assert benchmarks.get("mmbench").max_new_tokens == 1024


def test_seed_keeps_image_questions_only(tmp_path):
    manifest, ds, _ = fetch("seed_image", seed_repo(tmp_path / "repo"), tmp_path, rows=3)
    assert list(ds["id"]) == ["101", "102", "104"]                 # the video question is filtered out
    assert pixel(ds[0]["image"]) == RED and ds[0]["choices"] == ["one", "two", "three", "four"]
    assert row_meta(ds[2])["bad_row"] == "missing_image" and manifest["bad_rows"]["count"] == 1
    assert benchmarks.get("seed_image").prompt(ds[0], {}) == (
        "How many cars?\nA. one\nB. two\nC. three\nD. four" + MC)


def test_seed_rows_with_an_answer_or_a_choice_that_cannot_be_are_bad_rows(tmp_path):
    """An answer that is no option letter, or a null choice (which would be prompted as "D. None"), makes a bad row
    (counted, left out of the accuracy), never a sample scored wrong in the denominator."""
    features = Features({"answer": S, "choice_a": S, "choice_b": S, "choice_c": S, "choice_d": S, "data_id": S,
                         "data_type": S, "question": S, "question_id": S, "question_type_id": Value("int16"),
                         "image": List(Image())})
    data = {"answer": ["A", "E", "ANSWER: B", "b"], "choice_a": ["one"] * 4, "choice_b": ["two"] * 4,
            "choice_c": ["three"] * 4, "choice_d": ["four", "four", "four", None], "data_id": ["1.jpg"] * 4,
            "data_type": ["image"] * 4, "question": ["How many?"] * 4, "question_id": ["1", "2", "3", "4"],
            "question_type_id": [5] * 4, "image": [[img(RED)]] * 4}
    repo = write_repo(tmp_path / "repo", [(None, "test", Dataset.from_dict(data, features=features))])
    manifest, ds, _ = fetch("seed_image", repo, tmp_path, rows=4)
    assert "bad_row" not in row_meta(ds[0]) and ds[0]["answers"] == ["A"]
    assert [row_meta(ds[i]).get("bad_row", "") for i in (1, 2)] == ["empty_answers", "empty_answers"]
    assert row_meta(ds[3])["bad_row"].startswith("bad_choices: null in choices") and ds[3]["answers"] == ["B"]
    assert manifest["bad_rows"]["count"] == 3 and manifest["bad_rows"]["by_reason"] == {
        "bad_choices": 1, "empty_answers": 2}


def test_mmbench_reads_options_a_to_d_as_llavas_script_does():
    raw = {"index": 7, "question": "Which?", "hint": "nan", "answer": "E", "A": "a", "B": "b", "C": "c", "D": "d",
           "E": "e", "category": "x", "L2-category": "y", "image": None, "source": "s"}
    row = benchmarks.get("mmbench").to_row(raw, 0, None)
    assert row["choices"] == ["a", "b", "c", "d"] and row["answers"] == []         # E is no option: a bad row


def test_scienceqa_null_choices_and_blank_hints(tmp_path):
    features = Features({"image": Image(), "question": S, "choices": List(S), "answer": Value("int8"), "hint": S})
    data = {"image": [img(RED), img(BLUE)], "question": ["Which?", "Which?"], "choices": [["a", None], ["a", "b"]],
            "answer": [0, 1], "hint": ["", "  \n "]}
    table = Dataset.from_dict(data, features=features)
    repo = write_repo(tmp_path / "repo", [("ScienceQA-IMG", "test", table), ("ScienceQA-FULL", "test", table)])
    _, ds, _ = fetch("scienceqa_img", repo, tmp_path, rows=2)
    assert row_meta(ds[0])["bad_row"].startswith("bad_choices: null in choices")        # never the text "None"
    # a hint of white space alone is no context (the spec: "only if the hint is non-empty")
    assert benchmarks.get("scienceqa_img").prompt(ds[1], None) == "Which?\nA. a\nB. b" + MC


def test_vizwiz_rows_and_prompt(tmp_path):
    _, ds, _ = fetch("vizwiz", vizwiz_repo(tmp_path / "repo"), tmp_path, rows=2)
    assert ds[0]["id"] == "VizWiz_val_00000000.jpg" and len(ds[1]["answers"]) == 10
    assert benchmarks.get("vizwiz").prompt(ds[0], {}) == (
        "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT)


def test_vqav2_full_and_deterministic_subset(tmp_path):
    repo = vqav2_repo(tmp_path / "repo")
    manifest, ds, _ = fetch("vqav2", repo, tmp_path, rows=7)
    assert manifest["subset"] is None and ds[0]["answers"] == ["two"] * 10
    assert benchmarks.get("vqav2").prompt(ds[0], {}) == "How many dogs are in picture 5?" + SHORT

    out_a, out_b = tmp_path / "a" / "vqav2", tmp_path / "b" / "vqav2"
    manifest_a, sub_a, _ = fetch("vqav2", repo, tmp_path, rows=7, options={"subset_size": 3, "seed": 11}, out=out_a)
    manifest_b, _, _ = fetch("vqav2", repo, tmp_path, rows=7, options={"subset_size": 3, "seed": 11}, out=out_b)
    # the rule: sort the ids, shuffle with Random(seed), take the first N
    ordered = sorted(VQAV2_IDS)
    random.Random(11).shuffle(ordered)
    expected = sorted(ordered[:3])
    assert manifest_a["subset"]["question_ids"] == expected == manifest_b["subset"]["question_ids"]
    assert manifest_a["subset"]["sha256"] == "sha256:" + hashlib.sha256(
        ",".join(map(str, expected)).encode()).hexdigest()
    assert manifest_a["subset"]["of"] == 7 and manifest_a["rows"] == 3
    assert list(sub_a["id"]) == [str(q) for q in VQAV2_IDS if q in expected]     # dataset order kept
    assert manifest_a["checksum"] == manifest_b["checksum"]
    with pytest.raises(ValueError, match=r"subset_size must be an integer in 1\.\.7"):
        fetch("vqav2", repo, tmp_path, rows=7, options={"subset_size": 8}, out=tmp_path / "c" / "vqav2")


def test_mmvet_and_llava_wild_rows(tmp_path):
    _, vet, _ = fetch("mmvet", mmvet_repo(tmp_path / "r1"), tmp_path, rows=2)
    assert vet[0]["answers"] == ["-1 <AND> -5"] and row_meta(vet[0])["capabilities"] == ["ocr", "math"]
    assert benchmarks.get("mmvet").prompt(vet[0], {}) == "What is x in the equation?"   # no suffix
    _, wild, _ = fetch("llava_wild", llava_wild_repo(tmp_path / "r2"), tmp_path, rows=2)
    assert wild[0]["id"] == "0" and wild[0]["answers"] == ["Lake Moraine."]
    assert row_meta(wild[1])["category"] == "detail" and row_meta(wild[1])["context"] == "A busy market."
    assert benchmarks.get("llava_wild").prompt(wild[1], {}) == "Describe the image."
    assert benchmarks.get("mmvet").max_new_tokens == benchmarks.get("llava_wild").max_new_tokens == 1024


def test_mmmu_reads_every_subject_config_in_order(tmp_path):
    from ficoco.benchmarks.mmmu import SUBJECTS

    manifest, ds, _ = fetch("mmmu", mmmu_repo(tmp_path / "repo"), tmp_path, rows=60)
    assert manifest["rows"] == 60 and ds["id"][:2] == [f"validation_{SUBJECTS[0]}_1", f"validation_{SUBJECTS[0]}_2"]
    assert [row_meta(r)["subject"] for r in ds][::2] == list(SUBJECTS)
    rows = rows_by_id(ds)
    choice, open_question = rows["validation_Art_1"], rows["validation_Art_2"]
    assert choice["choices"] == ["red", "blue", "green"] and choice["answers"] == ["B"]
    assert pixel(choice["image"]) == RED and row_meta(choice)["images"] == 1
    assert row_meta(choice)["discipline"] == "Art and Design" and row_meta(choice)["question_type"] == "multiple-choice"
    assert open_question["choices"] == [] and open_question["answers"] == ["12", "12.0"]
    assert pixel(open_question["image"]) == GREEN and row_meta(open_question)["images"] == 2   # image_1 only is shown
    bench = benchmarks.get("mmmu")
    assert bench.prompt(choice, {}) == ("<image 1> Which Art?\n(A) red\n(B) blue\n(C) green\n\n"
                                        "Answer with the option's letter from the given choices directly.")
    assert bench.prompt(open_question, {}) == "How many? <image 1> <image 2>" + SHORT
    assert row_meta(rows["validation_Math_1"])["bad_row"] == "answer_not_an_option_letter"
    assert row_meta(rows["validation_Music_2"])["bad_row"] == "missing_image"
    assert manifest["bad_rows"]["count"] == 2
    assert bench.score_sample("(B)", choice)["score"] == 1.0
    assert bench.score_sample("The answer is 12", open_question)["score"] == 1.0
    assert bench.score_sample("(B)", rows["validation_Math_1"])["score"] is None


# ---------------------------------------------------------------------------------------------
# fetch machinery

def test_manifest_fields_checksum_and_normalised_schema(tmp_path):
    manifest, ds, out = fetch("mme", mme_repo(tmp_path / "repo"), tmp_path, rows=4)
    for key in ("benchmark", "id", "config", "split", "revision", "resolved_revision", "rows", "checksum",
                "bad_rows", "fetched_at"):
        assert key in manifest
    assert manifest["id"] == "lmms-lab/MME" and manifest["split"] == "test"
    assert manifest["revision"] == REGISTRY["mme"]["revision"] and manifest["revision_pinned"] is True
    assert manifest["resolved_revision"] is None and manifest["source"].startswith("local:")
    assert manifest["checksum"] == data_checksum(out / "data")
    load_local(out, verify=True)
    assert list(ds.features) == ["id", "image", "question", "answers", "choices", "meta"]
    assert type(ds.features["image"]).__name__ == "Image"
    assert sorted(p.name for p in out.iterdir()) == ["data", "manifest.json"]
    assert [p.name for p in out.parent.iterdir()] == ["mme"]       # no staging directory left behind
    # the same source fetched again gives the same checksum
    again, _, _ = fetch("mme", tmp_path / "repo", tmp_path, rows=4, out=tmp_path / "again" / "mme")
    assert again["checksum"] == manifest["checksum"]


def test_refetch_replaces_atomically_and_a_failed_fetch_leaves_nothing(tmp_path, monkeypatch):
    repo = mme_repo(tmp_path / "repo")
    manifest, _, out = fetch("mme", repo, tmp_path, rows=4)
    stamp = manifest["fetched_at"]
    bench = benchmarks.get("mme")

    def broken(raw, index, context):
        raise RuntimeError("normalisation exploded")

    monkeypatch.setattr(type(bench), "to_row", lambda self, raw, index, context: broken(raw, index, context))
    with pytest.raises(RuntimeError, match="exploded"):
        fetch("mme", repo, tmp_path, rows=4)
    # the previous complete copy is untouched, nothing half-written next to it
    assert json.loads((out / "manifest.json").read_text())["fetched_at"] == stamp
    assert [p.name for p in out.parent.iterdir()] == ["mme"]
    fresh = tmp_path / "fresh" / "mme"
    with pytest.raises(RuntimeError, match="exploded"):
        fetch("mme", repo, tmp_path, rows=4, out=fresh)
    assert not fresh.exists() and list(fresh.parent.iterdir()) == []


def test_row_count_mismatch_at_a_pinned_revision_is_an_error(tmp_path):
    repo = mme_repo(tmp_path / "repo")
    out = tmp_path / "out" / "mme"
    with pytest.raises(ValueError, match="4 rows, the registry expects 2374"):
        fetch_benchmark("mme", out, registry=entry_for("mme", 2374), source=repo, cache_dir=tmp_path / "c")
    assert not out.exists()
    # not exact: a warning, and the data is written
    with pytest.warns(UserWarning, match="4 rows, the registry expects 2374"):
        fetch_benchmark("mme", out, registry=entry_for("mme", 2374, rows_exact=False), source=repo,
                        cache_dir=tmp_path / "c")
    assert (out / "manifest.json").exists()


def test_unpinned_revision_warns_loudly(tmp_path):
    repo = mme_repo(tmp_path / "repo")
    registry = entry_for("mme", 4, revision="main")
    with pytest.warns(UserWarning, match="revision 'main' is NOT a pinned commit"):
        manifest = fetch_benchmark("mme", tmp_path / "o" / "mme", registry=registry, source=repo,
                                   cache_dir=tmp_path / "c")
    assert manifest["revision"] == "main" and manifest["revision_pinned"] is False
    assert is_pinned(REGISTRY["mme"]["revision"]) and not is_pinned("9c0699c") and not is_pinned("main")


def test_resolve_revision_records_the_commit_a_branch_names():
    class FakeApi:
        def __init__(self):
            self.calls = []

        def dataset_info(self, repo_id, revision=None):
            self.calls.append((repo_id, revision))
            return type("Info", (), {"sha": "f" * 40})()

    api = FakeApi()
    assert resolve_revision("lmms-lab/MME", "main", api=api) == "f" * 40
    assert api.calls == [("lmms-lab/MME", "main")]
    pinned = "a" * 40
    assert resolve_revision("lmms-lab/MME", pinned, api=api) == pinned and len(api.calls) == 1

    class OfflineApi:
        def dataset_info(self, repo_id, revision=None):
            raise ConnectionError("offline")

    with pytest.warns(UserWarning, match="could not resolve revision 'main'"):
        assert resolve_revision("lmms-lab/MME", "main", api=OfflineApi()) is None


def test_primary_failure_falls_back_to_the_second_namespace(tmp_path):
    repo = mme_repo(tmp_path / "repo")
    registry = entry_for("mme", 4, id="lmms-lab/MME", fallback_id=str(repo))
    with pytest.warns(UserWarning, match="using fallback"):
        manifest = fetch_benchmark("mme", tmp_path / "o" / "mme", registry=registry, cache_dir=tmp_path / "c")
    assert manifest["fallback_used"] is True and manifest["rows"] == 4
    assert manifest["requested_revision"] == REGISTRY["mme"]["revision"] and manifest["revision"] == "main"
    # the fallback stands for the pinned data: held to its row count (rows_exact), never waved through unpinned
    registry = entry_for("mme", 5, id="lmms-lab/MME", fallback_id=str(repo), rows_exact=True)
    with pytest.warns(UserWarning, match="using fallback"), pytest.raises(ValueError, match="4 rows, the registry "
                                                                                         "expects 5 at the pinned"):
        fetch_benchmark("mme", tmp_path / "q" / "mme", registry=registry, cache_dir=tmp_path / "c")
    registry = entry_for("mme", 4, id="lmms-lab/MME", fallback_id="lmms-lab-encoder/MME")
    with pytest.raises(RuntimeError, match="could not load the data from any source") as error:
        fetch_benchmark("mme", tmp_path / "p" / "mme", registry=registry, cache_dir=tmp_path / "c")
    assert "lmms-lab/MME@" in str(error.value) and "lmms-lab-encoder/MME@main" in str(error.value)


def test_a_copy_fetched_at_another_pin_is_refused_before_any_job(tmp_path):
    from ficoco.config import ConfigError, check_fetched_copies

    repo = mme_repo(tmp_path / "repo")
    registry = entry_for("mme", 4, id=str(repo), revision="a" * 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fetch_benchmark("mme", tmp_path / "mme", registry=registry, cache_dir=tmp_path / "c")
    manifest = {"mme": str(tmp_path / "mme" / "manifest.json")}
    check_fetched_copies({}, registry, {}, manifest)                                  # the pin it was fetched at
    for change, shown in (({"revision": "b" * 40}, f"revision {'a' * 40!r} there, {'b' * 40!r}"),
                          ({"split": "validation"}, "split 'test' there, 'validation' in the registry"),
                          ({"id": "lmms-lab/MME"}, f"id {str(repo)!r} there, 'lmms-lab/MME'")):
        with pytest.raises(ConfigError, match="was fetched at another pin than benchmarks registry entry 'mme'") as error:
            check_fetched_copies({}, {"mme": {**registry["mme"], **change}}, {}, manifest)
        assert shown in str(error.value) and "rm -r" in str(error.value)
    check_fetched_copies({}, registry, {}, {"mme": str(tmp_path / "not-fetched" / "manifest.json")})   # no copy yet


def test_load_local_names_the_fetch_commands_when_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_local(tmp_path / "resources" / "benchmarks" / "pope")
    message = str(error.value)
    assert "snakemake resources/benchmarks/pope/manifest.json" in message
    assert "ficoco fetch-benchmark pope" in message


def test_load_local_detects_a_tampered_copy(tmp_path):
    _, _, out = fetch("mme", mme_repo(tmp_path / "repo"), tmp_path, rows=4)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "checksum": "sha256:0"}))
    load_local(out)                                    # cheap load does not hash
    with pytest.raises(ValueError, match="checksum does not match"):
        load_local(out, verify=True)
    (out / "manifest.json").write_text(json.dumps({**manifest, "rows": 5}))
    with pytest.raises(ValueError, match="4 rows but the manifest says 5"):
        load_local(out)


def test_registry_matches_the_modules_and_the_yaml():
    yaml_names = set(load_registry())
    for name, entry in REGISTRY.items():
        module = entry.get("module", name)
        if entry.get("source", "hub") == "hub":
            bench = benchmarks.get(module)
            assert bench.name == name
            if name == "mmmu":                 # the MMMU authors' own dataset, one config per subject
                assert entry["id"] == "MMMU/MMMU" and "fallback_id" not in entry
            else:
                assert entry["id"].startswith("lmms-lab/")
                assert entry["fallback_id"] == entry["id"].replace("lmms-lab/", "lmms-lab-encoder/")
            assert entry["split"] and entry.get("revision")
        else:
            assert module in benchmarks.names()
    hub_modules = {n for n in benchmarks.names() if n != "toy-shapes"}
    assert hub_modules <= yaml_names
    with pytest.raises(ValueError, match="unknown benchmark 'nope'; valid benchmarks: gqa, llava_wild"):
        benchmarks.get("nope")
    expected_tokens = {"gqa": 128, "textvqa": 128, "pope": 128, "mme": 128, "seed_image": 128, "vizwiz": 128,
                       "vqav2": 128, "scienceqa_img": 1024, "scienceqa_full": 1024, "mmbench": 1024,
                       "mmbench_cn": 1024, "mmvet": 1024, "llava_wild": 1024, "mmmu": 128}
    assert {n: benchmarks.get(n).max_new_tokens for n in expected_tokens} == expected_tokens


def test_fetch_benchmark_command_line(tmp_path, monkeypatch, capsys):
    from ficoco.benchmarks.fetch import main

    repo = pope_repo(tmp_path / "repo")
    registry = tmp_path / "benchmarks.yaml"
    registry.write_text(yaml.safe_dump(entry_for("pope", 6)))
    out = tmp_path / "resources" / "benchmarks" / "pope"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["pope", "--out", str(out), "--registry", str(registry), "--source", str(repo),
                     "--options", json.dumps({"categories": ["popular", "random"], "question_set": "full"}),
                     "--cache-dir", str(tmp_path / "c")]) == 0
    dataset, manifest = load_local(out)
    assert len(dataset) == 4
    assert manifest["options"] == {"categories": ["popular", "random"], "question_set": "full"}
    assert "pope: 4 rows (1 bad)" in capsys.readouterr().out


def test_image_bytes_pass_through_unchanged(tmp_path):
    import io

    def jpeg(color):
        buffer = io.BytesIO()
        img(color).resize((16, 12)).save(buffer, format="JPEG", quality=87)
        return buffer.getvalue()

    originals = [jpeg(RED), jpeg(GREEN)]
    features = Features({"question_id": S, "image": Image(), "question": S, "answer": S, "category": S})
    data = {"question_id": ["count/1.jpg", "count/2.jpg"], "image": [{"bytes": b, "path": None} for b in originals],
            "question": ["Are there two cats?", "Is there a cat?"], "answer": ["Yes", "No"],
            "category": ["count", "count"]}
    repo = write_repo(tmp_path / "repo", [(None, "test", Dataset.from_dict(data, features=features))])
    _, ds, _ = fetch("mme", repo, tmp_path, rows=2)
    stored = ds.cast_column("image", Image(decode=False))["image"]
    assert [cell["bytes"] for cell in stored] == originals          # not decoded, not re-encoded
    assert ds[0]["image"].size == (16, 12)
    # SEED's list-of-images column and GQA's joined images keep their bytes too
    _, seed, _ = fetch("seed_image", seed_repo(tmp_path / "seed"), tmp_path, rows=3)
    raw_seed = Dataset.from_parquet(str(tmp_path / "seed" / "data" / "test-00000-of-00001.parquet"))
    first_raw = raw_seed.cast_column("image", List(Image(decode=False)))[0]["image"][0]["bytes"]
    assert seed.cast_column("image", Image(decode=False))[0]["image"]["bytes"] == first_raw


def test_duplicate_ids_are_refused_with_their_count(tmp_path):
    features = Features({"id": S, "question_id": S, "question": S, "answer": S, "image_source": S,
                         "image": Image(), "category": S})
    data = {"id": ["0", "1", "2"], "question_id": ["7", "7", "7"], "question": ["Is there a cat?"] * 3,
            "answer": ["yes", "no", "yes"], "image_source": ["x"] * 3, "image": [img(RED)] * 3,
            "category": ["random"] * 3}
    repo = write_repo(tmp_path / "repo", [(None, "test", Dataset.from_dict(data, features=features))])
    # never renamed, never replaced: a job keys its records by id
    with pytest.raises(ValueError, match=r"1 duplicate id\(s\) on 3 rows \(e.g. 'random/7' x3\)"):
        fetch("pope", repo, tmp_path, rows=3, options={"question_set": "full"})
    assert not (tmp_path / "resources" / "benchmarks" / "pope").exists()


def test_a_toy_benchmark_is_built_not_fetched(capsys):
    """`ficoco fetch-benchmark toy-shapes-mini` would otherwise build 500 rows of the test split whatever the
    registry says (16 rows; toy-shapes-train: the train split): refused, naming the command that builds it."""
    from ficoco.benchmarks.fetch import main

    assert main(["toy-shapes-train", "--out", "/nonexistent/t"]) == 2
    message = capsys.readouterr().err
    assert "benchmark toy-shapes-train is built locally, not fetched" in message
    assert "snakemake resources/benchmarks/toy-shapes-train/manifest.json" in message
    assert "--rows 64 --split train" in message

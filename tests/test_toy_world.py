"""The embedded toy world: generator, benchmark directory, tiny LLaVA, training, benchmark module.

Answers are checked against an independent reading of the rendered pixels (connected blobs of
non-background colour, their colour, area and position), never against the generator's labels.
"""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from ficoco.benchmarks import toy as toy_benchmark
from ficoco.toy import cli as toy_cli
from ficoco.toy import model as toy_model
from ficoco.toy import shapes
from ficoco.toy import train as toy_train

REPO_ROOT = Path(__file__).resolve().parents[1]

# The palette is part of the world's definition (what "red" means); shape names are recognised
# from blob areas worked out by hand from the drawing rules in docs/toy.md:
# square 6x6 = 36, circle 6x6 minus 4 corners = 32, triangle rows 2+2+4+4+6+6 = 24, plus sign 12+12-4 = 20.
SHAPE_BY_AREA = {36: "square", 32: "circle", 24: "triangle", 20: "cross"}
NUMBERS = {1: "one", 2: "two", 3: "three"}


def blobs_from_pixels(image) -> list[dict]:
    """Connected (4-neighbour) regions of non-background pixels: colour name, area, centre (y, x).

    The floor is two-tone (left and right halves); the top corners are always floor.
    """
    pixels = np.asarray(image.convert("RGB")).astype(int)                     # (H, W, 3)
    half = pixels.shape[1] // 2
    floor = np.empty_like(pixels)
    floor[:, :half], floor[:, half:] = pixels[0, 0], pixels[0, -1]
    foreground = np.any(pixels != floor, axis=-1)                              # (H, W)
    seen = np.zeros_like(foreground)
    found = []
    height, width = foreground.shape
    for y0, x0 in zip(*np.nonzero(foreground)):
        if seen[y0, x0]:
            continue
        queue, members = deque([(y0, x0)]), []
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            members.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width and foreground[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        ys, xs = np.array(members).T
        rgb = pixels[ys[0], xs[0]]
        assert all((pixels[y, x] == rgb).all() for y, x in members), "a blob has more than one colour"
        colour = min(shapes.COLORS, key=lambda name: np.abs(np.array(shapes.COLORS[name]) - rgb).sum())
        assert np.abs(np.array(shapes.COLORS[colour]) - rgb).sum() == 0, f"unknown colour {rgb}"
        found.append({"color": colour, "area": len(members), "center": (ys.mean(), xs.mean())})
    return found


def answer_from_pixels(question: str, image) -> str:
    """Answer a toy question by reading the image, parsing the question text on its own."""
    blobs = blobs_from_pixels(image)
    for blob in blobs:
        blob["shape"] = SHAPE_BY_AREA[blob["area"]]
    asked = question.split()[-2]                                               # the word before "?"
    if question.startswith("what color is the"):
        (match,) = [b for b in blobs if b["shape"] == asked]                  # exactly one such shape
        return match["color"]
    if question.startswith("which shape is"):
        (match,) = [b for b in blobs if b["color"] == asked]
        return match["shape"]
    if question.startswith("how many objects are"):
        return NUMBERS[sum(b["color"] == asked for b in blobs)]
    if question.startswith("on which side is the"):
        (match,) = [b for b in blobs if b["shape"] == asked]
        return "left" if match["center"][1] < image.width / 2 else "right"
    raise AssertionError(f"unknown question form: {question!r}")


# ---------------------------------------------------------------------------------- generator

def test_generator_is_deterministic_for_a_seed():
    first = [shapes.sample(7, "test", i) for i in range(12)]
    again = [shapes.sample(7, "test", i) for i in range(12)]
    assert [shapes.png_bytes(s.image()) for s in first] == [shapes.png_bytes(s.image()) for s in again]
    assert [(s.question, s.answer) for s in first] == [(s.question, s.answer) for s in again]
    assert shapes.checksum(first) == shapes.checksum(again)
    other_seed = [shapes.sample(8, "test", i) for i in range(12)]
    train_split = [shapes.sample(7, "train", i) for i in range(12)]
    assert shapes.checksum(other_seed) != shapes.checksum(first)
    assert shapes.checksum(train_split) != shapes.checksum(first)


def test_train_and_held_out_images_do_not_overlap():
    held_out = {np.asarray(s.image()).tobytes() for s in shapes.samples(1234, "test", 300)}
    train = {np.asarray(s.image()).tobytes() for s in shapes.samples(1234, "train", 300)}
    assert not held_out & train


def test_answers_are_correct_by_an_independent_pixel_reading():
    rows = shapes.samples(3, "test", 240)
    assert {r.kind for r in rows} == set(shapes.KINDS)
    for row in rows:
        image = row.image()
        assert image.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
        assert answer_from_pixels(row.question, image) == row.answer, row
        assert len(blobs_from_pixels(image)) == len(row.objects)        # objects never touch


def test_every_extra_training_question_is_correct_by_pixels():
    for row in shapes.samples(5, "train", 40):
        image = row.image()
        for _, question, answer, _ in row.all_questions():
            assert answer_from_pixels(question, image) == answer


def test_answers_are_balanced_within_each_kind():
    rows = shapes.samples(11, "test", 800)
    for kind, options in [("color", shapes.COLOR_NAMES), ("shape", shapes.SHAPE_NAMES),
                          ("count", shapes.NUMBER_WORDS), ("position", shapes.SIDES)]:
        answers = [r.answer for r in rows if r.kind == kind]
        counts = np.array([answers.count(o) for o in options])
        assert counts.min() > 0.5 * len(answers) / len(options), (kind, counts)


def test_each_object_covers_exactly_one_patch():
    for row in shapes.samples(2, "test", 20):
        pixels = np.asarray(row.image()).astype(int)
        for obj in row.objects:
            y, x = obj.center_pixel
            assert tuple(pixels[y, x]) == shapes.COLORS[obj.color]
            cell = pixels[obj.row * shapes.CELL:(obj.row + 1) * shapes.CELL,
                          obj.col * shapes.CELL:(obj.col + 1) * shapes.CELL]
            floor = shapes.BACKGROUND_LEFT if obj.col < shapes.GRID // 2 else shapes.BACKGROUND_RIGHT
            painted = np.any(cell != floor, axis=-1).sum()
            assert painted == sum(b["area"] for b in blobs_from_pixels(row.image())
                                  if int(b["center"][0]) // shapes.CELL == obj.row
                                  and int(b["center"][1]) // shapes.CELL == obj.col)


def test_bad_arguments_name_the_valid_choices():
    with pytest.raises(ValueError, match="valid splits"):
        shapes.sample(0, "dev", 0)
    with pytest.raises(ValueError, match="valid kinds"):
        shapes.sample(0, "test", 0, kind="size")
    with pytest.raises(ValueError, match="valid sizes"):
        toy_model.toy_llava_config("huge")


# ---------------------------------------------------------------------------------- benchmark dir

def test_build_benchmark_writes_the_contract_format(tmp_path, capsys):
    from datasets import load_from_disk

    out = tmp_path / "benchmarks" / "toy"
    manifest = toy_cli.main(["build-benchmark", "--out", str(out), "--seed", "5", "--rows", "8"])
    assert manifest == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "toy" and manifest["rows"] == 8 and manifest["benchmark"] == "toy"
    expected = shapes.samples(5, "test", 8)
    assert manifest["checksum"] == shapes.checksum(expected)
    data = load_from_disk(str(out / "data"))
    assert data.column_names == ["id", "image", "question", "answers", "choices", "meta"]
    assert type(data.features["image"]).__name__ == "Image"
    for row, sample in zip(data, expected):
        assert row["id"] == sample.id and row["question"] == sample.question
        assert row["answers"] == [sample.answer] and row["choices"] == []
        assert json.loads(row["meta"])["kind"] == sample.kind
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(sample.image()))
        assert answer_from_pixels(row["question"], row["image"]) == row["answers"][0]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # no temp dirs left

    stamp = (out / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    toy_cli.main(["build-benchmark", "--out", str(out), "--seed", "5", "--rows", "8"])
    assert "up to date" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    toy_cli.main(["build-benchmark", "--out", str(out), "--seed", "5", "--rows", "9"])
    assert json.loads((out / "manifest.json").read_text())["rows"] == 9


def test_fetch_builds_the_same_benchmark_and_rejects_unknown_options(tmp_path):
    manifest = toy_benchmark.fetch(tmp_path / "toy", None, {"seed": 5, "rows": 8})
    assert manifest["checksum"] == shapes.checksum(shapes.samples(5, "test", 8))
    with pytest.raises(ValueError, match="valid options"):
        toy_benchmark.fetch(tmp_path / "x", None, {"sead": 5})


# ---------------------------------------------------------------------------------- model dir

def test_a_change_to_the_toy_code_rebuilds_the_model_and_reruns_its_rule(tmp_path, capsys, monkeypatch):
    """A model built by other toy code is never reused: its request carries the code's digest, and so do the
    Snakemake rule's params."""
    import ficoco.toy

    digest = ficoco.toy.model_code_digest()
    assert len(digest) == 16 and "code=model_code_digest()," in (REPO_ROOT / "workflow/rules/fetch.smk").read_text()
    out = tmp_path / "toy"
    toy_cli.main(["build-model", "--out", str(out), "--no-train", "--size", "small", "--seed", "3"])
    assert json.loads((out / "manifest.json").read_text())["request"]["code"] == digest
    capsys.readouterr()
    toy_cli.main(["build-model", "--out", str(out), "--no-train", "--size", "small", "--seed", "3"])
    assert "up to date" in capsys.readouterr().out
    # the same digest from edited source: one byte more in train.py
    source = {name: (Path(ficoco.toy.__file__).parent / name).read_bytes() for name in ficoco.toy.MODEL_MODULES}
    edited = tmp_path / "toy-source"
    edited.mkdir()
    for name, text in source.items():
        (edited / name).write_bytes(text + (b"#" if name == "train.py" else b""))
    monkeypatch.setattr(ficoco.toy, "__file__", str(edited / "__init__.py"))
    changed = ficoco.toy.model_code_digest()
    assert changed != digest
    monkeypatch.setattr(toy_cli, "model_code_digest", lambda: changed)
    toy_cli.main(["build-model", "--out", str(out), "--no-train", "--size", "small", "--seed", "3"])
    assert "up to date" not in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["request"]["code"] == changed


def test_built_model_and_processor_load_offline_and_generate(tmp_path, capsys):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "models" / "toy"
    toy_cli.main(["build-model", "--out", str(out), "--no-train", "--size", "small", "--seed", "3"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "toy" and manifest["id"] == "ficoco/toy-llava"
    assert manifest["revision"] == toy_cli._files_hash(out, manifest["files"])[:16]

    processor = AutoProcessor.from_pretrained(str(out))
    model = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    row = shapes.sample(0, "test", 1)
    inputs = processor(images=row.image(), text=toy_model.prompt_text(row.question), return_tensors="pt")
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image == (shapes.IMAGE_SIZE // shapes.CELL) ** 2 == 144
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert processor.tokenizer.unk_token_id not in inputs["input_ids"][0].tolist()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]

    built = toy_model.build_model(3, "small")                                 # same seed, same weights
    for (name, saved), fresh in zip(model.state_dict().items(), built.state_dict().values()):
        assert torch.equal(saved, fresh), name

    capsys.readouterr()
    toy_cli.main(["build-model", "--out", str(out), "--no-train", "--size", "small", "--seed", "3"])
    assert "up to date" in capsys.readouterr().out


def test_tokenizer_covers_every_question_and_answer_word():
    tokenizer = toy_model.build_tokenizer()
    for row in shapes.samples(0, "test", 40):
        for _, question, answer, _ in row.all_questions():
            ids = tokenizer(toy_model.prompt_text(question) + " " + answer)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(tokenizer(answer, add_special_tokens=False)["input_ids"]) == answer


def test_training_pixels_and_tokens_match_the_processor():
    processor = toy_model.build_processor()
    row = shapes.sample(0, "train", 4)
    expected = processor(images=row.image(), text=toy_model.prompt_text(row.question), return_tensors="pt")
    batch = toy_train.training_batch([row], processor)
    n_prompt = expected["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, :n_prompt], expected["input_ids"][0])
    assert torch.allclose(batch["pixel_values"], expected["pixel_values"], atol=1e-6)
    answer = processor.tokenizer(row.answer, add_special_tokens=False)["input_ids"]
    assert batch["labels"][0, n_prompt:].tolist() == answer + [processor.tokenizer.eos_token_id]
    assert (batch["labels"][0, :n_prompt] == -100).all()


def test_pixel_values_are_the_float32_arithmetic_exactly():
    """The looked-up normalisation equals (v · rescale − mean) / std computed in float32 per pixel, for
    arrays (what training passes) and PIL images alike; the arrays are the rendered images' pixels."""
    processor = toy_model.build_processor()
    ip = processor.image_processor
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8) for _ in range(3)]
    arrays[0][0, 0] = [0, 255, 128]
    plain = (np.stack(arrays).astype(np.float32) * np.float32(ip.rescale_factor)
             - np.asarray(ip.image_mean, np.float32)) / np.asarray(ip.image_std, np.float32)
    expected = torch.from_numpy(plain).permute(0, 3, 1, 2)
    assert torch.equal(toy_model.pixel_values(arrays, processor), expected)
    assert torch.equal(toy_model.pixel_values([PIL.Image.fromarray(a) for a in arrays], processor), expected)
    rows = [shapes.sample(0, "train", i) for i in range(6)]
    assert all(np.array_equal(a, np.asarray(r.image())) for a, r in zip(shapes.batch_pixels(rows), rows))
    with pytest.raises(ValueError, match="RGB uint8"):
        toy_model.pixel_values([arrays[0].astype(np.float32)], processor)


def test_a_shared_token_cache_builds_the_batches_a_fresh_tokenizer_builds():
    """Training reuses one `token_ids` cache for every step: later batches must not see earlier ones' lists."""
    processor = toy_model.build_processor()
    tokens = toy_train.token_ids(processor.tokenizer)
    for step in range(3):
        rows = [shapes.sample(0, "train", 8 * step + i) for i in range(8)]
        cached = toy_train.training_batch(rows, processor, turns=3, rng=np.random.default_rng(step), tokens=tokens)
        fresh = toy_train.training_batch(rows, processor, turns=3, rng=np.random.default_rng(step))
        for key in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(cached[key], fresh[key])
        assert cached["grounding"] == fresh["grounding"] and cached["asked"] == fresh["asked"]
        for row, ids in zip(rows, cached["input_ids"].tolist()):      # the first turn: the tokenizer's own ids
            prompt = toy_model.prompt_text(row.question).replace("<image>", "<image>" * shapes.GRID ** 2)
            expected = processor.tokenizer(prompt)["input_ids"]
            assert ids[:len(expected)] == expected
    assert tokens.cache_info().hits > 0


def test_attention_targets_point_at_the_asked_word_and_the_target_patches():
    """The training-only attention losses' targets, checked from the decoded tokens and the pixels."""
    processor = toy_model.build_processor()
    tokenizer = processor.tokenizer
    rows = [shapes.sample(0, "train", i) for i in range(8)]                   # every kind twice
    batch = toy_train.training_batch(rows, processor, turns=3, rng=np.random.default_rng(0))
    tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in batch["input_ids"].tolist()]
    asked = batch["asked"]
    assert len(asked) == 3 * len(rows)                                        # one per question
    for b, query, (word,) in asked:
        assert tokens[b][query - 1:query + 1] == ["assistant", ":"]
        assert tokens[b][word + 1] == "?" and "?" not in tokens[b][word + 2:query + 1]
        assert batch["labels"][b, query] == -100 and batch["labels"][b, query + 1] != -100   # next token: the answer
    first_turn = {b: min(q for row, q, _ in asked if row == b) for b in range(len(rows))}
    grounded = [(b, keys) for b, query, keys in batch["grounding"] if query == first_turn[b]]
    assert sorted(b for b, _ in grounded) == [b for b, row in enumerate(rows) if row.kind != "count"]
    for b, keys in grounded:
        row = rows[b]
        image_start = tokens[b].index("<image>")
        # the patch under each key must hold the blob of the object the answer is about (by pixels)
        pixels = np.asarray(row.image()).astype(int)
        for key in keys:
            patch = key - image_start
            cell = pixels[(patch // shapes.GRID) * shapes.CELL:(patch // shapes.GRID + 1) * shapes.CELL,
                          (patch % shapes.GRID) * shapes.CELL:(patch % shapes.GRID + 1) * shapes.CELL]
            colours = {tuple(c) for c in cell.reshape(-1, 3)} - {shapes.BACKGROUND_LEFT, shapes.BACKGROUND_RIGHT}
            assert len(colours) == 1
            if row.kind == "color":
                assert shapes.COLORS[row.answer] in colours
            elif row.kind == "shape":
                assert shapes.COLORS[row.question.split()[-2]] in colours
            else:                                                             # side of the patch = the answer
                assert ("left" if patch % shapes.GRID < shapes.GRID // 2 else "right") == row.answer


# ---------------------------------------------------------------------------------- training

def test_a_short_training_run_learns():
    """The small variant on single-object scenes: the loss falls and accuracy beats chance."""
    settings = toy_train.TrainSettings(seed=0, steps=160, batch_size=16, lr=2e-3, size="small",
                                       turns=2, curriculum=1e9)          # curriculum never adds distractors
    processor = toy_model.build_processor()
    model = toy_model.build_model(settings.seed, settings.size)
    result = toy_train.train(model, processor, settings, progress=False)
    losses = result["losses"]
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20])
    rows = [shapes.sample(99, "val", i, max_others=0) for i in range(40)]
    predictions = toy_train.generate_answers(model, processor, rows)
    # chance: 1/6 colour, 1/4 shape, 1/4 count, 1/2 side -> about 29% over the balanced kinds
    assert toy_train.accuracy(predictions, [r.answer for r in rows]) > 0.5


# ---------------------------------------------------------------------------------- module

def test_benchmark_module_prompt_score_aggregate():
    row = {"id": "a", "question": " what color is the circle ? ", "answers": ["red"], "choices": [],
           "meta": json.dumps({"kind": "color"})}
    assert toy_benchmark.name == "toy" and toy_benchmark.max_new_tokens >= 2
    assert toy_benchmark.prompt(row, {}) == "what color is the circle ?"
    assert toy_benchmark.score_sample(" Red. ", row)["score"] == 1.0
    assert toy_benchmark.score_sample("red circle", row)["score"] == 0.0
    assert toy_benchmark.score_sample("", row)["score"] == 0.0
    assert toy_benchmark.score_sample(None, row)["score"] is None
    count_row = dict(row, answers=["two"], meta=json.dumps({"kind": "count"}))
    records = [
        {"score": 1.0, "scoring": toy_benchmark.score_sample("red", row)},
        {"score": 0.0, "scoring": toy_benchmark.score_sample("blue", row)},
        {"score": 1.0, "scoring": toy_benchmark.score_sample("two", count_row)},
        {"score": None, "scoring": toy_benchmark.score_sample(None, row)},
    ]
    metrics = toy_benchmark.aggregate(records)
    assert metrics["score"] == pytest.approx(200 / 3)
    assert metrics["score_color"] == pytest.approx(50.0) and metrics["score_count"] == pytest.approx(100.0)
    assert metrics["failures"] == 1 and metrics["samples"] == 4


def test_random_keep_drops_image_rows_and_keeps_text():
    processor = toy_model.build_processor()
    model = toy_model.build_model(0, "small")
    row = shapes.sample(0, "test", 0)
    inputs = processor(images=row.image(), text=toy_model.prompt_text(row.question), return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embeds = toy_train._embeds_keeping_random_visual(model, inputs, 16, generator)
    assert embeds.shape[1] == inputs["input_ids"].shape[1] - 144 + 16
    text_positions = (inputs["input_ids"][0] != model.config.image_token_id).nonzero().squeeze(1)
    text_embeds = model.get_input_embeddings()(inputs["input_ids"])[0, text_positions]
    assert torch.equal(embeds[0, :1], text_embeds[:1])                      # <s> before the image
    assert torch.equal(embeds[0, -5:], text_embeds[-5:])                    # question tail after it
    with pytest.raises(ValueError, match="keep_visual"):
        toy_train._embeds_keeping_random_visual(model, inputs, 145, generator)

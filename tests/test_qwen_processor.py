"""The Qwen2-VL-family processor an evaluate job builds (ficoco/models/qwen_processor.py): the model directory's
image processor and tokenizer, images held to the nominal 1,280-token cap whatever the directory says, each prompt's
image token expanded to its image's placeholders, and the patch grids checked against `QwenVLDims`' own resize;
and an evaluate batch of images of several sizes, one call per span."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_tiny import QWEN_TOKENS, save_tiny_qwen
from PIL import Image

from ficoco.dims import dims_from_config
from ficoco.invariants import InvariantViolation
from ficoco.models.qwen_processor import QwenVLImageTextProcessor

PROMPT = "user : <|vision_start|><|image_pad|><|vision_end|> what color ? assistant :"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return Path(save_tiny_qwen(tmp_path_factory.mktemp("qwen") / "model", "qwen2_vl"))


def test_images_are_held_to_the_nominal_cap_whatever_the_directory_says(model_dir, tmp_path):
    # preprocessor_config.json as the hub's Qwen2-VL-7B-Instruct has it: min_pixels / max_pixels keys, and a
    # max_pixels that allows 16,384 tokens an image
    copy = Path(shutil.copytree(model_dir, tmp_path / "hub"))
    config = json.loads((copy / "preprocessor_config.json").read_text())
    config.pop("size", None)
    (copy / "preprocessor_config.json").write_text(json.dumps({**config, "min_pixels": 3136, "max_pixels": 12845056}))
    dims = dims_from_config(json.loads((copy / "config.json").read_text()))
    processor = QwenVLImageTextProcessor.from_pretrained(copy, dims)
    large = Image.fromarray(np.zeros((2000, 3000, 3), dtype=np.uint8))
    small = Image.fromarray(np.zeros((96, 96, 3), dtype=np.uint8))
    batch = processor(images=[large, small], text=[PROMPT, PROMPT], padding=True)
    tokens = batch["image_grid_thw"].prod(-1) // 4
    # 16 px per merged token: the large image resized to at most 1,003,520 px (3,920 tokens), the small one 6 x 6
    assert tokens.tolist() == [dims.image_tokens(2000, 3000), 36] and tokens[0] <= 3920 < 2000 * 3000 // 256
    image_id = processor.tokenizer.convert_tokens_to_ids(QWEN_TOKENS["image_token"])
    assert (batch["input_ids"] == image_id).sum(1).tolist() == tokens.tolist()
    assert batch["mm_token_type_ids"].tolist() == (batch["input_ids"] == image_id).int().tolist()


def test_a_grid_other_than_the_models_resize_fails_the_job(model_dir):
    """A transformers whose image processor no longer reads the `size` it is handed (a renamed keyword) would
    give other grids than the model's dimensions predict: the job fails rather than record other images."""
    dims = dims_from_config(json.loads((model_dir / "config.json").read_text()))
    processor = QwenVLImageTextProcessor.from_pretrained(model_dir, dims)
    inner = processor.image_processor

    class IgnoresSize:
        merge_size = inner.merge_size

        def __call__(self, images, size, return_tensors):
            return inner(images=images, size={"shortest_edge": 3136, "longest_edge": 12845056},
                         return_tensors=return_tensors)

    processor.image_processor = IgnoresSize()
    large = Image.fromarray(np.zeros((2000, 3000, 3), dtype=np.uint8))
    with pytest.raises(InvariantViolation) as raised:
        processor(images=[large], text=[PROMPT])
    capped = list(dims.patch_grid(2000, 3000))                            # 3,920 tokens at most: 8 px patches
    assert capped[0] * capped[1] // 4 <= 3920
    assert f"for images of (height, width) [(2000, 3000)]; the model's dimensions give [{capped}]" in str(raised.value)


def test_one_image_token_per_image(model_dir):
    dims = dims_from_config(json.loads((model_dir / "config.json").read_text()))
    processor = QwenVLImageTextProcessor.from_pretrained(model_dir, dims)
    image = Image.fromarray(np.zeros((96, 96, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="2 images for 1 image tokens"):
        processor(images=[image, image], text=[PROMPT])


def test_an_evaluate_batch_of_two_image_sizes_runs_in_one_call_per_span(model_dir, tmp_path):
    """On Qwen an LLM reduction runs a batch of one span: `Generator.records_for` hands the model one processor and
    generate call per span (a mixed batch would fail and be retried row by row), and every record is the one its
    row gets alone."""
    from datasets import load_from_disk

    import ficoco
    from ficoco import benchmarks
    from ficoco.evaluate import Generator, load_model
    from ficoco.toy.cli import build_benchmark

    build_benchmark(tmp_path / "bench", seed=3, rows=3)
    rows = [dict(row, _row=index) for index, row in enumerate(load_from_disk(str(tmp_path / "bench" / "data")))]
    rows[1]["image"] = rows[1]["image"].resize((128, 64))       # 96 x 96 scenes: 36 tokens; this one 4 x 8 = 32
    model, processor = load_model(model_dir, "cpu", "float32")
    dims = dims_from_config(model.config)
    handle = ficoco.apply(model, "fastv", 1960, layer=1)
    generator = Generator(model, processor, handle, benchmarks.get("toy-shapes"), {},
                          "USER: <image>\n{prompt} ASSISTANT:", "none", dims)
    calls = []
    generate = generator.generate
    generator.generate = lambda batch: calls.append([row["_row"] for row in batch]) or generate(batch)
    try:
        together = generator.records_for(rows)
        alone = [generator.records_for([row])[0] for row in rows]
    finally:
        handle.remove()
    assert calls[:2] == [[0, 2], [1]]                           # one call per span, in order of first appearance
    assert all(record["error"] is None for record in together)
    assert [record["counts"]["visual_delivered"] for record in together] == [36, 32, 36]
    assert [(r["prediction"], r["counts"]) for r in together] == [(r["prediction"], r["counts"]) for r in alone]

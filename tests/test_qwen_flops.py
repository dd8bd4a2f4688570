"""Qwen2-VL and Qwen2.5-VL, unreduced (issue 19, first part): the geometry of dynamic resolution and the
exact cost per sample, each against an independent computation.

- `QwenVLDims.resized` against transformers' own `smart_resize`, and `attention_spans` against its
  `get_vision_window_index`, over many image sizes;
- `flops.qwen_vl_vanilla_cost` against torch's FlopCounterMode on the forward (and `generate`) of tiny
  random models of both families built here, with eager attention so every product is counted: the
  tower, the merger and the LLM separately, and the global total, to the MAC;
- the published 7B tower against the Qwen2-VL paper's "675M" vision parameters.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from helpers_tiny import COUNTED_OPS
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # the PIL processor (no torchvision)
from transformers.vision_utils import get_vision_window_index

from ficoco import flops
from ficoco.qwen_dims import MAX_PIXELS, MIN_PIXELS, QwenVLDims, qwen_vl_dims

IMAGE, VISION_START, VISION_END, VIDEO = 100, 101, 102, 103
SIZES = [(1, 1), (27, 29), (56, 56), (100, 3000), (480, 640), (1000, 1000), (1080, 1920), (3000, 40), (4000, 3000)]


def tiny_qwen(model_type: str):
    """A random 2-layer Qwen2 LLM under a tiny tower: Qwen2-VL (2 full-attention blocks) or Qwen2.5-VL
    (3 blocks, the middle one full, the others in 16-pixel windows), patches of 4 px merged 2 × 2."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    torch.manual_seed(0)
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    geometry = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if model_type == "qwen2_vl":
        vision = dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, **geometry)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=3, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                      window_size=16, fullatt_block_indexes=[1], **geometry)
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    config = config_class(vision_config=vision, text_config=text, image_token_id=IMAGE,
                          vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, video_token_id=VIDEO)
    model = model_class(config).eval()
    model.set_attn_implementation("eager")          # CPU SDPA is not counted by FlopCounterMode
    return model, QwenVLDims.from_config(config)


def image_inputs(dims: QwenVLDims, image_size: tuple[int, int]) -> dict:
    """What the processor hands the model for one image: 3 text tokens, the image span, 4 text tokens."""
    grid = dims.patch_grid(*image_size)
    ids = torch.tensor([[5, 6, VISION_START] + [IMAGE] * dims.visual_tokens(*image_size) + [VISION_END, 7, 8, 9]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == IMAGE).int(),
            "pixel_values": torch.randn(grid[0] * grid[1], dims.patch_features),
            "image_grid_thw": torch.tensor([[1, *grid]])}


def parts(counter) -> dict:
    by_module = counter.get_flop_counts()

    def total(pattern: str) -> int:
        return sum(sum(ops.values()) for name, ops in by_module.items() if re.search(pattern, name))
    return {"ops": {str(op) for op in by_module["Global"]},
            "vision": total(r"\.visual$") - total(r"\.visual\.merger$"), "merger": total(r"\.visual\.merger$"),
            "prefill": total(r"language_model\.layers\.\d+\.(self_attn|mlp)$") + total(r"lm_head$"),
            "total": total(r"^Global$")}


@pytest.mark.parametrize("shape", ["qwen2-vl-7b", "qwen2.5-vl-7b"])
@pytest.mark.parametrize("image_size", SIZES)
def test_resizing_is_the_processors(shape, image_size):
    dims = qwen_vl_dims(shape)
    assert dims.resized(*image_size) == smart_resize(*image_size, factor=28, min_pixels=MIN_PIXELS,
                                                     max_pixels=MAX_PIXELS)
    rows, columns = dims.patch_grid(*image_size)
    assert dims.visual_tokens(*image_size) == rows * columns // 4 <= 1280


def test_an_impossible_image_is_refused_with_its_size():
    dims = qwen_vl_dims("qwen2-vl-7b")
    with pytest.raises(ValueError, match="image size 0x640: both sides must be at least 1 pixel"):
        dims.resized(0, 640)
    with pytest.raises(ValueError, match="image size 10x3000: the aspect ratio must be at most 200"):
        dims.resized(10, 3000)
    with pytest.raises(ValueError, match="valid Qwen shapes are"):
        qwen_vl_dims("qwen2-vl-72b")


@pytest.mark.parametrize("image_size", SIZES)
def test_window_spans_are_transformers_windows(image_size):
    dims = qwen_vl_dims("qwen2.5-vl-7b")
    grid = dims.patch_grid(*image_size)
    _, boundaries = get_vision_window_index(torch.tensor([[1, *grid]]), spatial_merge_size=2, window_size=112,
                                            patch_size=14)
    windows = sorted(torch.diff(boundaries).tolist())
    assert sorted(dims.attention_spans(grid, layer=0)) == windows
    assert dims.attention_spans(grid, layer=7) == [grid[0] * grid[1]]          # a full-attention block
    assert qwen_vl_dims("qwen2-vl-7b").attention_spans(grid, layer=0) == [grid[0] * grid[1]]


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_vanilla_forward_matches_exact_count(model_type):
    model, dims = tiny_qwen(model_type)
    image_size = (64, 120)                          # 16 × 30 patches, 120 visual tokens, uneven windows
    inputs = image_inputs(dims, image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs, logits_to_keep=1)
    measured = parts(counter)
    assert measured["ops"] <= COUNTED_OPS
    text_tokens = inputs["input_ids"].shape[1] - dims.visual_tokens(*image_size)
    cost = flops.qwen_vl_vanilla_cost(dims, image_size, text_tokens, generated_tokens=1)
    assert cost["visual_tokens"] == 120 and cost["vision_tokens"] == 480
    assert measured["vision"] == cost["vision_flops"]
    assert measured["merger"] == cost["projector_flops"]
    assert measured["prefill"] == cost["prefill_flops"]
    assert measured["total"] == cost["total_flops"] > 0
    if model_type == "qwen2_5_vl":                  # windows make the tower cheaper than full attention
        full = flops.qwen_vl_vanilla_cost(QwenVLDims(**{**dims.to_dict(), "window_size": 0}), image_size, text_tokens)
        assert cost["vision_macs"] < full["vision_macs"]


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_generate_matches_prefill_plus_decode(model_type):
    model, dims = tiny_qwen(model_type)
    image_size, new_tokens = (40, 56), 4
    inputs = image_inputs(dims, image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert output.shape[1] - inputs["input_ids"].shape[1] == new_tokens
    text_tokens = inputs["input_ids"].shape[1] - dims.visual_tokens(*image_size)
    cost = flops.qwen_vl_vanilla_cost(dims, image_size, text_tokens, generated_tokens=new_tokens)
    assert cost["decode_macs"] > 0 and parts(counter)["total"] == cost["total_flops"]


def test_the_published_qwen2_vl_tower_has_the_papers_675m_parameters():
    dims = qwen_vl_dims("qwen2-vl-7b")
    d, m, width = dims.vision_hidden, dims.vision_mlp, 4 * dims.vision_hidden
    weights = dims.patch_features * d + dims.vision_layers * (4 * d * d + 2 * d * m) + width * width + width * dims.llm_hidden
    assert weights == pytest.approx(675e6, rel=0.005)


def test_ficoco_flops_prints_a_qwen_images_cost_and_refuses_what_it_cannot_cost(tmp_path, capsys):
    from transformers import Qwen2VLConfig

    assert flops.main(["--shape", "qwen2-vl-7b", "--image-size", "1000", "1000", "--json"]) == 0
    cost, = json.loads(capsys.readouterr().out)
    assert cost["resized"] == [980, 980] and cost["visual_tokens"] == 1225
    expected = flops.qwen_vl_vanilla_cost(qwen_vl_dims("qwen2-vl-7b"), (1000, 1000))
    assert cost["total_flops"] == expected["total_flops"]
    # a config.json of the same shape gives the same dims
    config = Qwen2VLConfig(vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16),
                           text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert flops.dims_for(str(path), None) == qwen_vl_dims("qwen2-vl-7b")
    assert flops.main(["--shape", "qwen2-vl-7b"]) == 2
    assert "--image-size HEIGHT WIDTH: a Qwen2-VL image's cost depends on its size" in capsys.readouterr().err
    assert flops.main(["--shape", "qwen2.5-vl-7b", "--method", "ficoco-v", "--budgets", "600",
                       "--image-size", "800", "600"]) == 2
    assert "token reduction on Qwen2-VL and Qwen2.5-VL is not available yet" in capsys.readouterr().err

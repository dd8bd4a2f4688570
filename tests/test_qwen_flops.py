"""Qwen2-VL and Qwen2.5-VL, unreduced (issue 19, first part): the geometry of dynamic resolution and the
exact cost per sample, each against an independent computation.

- `QwenVLDims.resized` against transformers' own `smart_resize`, and `attention_spans` against its
  `get_vision_window_index`, over many image sizes;
- `flops.qwen_vl_vanilla_cost` against torch's FlopCounterMode on the forward (and `generate`) of tiny
  random models of both families (helpers_tiny.tiny_qwen), with eager attention so every product is counted: the
  tower, the merger and the LLM separately, and the global total, to the MAC;
- the published 7B tower against the Qwen2-VL paper's "675M" vision parameters.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from helpers_tiny import COUNTED_OPS, qwen_inputs, tiny_qwen
from torch.utils.flop_counter import FlopCounterMode
# the PIL processor's copy (the torchvision one needs torchvision)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.vision_utils import get_vision_window_index

from ficoco import flops
from ficoco.qwen_dims import MAX_PIXELS, MIN_PIXELS, QwenVLDims, qwen_vl_dims

SIZES = [(1, 1), (27, 29), (56, 56), (100, 3000), (480, 640), (1000, 1000), (1080, 1920), (3000, 40), (4000, 3000)]


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
    assert dims.image_tokens(*image_size) == rows * columns // 4 <= 1280


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
    model, dims = tiny_qwen(model_type, patch_size=4, window_size=16, llm_layers=2)
    image_size = (64, 120)                          # 16 × 30 patches, 120 visual tokens, uneven windows
    inputs = qwen_inputs(dims, [image_size])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs, logits_to_keep=1)
    measured = parts(counter)
    assert measured["ops"] <= COUNTED_OPS
    text_tokens = inputs["input_ids"].shape[1] - dims.image_tokens(*image_size)
    cost = flops.qwen_vl_sample_cost(dims, image_size, text_tokens, generated_tokens=1)
    assert cost["visual_tokens"] == 120 and cost["vision_tokens"] == 480
    assert measured["vision"] == cost["vision_flops"]
    assert measured["merger"] == cost["projector_flops"]
    assert measured["prefill"] == cost["prefill_flops"]
    assert measured["total"] == cost["total_flops"] > 0
    if model_type == "qwen2_5_vl":                  # windows make the tower cheaper than full attention
        full = flops.qwen_vl_sample_cost(QwenVLDims(**{**dims.to_dict(), "window_size": 0}), image_size, text_tokens)
        assert cost["vision_macs"] < full["vision_macs"]


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_generate_matches_prefill_plus_decode(model_type):
    model, dims = tiny_qwen(model_type, patch_size=4, window_size=16, llm_layers=2)
    image_size, new_tokens = (40, 56), 4
    inputs = qwen_inputs(dims, [image_size])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert output.shape[1] - inputs["input_ids"].shape[1] == new_tokens
    text_tokens = inputs["input_ids"].shape[1] - dims.image_tokens(*image_size)
    cost = flops.qwen_vl_sample_cost(dims, image_size, text_tokens, generated_tokens=new_tokens)
    assert cost["decode_macs"] > 0 and parts(counter)["total"] == cost["total_flops"]


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("name, overrides", [("fastv", {"layer": 1}), ("pdrop", {"boundaries": [0, 1]}),
                                             ("divprune", {"positions": "original"})])
def test_a_reduced_forward_matches_its_planned_cost(model_type, name, overrides):
    import ficoco

    model, dims = tiny_qwen(model_type, patch_size=4, window_size=16, llm_layers=2)
    image_size, budget = (64, 120), 8000                     # 120 of the nominal 15,680 tokens: 61 on average
    inputs = qwen_inputs(dims, [image_size])
    with ficoco.apply(model, name, budget, **overrides) as handle, torch.no_grad(), \
            FlopCounterMode(display=False) as counter:
        model(**inputs, logits_to_keep=1)
    counts, = handle.last_counts()
    measured = parts(counter)
    text_tokens = inputs["input_ids"].shape[1] - dims.image_tokens(*image_size)
    planned = flops.qwen_vl_planned_cost(dims, name, budget, image_size, text_tokens, **overrides)
    assert planned["visual_tokens_layer_average"] == sum(counts["llm_visual"]) / 2 < 120
    assert measured["vision"] == planned["vision_flops"] and measured["merger"] == planned["projector_flops"]
    assert measured["prefill"] == planned["prefill_flops"]          # the scores' products run outside the layers
    assert measured["total"] == planned["total_flops"] + 2 * counts["overhead_macs"]


def test_the_published_qwen2_vl_tower_has_the_papers_675m_parameters():
    dims = qwen_vl_dims("qwen2-vl-7b")
    d, m, width = dims.vision_hidden, dims.vision_mlp, 4 * dims.vision_hidden
    merger = width * width + width * dims.llm_hidden
    weights = dims.patch_features * d + dims.vision_layers * (4 * d * d + 2 * d * m) + merger
    assert weights == pytest.approx(675e6, rel=0.005)


def test_ficoco_flops_prints_a_qwen_images_cost_and_refuses_what_it_cannot_cost(tmp_path, capsys):
    from transformers import Qwen2VLConfig

    assert flops.main(["--shape", "qwen2-vl-7b", "--image-size", "1000", "1000", "--json"]) == 0
    cost, = json.loads(capsys.readouterr().out)
    assert cost["resized"] == [980, 980] and cost["visual_tokens"] == 1225
    expected = flops.qwen_vl_sample_cost(qwen_vl_dims("qwen2-vl-7b"), (1000, 1000))
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
    assert "ficoco-v cannot run on qwen2_5_vl: it needs a CLS token first" in capsys.readouterr().err
    assert flops.main(["--shape", "qwen2-vl-7b", "--method", "fastv", "--budgets", "600", "400", "--image-size",
                       "1000", "1000", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["method"], row["budget"]) for row in rows] == [("vanilla", None), ("fastv", 600), ("fastv", 400)]
    # 1,225 of the nominal 1,280 tokens: the image keeps the budget's fraction, 600·1225/1280 = 574.2 and 382.8
    averages = [row["visual_tokens_layer_average"] for row in rows]
    assert averages[0] == 1225 and 573 <= averages[1] <= 574 and 382 <= averages[2] <= 383


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("name, overrides", [("fastv", {"layer": 1}),
                                             ("ficoco-v", {"semantic": "key-mean", "start": 0, "k": 0})])
def test_the_cost_of_a_runs_counts_is_the_counted_cost_of_its_generate(model_type, name, overrides):
    """What the pipeline records: `flops.sample_cost` of each row's counts (its image's patch grid from the
    tower's call inside `generate`; for a reduction inside the tower, the patches and attention pairs each
    block ran on, windows included) sums to FlopCounterMode's count of the batch's `generate`."""
    import ficoco

    model, dims = tiny_qwen(model_type, patch_size=4, window_size=16, llm_layers=2)
    image_size, budget, new_tokens = (40, 56), 8000, 3
    inputs = qwen_inputs(dims, [image_size, image_size])
    with ficoco.apply(model, name, budget, **overrides) as handle, torch.no_grad(), \
            FlopCounterMode(display=False) as counter:
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    rows = handle.last_counts()
    assert [row["vision_grids"] for row in rows] == [[list(dims.patch_grid(*image_size))]] * 2
    costs = [flops.sample_cost(dims, row, new_tokens) for row in rows]
    if name == "fastv":
        assert all(row["llm_visual"][1] < row["llm_visual"][0] for row in rows)
    else:                                                  # fewer patches from the reducing block's MLP on
        assert all(row["vision"][-1][1] < row["vision"][0][0] and row["visual_delivered"] < 35 for row in rows)
    assert parts(counter)["total"] == sum(cost["total_flops"] + 2 * row["overhead_macs"]
                                          for cost, row in zip(costs, rows))
    # the grids must account for the visual tokens delivered
    wrong = {**rows[0], "vision_grids": [[rows[0]["vision_grids"][0][0], 2]]}
    with pytest.raises(ValueError, match="the first on every patch of the grids"):
        flops.sample_cost(dims, wrong, new_tokens)


def test_the_hubs_qwen2_vl_7b_config_json_gives_the_published_shape(tmp_path):
    """config.json as Qwen/Qwen2-VL-7B-Instruct publishes it (transformers 4.41's layout: the LLM's keys at the top,
    mrope in rope_scaling), which a fetched model directory holds: the dims config validation and FLOPs read."""
    published = {
        "architectures": ["Qwen2VLForConditionalGeneration"], "bos_token_id": 151643, "eos_token_id": 151645,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
        "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
        "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
        "model_type": "qwen2_vl", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(published))
    assert flops.dims_for(str(path), None) == qwen_vl_dims("qwen2-vl-7b")

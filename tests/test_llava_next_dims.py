"""LLaVA-NeXT's AnyRes layout and exact FLOPs (issue 18, item 3), against transformers and FlopCounterMode.

- `best_canvas` against transformers' `select_best_resolution`, and `ModelDims.anyres_layout` against
  what a tiny random `LlavaNextForConditionalGeneration` actually packs (`get_image_features`: the
  span each image hands the LLM) and how many tower passes it runs (`image_size_to_num_patches`),
  over many image sizes;
- the exact cost of an unreduced sample (`flops.vanilla_counts(..., image_size)`, `sample_cost`)
  against FlopCounterMode on that model's forward, for a square, a wide and a tall image;
- the paper's nominal LLaVA-NeXT-7B labels (v4 Table 2: 42.7 → 5.0 / 2.9 TFLOPs).
"""
from __future__ import annotations

import json
import random

import pytest
import torch
from helpers_tiny import COUNTED_OPS, IMAGE, TINY_NEXT_PINPOINTS, counted, tiny_llava_next
from torch.utils.flop_counter import FlopCounterMode

from ficoco import flops
from ficoco.dims import LLAVA_NEXT_PINPOINTS, ModelDims, best_canvas, llava_1_5_dims, llava_next_dims

def random_sizes(count: int, largest: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = [(rng.randint(1, largest), rng.randint(1, largest)) for _ in range(count)]
    return sizes + [(largest, largest), (1, largest), (largest, 1), (7, 7)]


def test_best_canvas_is_transformers_select_best_resolution():
    from transformers.image_processing_utils import select_best_resolution

    for canvases, largest in ((LLAVA_NEXT_PINPOINTS, 3000), (tuple(map(tuple, TINY_NEXT_PINPOINTS)), 200)):
        for size in random_sizes(3000, largest, seed=len(canvases) + largest):
            assert best_canvas(size, canvases) == tuple(select_best_resolution(size, [list(c) for c in canvases]))


def test_anyres_layout_is_what_the_model_packs():
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model, dims = tiny_llava_next()
    checked = set()
    for height, width in random_sizes(150, 200, seed=3):
        layout = dims.anyres_layout(height, width)
        passes = image_size_to_num_patches((height, width), TINY_NEXT_PINPOINTS, 28)
        assert layout.tower_passes == passes
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=torch.zeros(1, passes, 3, 28, 28), image_sizes=torch.tensor([[height, width]]),
                vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output
        assert features[0].shape[0] == layout.delivered, (height, width, layout)
        checked.add((layout.crop_grid, layout.feature_grid))
    assert len(checked) > 8                         # many canvases and unpadded grids, not one case


def test_llava_next_7b_layouts():
    dims = llava_next_dims("7b")
    square = dims.anyres_layout(672, 672)
    assert (square.tower_passes, square.projector_tokens, square.delivered) == (5, 2880, 576 + 48 * 48 + 48)
    wide = dims.anyres_layout(480, 640)              # fits 672x672 as 504x672: 36 of 48 patch rows remain
    assert wide.crop_grid == (2, 2) and wide.feature_grid == (36, 48) and wide.delivered == 576 + 36 * 48 + 36
    with pytest.raises(ValueError, match="one crop per image"):
        llava_1_5_dims("7b").anyres_layout(336, 336)
    with pytest.raises(ValueError, match="at least 1 pixel"):
        dims.anyres_layout(0, 336)


def test_from_config_reads_llava_next_and_refuses_other_types():
    model, dims = tiny_llava_next()
    assert dims.image_grid_pinpoints == tuple(map(tuple, TINY_NEXT_PINPOINTS))
    assert ModelDims.from_config(model.config.to_dict()) == dims
    one_crop = llava_1_5_dims("7b")
    assert one_crop.image_grid_pinpoints == ()
    with pytest.raises(ValueError, match="model_type 'qwen2_vl': ModelDims reads llava, llava_next"):
        ModelDims.from_config({"model_type": "qwen2_vl"})
    broken = model.config.to_dict() | {"image_grid_pinpoints": [[28, 50]]}
    with pytest.raises(ValueError, match=r"\[\(28, 50\)\]: every canvas side must be a multiple of .* 28"):
        ModelDims.from_config(broken)


@pytest.mark.parametrize("image_size", [(56, 56), (30, 80), (90, 25)])
def test_unreduced_forward_matches_the_exact_count(image_size):
    model, dims = tiny_llava_next()
    layout = dims.anyres_layout(*image_size)
    before, after = [1, 10, 11], [12, 13]
    ids = torch.tensor([before + [IMAGE] * layout.delivered + after])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), image_sizes=torch.tensor([image_size]),
              pixel_values=torch.randn(1, layout.tower_passes, 3, 28, 28), logits_to_keep=1)
    measured = counted(counter)
    assert measured["ops"] <= COUNTED_OPS

    counts = flops.vanilla_counts(dims, text_tokens=len(before + after), image_size=image_size)
    assert counts["vision_crops"] == layout.tower_passes and counts["llm"][0] == ids.shape[1]
    counts["vision"] = [[17, 17]] * dims.vision_layers * layout.tower_passes   # HF runs every CLIP layer (4 of 4)
    cost = flops.sample_cost(dims, counts, generated_tokens=1, logits_positions=1)
    for part in ("vision", "projector", "prefill"):
        assert measured[part] == cost[f"{part}_flops"], part        # every product is counted: exactly equal
    assert measured["total"] == cost["total_flops"]
    assert cost["vision_crops"] == layout.tower_passes


def test_vanilla_counts_need_the_image_size_exactly_when_it_matters():
    with pytest.raises(ValueError, match="depends on its \\(height, width\\)"):
        flops.vanilla_counts(llava_next_dims("7b"))
    with pytest.raises(ValueError, match="costs the same for every image size"):
        flops.vanilla_counts(llava_1_5_dims("7b"), image_size=(336, 336))
    with pytest.raises(ValueError, match="vision_crops.*divides the 23"):
        flops.sample_cost(llava_1_5_dims("7b"), {**flops.vanilla_counts(llava_1_5_dims("7b")), "vision_crops": 2},
                          generated_tokens=1)


def test_the_papers_llava_next_labels_are_nominal_counts():
    """v4 Table 2 prints 42.7 (vanilla), 5.0 (PDrop) and 2.9 TFLOPs (FiCoCo, SparseVLM) for LLaVA-NeXT-7B:
    the LLM-Viewer count of 2,880 visual tokens (5 passes x 576, before unpadding), 320 and 160, with the
    text length of LLaVA-1.5's labels (60): 42.6, 5.0, 2.9. With 64 text tokens 42.7 and 2.9 (5.1)."""
    dims = llava_next_dims("7b")
    assert [round(flops.nominal_tflops(dims, visual, 60), 1) for visual in (2880, 320, 160)] == [42.6, 5.0, 2.9]
    assert [round(flops.nominal_tflops(dims, visual, 64), 1) for visual in (2880, 160)] == [42.7, 2.9]


def test_the_nominal_image_of_llava_next_is_every_pass_of_its_largest_canvas():
    """`visual_tokens` (budget bounds, the label "full", nominal FLOPs) counts as the paper's labels do."""
    assert (llava_next_dims("7b").max_tower_passes, llava_next_dims("7b").visual_tokens) == (5, 2880)
    assert (llava_1_5_dims("7b").max_tower_passes, llava_1_5_dims("7b").visual_tokens) == (1, 576)
    assert round(flops.nominal_tflops(llava_next_dims("7b"), llava_next_dims("7b").visual_tokens), 1) == 42.6


def test_image_layout_of_llava_next_is_its_largest_canvas():
    """Methods without a multi-crop site are refused on LLaVA-NeXT before any job (issue 18 item 1)."""
    from ficoco import methods

    layout = llava_next_dims("7b").image_layout()
    assert len(layout.crops) == 5 and layout.layout_tokens == 48
    assert layout.visual_tokens == 5 * 576 + 48                     # 2x2 crops unpadded nowhere: the most tokens
    # every registered method runs on LLaVA-NeXT: FitPrune's fitted schedule is scaled to each span
    assert all(methods.get(name).unmet_needs(llava_next_dims("7b")) == [] for name in methods.names())
    assert methods.get("fitprune").unmet_needs(llava_1_5_dims("7b")) == []


def test_flops_command_prints_a_llava_next_image_cost(capsys):
    assert flops.main(["--shape", "llava-next-7b", "--image-size", "480", "640", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    expected = flops.sample_cost(llava_next_dims("7b"), flops.vanilla_counts(llava_next_dims("7b"), 60, (480, 640)), 1)
    assert row["visual_tokens_delivered"] == 2340 and row["total_flops"] == expected["total_flops"]
    assert row["vision_crops"] == 5 and row["projector_macs"] == expected["projector_macs"]
    assert flops.main(["--shape", "llava-next-7b"]) == 2
    assert "depends on its (height, width)" in capsys.readouterr().err
    # an LLM method: the 2,340-token span keeps 320 / 2,880 of itself, 260 on average over the layers
    assert flops.main(["--shape", "llava-next-7b", "--image-size", "480", "640", "--method", "fastv",
                       "--budgets", "320", "--json"]) == 0
    vanilla, fastv = json.loads(capsys.readouterr().out)
    assert fastv["visual_tokens_delivered"] == 2340 and fastv["visual_tokens_layer_average"] <= 260
    assert fastv["vision_flops"] == vanilla["vision_flops"] and fastv["prefill_flops"] < vanilla["prefill_flops"] / 5
    assert flops.main(["--shape", "llava-next-7b", "--image-size", "336", "336", "--method", "fitprune",
                       "--budgets", "160"]) == 2
    assert "fitprune: needs its fitted deletion schedule (parameter `deletions`, one count per LLM layer, fitted for " \
           "the nominal 2880-token image)" in capsys.readouterr().err
    assert flops.main(["--shape", "llava-1.5-7b", "--image-size", "336", "336"]) == 2
    assert "costs the same for every image size" in capsys.readouterr().err

"""The Qwen2-VL adapter (issue 19) on tiny random Qwen2-VL and Qwen2.5-VL models: unreduced and with the
reductions inside the LLM, whose kept tokens keep their 3-D M-RoPE positions.

- vanilla through the adapter is the model itself, bit for bit, and `remove()` restores it exactly;
- each method keeps, layer by layer, what its plan for the image's span says (the budget's kept fraction
  of the nominal 1,280-token image), on images of two sizes;
- cached generation, and a plain forward decode step (whose positions the model derives from the cache
  length), equal the unmodified model re-run on the whole sequence without a cache with the dropped
  tokens hidden as keys from their layer on, PDrop from layer 0 included;
- a batch of two images of one size equals each alone; images of two sizes in one batch are refused;
- methods this adapter cannot place are refused by name before anything runs.
"""
from __future__ import annotations

import pytest
import torch
from helpers_tiny import IMAGE, masked_forward, qwen_inputs, tiny_qwen

import ficoco
from ficoco import methods
from ficoco.budget import span_budget
from transformers import DynamicCache

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
SIZES = [(112, 224), (224, 224)]                      # 8 × 16 and 16 × 16 patches: 32 and 64 visual tokens
BUDGET = 640                                          # of the nominal 1,280 tokens: half of every image
CASES = [("fastv", {"layer": 1}), ("dart", {"layer": 1}), ("pdrop", {"boundaries": [1, 2, 3]}),
         ("pdrop", {"boundaries": [0, 2]}),                                     # the cache is reduced from layer 0
         ("ficoco-l", {"start": 0, "window": 2}), ("sparsevlm", {"layers": [0, 2], "keeps": [8, 4]}),
         ("divprune", {"positions": "original"})]                             # at the input of layer 0
MASKABLE = [case for case in CASES if case[0] not in ("ficoco-l", "sparsevlm")]   # no recycling merge


@pytest.fixture(scope="module", params=FAMILIES)
def model_and_dims(request):
    return tiny_qwen(request.param, attention="sdpa")


def logits_of(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_vanilla_is_the_model_and_remove_restores_it(model_and_dims):
    model, dims = model_and_dims
    inputs = qwen_inputs(dims, [SIZES[1]])
    before = logits_of(model, inputs)
    with ficoco.apply(model, "vanilla") as handle:
        assert torch.equal(logits_of(model, inputs), before)
        counts, = handle.last_counts()
    assert counts["vision"] == [[256, 256]] * dims.vision_layers and counts["visual_delivered"] == 64
    assert counts["llm"] == [inputs["input_ids"].shape[1]] * dims.llm_layers and counts["llm_visual"] == [64] * 4
    handle = ficoco.apply(model, "fastv", BUDGET, layer=1)
    assert not torch.equal(logits_of(model, inputs), before)
    handle.remove()
    assert torch.equal(logits_of(model, inputs), before)


def test_ficoco_v_at_every_token_is_the_unpatched_tower(model_and_dims):
    """A budget of every nominal token discards nothing: no reducing block, the model's own logits, the unreduced
    counts and no selection work counted (a step of zero discards would run the explicit attention and count it)."""
    model, dims = model_and_dims
    inputs = qwen_inputs(dims, [SIZES[1]])
    before = logits_of(model, inputs)
    with ficoco.apply(model, "vanilla") as handle:
        model(**inputs)
        [unreduced] = handle.last_counts()
    with ficoco.apply(model, "ficoco-v", dims.visual_tokens, semantic="key-mean", start=0) as handle:
        assert handle.vision_step is None and torch.equal(logits_of(model, inputs), before)
        [counts] = handle.last_counts()
    assert counts == unreduced and counts["overhead_macs"] == 0


@pytest.mark.parametrize("name, overrides", CASES)
@pytest.mark.parametrize("image_size", SIZES)
def test_each_image_keeps_its_plans_tokens_layer_by_layer(model_and_dims, name, overrides, image_size):
    model, dims = model_and_dims
    inputs = qwen_inputs(dims, [image_size])
    span = dims.image_tokens(*image_size)
    with ficoco.apply(model, name, BUDGET, **overrides) as handle:
        logits_of(model, inputs)
        counts, = handle.last_counts()
        plan, = handle.row_plans()
    # the plan of this image alone, from the method's own planner at the budget's share of its span
    alone = methods.get(name).plan(dims.for_image_span(span),
                                   span_budget(BUDGET, span, 1280), **overrides)
    assert counts["llm_visual"] == list(alone.llm_visual) == list(plan.llm_visual)
    assert counts["llm_visual"][0] <= span and sum(counts["llm_visual"]) / 4 <= span_budget(BUDGET, span, 1280)
    assert counts["llm"] == [inputs["input_ids"].shape[1] - span + visual for visual in counts["llm_visual"]]


@pytest.mark.parametrize("name, overrides", [("pdrop", {"boundaries": [0, 2]}), ("pdrop", {"boundaries": [0, 1, 2]}),
                                             ("ficoco-l", {"start": 0, "window": 1})])
def test_a_count_for_every_image_keeps_that_many_or_the_whole_smaller_image(model_and_dims, name, overrides):
    """ImageTokens(48) (reachable on the nominal 1,280-token image from layer 0): the 64-token image keeps 48 a
    layer on average, as the method plans 48 of 64 tokens; the 32-token image has fewer and keeps every token in
    every layer (the fraction form would halve both)."""
    model, dims = model_and_dims
    for image_size, span in zip(SIZES, (32, 64)):
        inputs = qwen_inputs(dims, [image_size])
        with ficoco.apply(model, name, ficoco.ImageTokens(48), **overrides) as handle:
            logits_of(model, inputs)
            counts, = handle.last_counts()
            plan, = handle.row_plans()
        assert counts["llm_visual"] == list(plan.llm_visual)
        if span == 32:
            assert counts["llm_visual"] == [32] * 4
        else:
            alone = methods.get(name).plan(dims.for_image_span(64), 48, **overrides)
            assert counts["llm_visual"] == list(alone.llm_visual) and sum(counts["llm_visual"]) / 4 <= 48
            assert counts["llm_visual"][-1] < 64


def test_a_count_for_every_image_is_refused_on_llava():
    from helpers_tiny import tiny_llava

    model = tiny_llava()
    with pytest.raises(ValueError, match="budget n48 .48 tokens an image. runs on Qwen2-VL-family models"):
        ficoco.apply(model, "fastv", ficoco.ImageTokens(48))


def hidden_from(trace, ids):
    """Dropped image positions per reducing layer, from the kept positions the handle traced."""
    dropped, alive = {}, {p for p in range(ids.shape[1]) if ids[0, p] == IMAGE}
    for layer in sorted(trace):
        kept = set(trace[layer][0].tolist())
        dropped[layer], alive = alive - kept, kept
    return dropped


def recompute(model, ids, inputs, dropped):
    extra = {key: inputs[key] for key in ("image_grid_thw",)}
    logits, _, _ = masked_forward(model, ids, inputs["pixel_values"], hidden_from=dropped,
                                  mm_token_type_ids=(ids == IMAGE).int(), **extra)
    return logits


@pytest.mark.parametrize("name, overrides", MASKABLE)
def test_cached_decoding_equals_a_full_recompute_that_hides_the_dropped_tokens(model_and_dims, name, overrides):
    model, dims = model_and_dims
    inputs = qwen_inputs(dims, [SIZES[0]])
    ids = inputs["input_ids"]
    with ficoco.apply(model, name, BUDGET, **overrides) as handle:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
            trace = handle.last_trace()["llm"]
            # a plain decode step: the model numbers its positions from the cache (layer 0's length)
            first = model(**inputs, cache=DynamicCache(config=model.config))
            step = model(input_ids=first.logits[:, -1:].argmax(-1), cache=first.cache)
            with pytest.raises(ValueError, match=f"{name}: a decode step on a KV cache whose prefill this handle "
                                                 f"did not see"):
                unseen = model(**inputs, use_cache=True).cache             # the model made this cache itself
                model(input_ids=first.logits[:, -1:].argmax(-1), cache=unseen)
    assert trace, "the method reduced nothing"
    dropped = hidden_from(trace, ids)
    sequence = out.sequences[0]
    for index, step_logits in enumerate(out.logits):
        prefix = sequence[: ids.shape[1] + index][None]
        expected = recompute(model, prefix, inputs, dropped)[-1]
        torch.testing.assert_close(step_logits[0], expected, rtol=1e-4, atol=1e-5)
    prefix = torch.cat([ids, first.logits[:, -1:].argmax(-1)], dim=1)
    torch.testing.assert_close(step.logits[0, -1], recompute(model, prefix, inputs, dropped)[-1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, overrides", CASES)
def test_a_batch_of_two_images_of_one_size_equals_each_alone(model_and_dims, name, overrides):
    model, dims = model_and_dims
    batch = qwen_inputs(dims, [SIZES[0], SIZES[0]], seed=3)                    # two different random images
    patches = batch["pixel_values"].shape[0] // 2
    first = qwen_inputs(dims, [SIZES[0]], seed=3)
    rows = [first, {**first, "pixel_values": batch["pixel_values"][patches:]}]
    alone, alone_counts = [], []
    with ficoco.apply(model, name, BUDGET, **overrides) as handle:
        together = logits_of(model, batch)
        counts = handle.last_counts()
        for row in rows:
            alone.append(logits_of(model, row))
            alone_counts.append(handle.last_counts()[0])
    assert not torch.equal(alone[0], alone[1])
    for row in range(2):
        torch.testing.assert_close(together[row], alone[row][0], rtol=1e-5, atol=1e-6)
        assert counts[row] == alone_counts[row]
    # and through generate, whose decode steps number each row's positions with its own rope_deltas
    with ficoco.apply(model, name, BUDGET, **overrides), torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        generated_alone = [model.generate(**row, max_new_tokens=3, min_new_tokens=3, do_sample=False) for row in rows]
    assert all(torch.equal(generated[row], generated_alone[row][0]) for row in range(2))


def left_padded(rows: list[dict]) -> dict:
    """Rows of `qwen_inputs` (one image each, of different sizes) as one left-padded batch, as the processor pads."""
    length = max(row["input_ids"].shape[1] for row in rows)

    def pad(tensor, value):
        return torch.cat([torch.full((1, length - tensor.shape[1]), value, dtype=tensor.dtype), tensor], dim=1)
    return {"input_ids": torch.cat([pad(row["input_ids"], 0) for row in rows]),
            "attention_mask": torch.cat([pad(row["attention_mask"], 0) for row in rows]),
            "mm_token_type_ids": torch.cat([pad(row["mm_token_type_ids"], 0) for row in rows]),
            "pixel_values": torch.cat([row["pixel_values"] for row in rows]),
            "image_grid_thw": torch.cat([row["image_grid_thw"] for row in rows])}


@pytest.mark.parametrize("name, overrides", [("pdrop", {"boundaries": [0, 2]}), ("divprune", {"positions": "original"})])
def test_a_plain_decode_step_of_a_left_padded_batch_is_positioned_as_generate_does(model_and_dims, name, overrides):
    """A cache reduced from layer 0, a left-padded batch, a plain decode step without position ids: each row's new
    token sits where the unreduced model puts it (its padding left out, as `generate` numbers it)."""
    model, dims = model_and_dims
    rows = [qwen_inputs(dims, [SIZES[0]], seed=4, after=(9, 10, 11, 12, 13, 14, 15)),
            qwen_inputs(dims, [SIZES[0]], seed=5, after=(9, 10))]
    inputs = left_padded(rows)
    with ficoco.apply(model, name, BUDGET, **overrides), torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
        first = model(**inputs, cache=DynamicCache(config=model.config))
        token = first.logits[:, -1:].argmax(-1)
        step = model(input_ids=token, attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1),
                     cache=first.cache)
    assert torch.equal(token[:, 0], generated.sequences[:, inputs["input_ids"].shape[1]])
    torch.testing.assert_close(step.logits[:, -1], generated.logits[1], rtol=1e-5, atol=1e-5)


def test_several_images_in_one_prompt_are_costed_as_one_tower_pass_of_them_all(model_and_dims):
    """Qwen's tower runs a prompt's images in one call (attention within each image): the counts carry no
    `vision_crops`, and the vision cost is the sum of each image's alone (3 images on 3 blocks included, which the
    per-image passes of the LLaVA family would not divide)."""
    from helpers_tiny import QWEN_VISION_END, QWEN_VISION_START

    from ficoco.flops import sample_cost

    model, dims = model_and_dims

    def prompt_with(sizes, seed=1):
        generator = torch.Generator().manual_seed(seed)
        ids, pixels, grids = [7, 8], [], []
        for height, width in sizes:
            grid = dims.patch_grid(height, width)
            ids += [QWEN_VISION_START] + [IMAGE] * dims.image_tokens(height, width) + [QWEN_VISION_END, 9]
            pixels.append(torch.randn(grid[0] * grid[1], dims.patch_features, generator=generator))
            grids.append([1, *grid])
        ids = torch.tensor([ids + [10, 11]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == IMAGE).int(),
                "pixel_values": torch.cat(pixels), "image_grid_thw": torch.tensor(grids)}

    def vision_flops(sizes):
        with ficoco.apply(model, "vanilla") as handle, torch.no_grad():
            model(**prompt_with(sizes))
            [counts] = handle.last_counts()
        return counts, sample_cost(dims, counts, 1)["vision_flops"]

    sizes = [(112, 112), (112, 224), (224, 224)]
    counts, together = vision_flops(sizes)
    assert "vision_crops" not in counts and len(counts["vision"]) == dims.vision_layers
    assert together == pytest.approx(sum(vision_flops([size])[1] for size in sizes), rel=1e-12)


def test_a_left_padded_batch_of_two_image_sizes_equals_each_alone_unreduced(model_and_dims):
    """Images of 32 and 64 tokens in one left-padded batch: each row generates and counts what it does alone (its
    own M-RoPE positions, padding excluded from its counts)."""
    model, dims = model_and_dims
    rows = [qwen_inputs(dims, [SIZES[0]], seed=4), qwen_inputs(dims, [SIZES[1]], seed=5)]
    batch = left_padded(rows)
    with ficoco.apply(model, "vanilla") as handle, torch.no_grad():
        together = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        counts = handle.last_counts()
        alone, alone_counts = [], []
        for row in rows:
            alone.append(model.generate(**row, max_new_tokens=3, min_new_tokens=3, do_sample=False))
            alone_counts.append(handle.last_counts()[0])
    length = batch["input_ids"].shape[1]
    for row in range(2):
        assert together[row, length:].tolist() == alone[row][0, rows[row]["input_ids"].shape[1]:].tolist()
    assert counts == alone_counts and [row["visual_delivered"] for row in counts] == [32, 64]


def test_images_of_two_sizes_in_one_batch_are_refused_for_an_llm_reduction(model_and_dims):
    model, dims = model_and_dims
    small, large = qwen_inputs(dims, [SIZES[0]]), qwen_inputs(dims, [SIZES[1]])
    width = large["input_ids"].shape[1]
    padded = torch.cat([torch.zeros(1, width - small["input_ids"].shape[1], dtype=torch.long),
                        small["input_ids"]], dim=1)
    ids = torch.cat([padded, large["input_ids"]])
    mask = (torch.arange(width)[None] >= width - small["input_ids"].shape[1]).long()
    batch = {"input_ids": ids, "attention_mask": torch.cat([mask, torch.ones(1, width, dtype=torch.long)]),
             "mm_token_type_ids": (ids == IMAGE).int(),
             "pixel_values": torch.cat([small["pixel_values"], large["pixel_values"]]),
             "image_grid_thw": torch.cat([small["image_grid_thw"], large["image_grid_thw"]])}
    with ficoco.apply(model, "fastv", BUDGET, layer=1):
        with pytest.raises(ValueError, match=r"fastv: a reduction is planned for one image per prompt and one "
                                             r"span per batch; this batch's rows hold \[1, 1\] images of \[32, 64\]"):
            logits_of(model, batch)
    with ficoco.apply(model, "vanilla") as handle:                 # unreduced, any sizes batch together
        logits_of(model, batch)
        assert [counts["visual_delivered"] for counts in handle.last_counts()] == [32, 64]


ELSEWHERE = "only reductions inside the LLM, or inside the tower's blocks alone, run on qwen2_vl so far"


@pytest.mark.parametrize("name, overrides, message", [
    ("ficoco-v", {}, "ficoco-v cannot run on qwen2_vl: it needs a CLS token first in the vision tower .* on a tower "
                     "without CLS run it with semantic='key-mean'"),
    ("visionzip", {}, "visionzip cannot run on qwen2_vl: it needs a CLS token first in the vision tower"),
    ("divprune", {}, f"divprune cannot run on qwen2_vl: {ELSEWHERE}"),
    ("cdpruner", {}, f"cdpruner cannot run on qwen2_vl: {ELSEWHERE}"),
    ("ficoco-vl", {}, "ficoco-vl cannot run on qwen2_vl: it needs a CLS token first"),
])
def test_what_the_adapter_cannot_place_is_refused_by_name(name, overrides, message):
    model, _ = tiny_qwen("qwen2_vl", llm_layers=2)
    with pytest.raises(ValueError, match=message):
        ficoco.apply(model, name, BUDGET, **overrides)
    assert not hasattr(model, "_ficoco_handle")

"""Reductions on a tiny random LLaVA-NeXT (issue 18 item 4).

LLM-side methods: each image span keeps the nominal budget's fraction, counts follow each span's plan
layer by layer, cached generation equals a full recompute that hides the dropped tokens as keys (the
unmodified model, no cache), a batch of two aspect ratios with one span equals each alone, spans that
differ in a batch are refused. Per-pass methods (in the tower, at its output, after the projector) on
each crop: the model equals a LLaVA-1.5 with the same weights given the image's passes as separate
images under the same method (logits, generated tokens, counts), and a batch of two aspect ratios
equals each alone. `remove()`
restores the model, and FitPrune without its fit is refused by name.

Tiny model (tests/helpers_tiny.py): 28 px crops of 16 patches, canvases of up to 5 passes; the nominal
image holds 5 x 16 = 80 visual tokens. A 30 x 80 image is 4 passes and a 60-token span (image-newlines
included); 31 x 34 and 34 x 31 are two aspect ratios with one 88-token span.
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers_tiny import IMAGE, NEXT_TEXT, masked_forward, next_batch, tiny_llava_next

import ficoco
from ficoco import flops
from ficoco.invariants import check_counts

NOMINAL = 80
# per-pass methods: in the tower's layers, at its output, after the projector (pooling: a 2 x 2 grid a pass)
TOWER_CASES = [("ficoco-v", 40, {"start": 1}), ("tome", 40, {"start": 1}), ("evit", 40, {"layers": [1, 2]}),
               ("visionzip", 40, {}), ("vispruner", 40, {}), ("prumerge", 40, {"knn": 4}), ("topk-cls", 40, {}),
               ("random", 40, {}), ("pooling", 20, {}), ("divprune", 40, {}),
               ("downsample", 45, {})]                          # 9 a pass: each 28 px crop resized to 3 x 3 patches
CASES = [("fastv", 40, {"layer": 1}), ("dart", 40, {"layer": 1}), ("pdrop", 40, {"boundaries": [1, 2, 3]}),
         ("pdrop", 50, {"boundaries": [0, 2]}),                                 # the cache is reduced from layer 0
         ("ficoco-l", 40, {"start": 0, "window": 2}),
         # the same counts for every span (config/paper.yaml's LLaVA-NeXT grid), dropped tokens recycled
         ("sparsevlm", 40, {"layers": [0, 2], "keeps": [12, 6]})]
# FiCoCo-L and SparseVLM's recycling merge into kept tokens, which a key mask cannot express
# methods of both: in the tower (on each pass), then in the LLM (on the passes' tokens)
VL = {"v_start": 1, "l_start": 0, "l_window": 2}
VSCAN = {"window": 2, "local_layer": 1, "layer": 2}            # 2 x 2 windows of the 4 x 4 grid
BOTH_CASES = [("ficoco-vl", 20, VL), ("vscan", 40, VSCAN)]
MASKABLE = [case for case in CASES if case[0] not in ("ficoco-l", "sparsevlm")] + [
    ("sparsevlm", 40, {"layers": [0, 2], "keeps": [12, 6], "recycle": False})]


@pytest.fixture(scope="module")
def model_and_dims():
    return tiny_llava_next(attention="sdpa")


def test_the_nominal_image_of_the_tiny_model():
    _, dims = tiny_llava_next()
    assert dims.visual_tokens == NOMINAL and dims.anyres_layout(30, 80).delivered == 60
    assert dims.anyres_layout(31, 34).delivered == dims.anyres_layout(34, 31).delivered == 88


@pytest.mark.parametrize("name, budget, overrides", CASES)
@pytest.mark.parametrize("image_size", [(30, 80), (31, 34)])
def test_each_span_keeps_the_nominal_budgets_fraction_layer_by_layer(model_and_dims, name, budget, overrides,
                                                                      image_size):
    model, dims = model_and_dims
    span = dims.anyres_layout(*image_size).delivered
    with ficoco.apply(model, name, budget, **overrides) as handle, torch.no_grad():
        model(**next_batch(dims, [image_size]))
        (counts,), (plan,) = handle.last_counts(), handle.row_plans()
    assert handle.plan is None
    assert plan.budget == math.floor(budget * span / NOMINAL + 0.5)           # the same kept fraction, rounded
    assert plan.llm.n0 == plan.delivered == counts["visual_delivered"] == span
    check_counts(name, plan, counts, has_image=True)                            # every layer, passes, projector
    assert sum(counts["llm_visual"]) / len(counts["llm_visual"]) <= plan.budget + 0.5
    assert counts["llm"][0] - counts["llm_visual"][0] == NEXT_TEXT    # text untouched
    assert counts["overhead_macs"] > 0
    unreduced = flops.vanilla_counts(dims, NEXT_TEXT, image_size)
    assert counts["vision"] == unreduced["vision"] and counts["vision_crops"] == unreduced["vision_crops"]
    assert flops.sample_cost(dims, counts, 1)["prefill_flops"] < flops.sample_cost(dims, unreduced, 1)["prefill_flops"]


@pytest.mark.parametrize("name, budget, overrides", CASES)
def test_flops_plans_an_image_as_the_adapter_runs_it(model_and_dims, name, budget, overrides):
    """`ficoco flops --image-size` (flops.planned_counts) and a run on that image record the same counts."""
    model, dims = model_and_dims
    with ficoco.apply(model, name, budget, **overrides) as handle, torch.no_grad():
        model(**next_batch(dims, [(30, 80)]))
        (counts,) = handle.last_counts()
    planned = flops.planned_counts(dims, name, budget, NEXT_TEXT, (30, 80), **overrides)
    assert planned == {key: value for key, value in counts.items() if key != "overhead_macs"}


def generate(model, name, budget, inputs, overrides):
    with ficoco.apply(model, name, budget, **overrides) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        return out, handle.last_trace()["llm"], handle.last_counts()


@pytest.mark.parametrize("name, budget, overrides", MASKABLE)
def test_cached_generation_equals_full_recompute_without_cache(model_and_dims, name, budget, overrides):
    """Every decoding step of the cached run against the unmodified LLaVA-NeXT re-run on the whole sequence
    without a cache, the prefill's dropped tokens hidden as keys from their layer on. (FiCoCo-L and
    SparseVLM's recycling merge into kept tokens, which a mask cannot express; their caches are checked
    against their own recompute on LLaVA-1.5, tests/test_ficoco_methods.py and test_baselines_llm.py.)"""
    model, dims = model_and_dims
    inputs = next_batch(dims, [(30, 80)])
    del inputs["attention_mask"]
    ids = inputs["input_ids"]
    out, trace, _ = generate(model, name, budget, inputs, overrides)
    assert trace, "the method reduced nothing"
    image = {p for p in range(ids.shape[1]) if ids[0, p] == IMAGE}
    hidden_from, alive = {}, image
    for layer in sorted(trace):
        kept = set(trace[layer][0].tolist())
        hidden_from[layer], alive = alive - kept, kept
    sequence = out.sequences[0]
    for step, step_logits in enumerate(out.logits):
        prefix = sequence[: ids.shape[1] + step][None]
        recomputed, _, _ = masked_forward(model, prefix, inputs["pixel_values"], hidden_from=hidden_from,
                                          image_sizes=inputs["image_sizes"])
        torch.testing.assert_close(step_logits[0], recomputed[-1], rtol=1e-4, atol=1e-5)
        assert int(recomputed[-1].argmax()) == int(sequence[ids.shape[1] + step])


@pytest.mark.parametrize("name, budget, overrides", CASES + BOTH_CASES)    # BOTH_CASES: the same pass count
def test_a_batch_of_two_aspect_ratios_with_one_span_equals_each_alone(model_and_dims, name, budget, overrides):
    model, dims = model_and_dims
    sizes = [(31, 34), (34, 31)]
    together, trace, counts = generate(model, name, budget, next_batch(dims, sizes), overrides)
    for row, size in enumerate(sizes):
        inputs = next_batch(dims, [size])
        inputs["pixel_values"] = next_batch(dims, sizes)["pixel_values"][row:row + 1]
        alone, alone_trace, alone_counts = generate(model, name, budget, inputs, overrides)
        assert together.sequences[row].tolist() == alone.sequences[0].tolist()          # one length: no padding
        for step_together, step_alone in zip(together.logits, alone.logits):
            torch.testing.assert_close(step_together[row], step_alone[0], rtol=1e-4, atol=1e-5)
        assert counts[row] == alone_counts[0]
        assert {layer: kept[row].tolist() for layer, kept in trace.items()} == \
            {layer: kept[0].tolist() for layer, kept in alone_trace.items()}


def test_spans_that_differ_in_one_batch_are_refused_with_a_message(model_and_dims):
    model, dims = model_and_dims
    with ficoco.apply(model, "fastv", 40, layer=1), torch.no_grad():
        with pytest.raises(ValueError, match=r"fastv: the image spans of this batch's rows hold \[60, 88\] tokens; "
                                             r"an LLM reduction is planned for one span per batch"):
            model(**next_batch(dims, [(30, 80), (31, 34)]))
    with ficoco.apply(model, "vanilla") as handle, torch.no_grad():           # the unreduced model batches any
        model(**next_batch(dims, [(30, 80), (31, 34)]))
        assert [row["visual_delivered"] for row in handle.last_counts()] == [60, 88]


def passes_as_images(inputs: dict, passes: int) -> dict:
    """LLaVA-1.5 inputs of one prompt (the same text as `next_batch`'s) with the first image's passes as its images."""
    return {"input_ids": torch.tensor([[1, 10, 11] + [IMAGE] * 16 * passes + [12, 13, 14, 15]]),
            "pixel_values": inputs["pixel_values"][0, :passes]}


def llava_twin(model):
    """A LLaVA-1.5 with the LLaVA-NeXT model's tower, projector and LLM weights (all but its image-newline)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = model.config
    twin = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=config.vision_config, text_config=config.text_config, image_token_id=IMAGE,
        image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default")).eval()
    unused = twin.load_state_dict(model.state_dict(), strict=False)
    assert unused.missing_keys == [] and unused.unexpected_keys == ["model.image_newline"]
    twin.set_attn_implementation("sdpa")
    twin.generation_config.pad_token_id = model.generation_config.pad_token_id
    return twin


@pytest.mark.parametrize("name, budget, overrides", TOWER_CASES)
def test_a_tower_method_acts_on_each_crop_as_on_an_image_of_its_own(model_and_dims, name, budget, overrides):
    """LLaVA-NeXT under a tower method = LLaVA-1.5 (same weights) under that method at the per-pass budget,
    given the image's passes as separate images (base image first, then the crops): the LLM sees each pass's
    kept tokens pass after pass, without image-newlines. Compared: logits, generated tokens, counts."""
    model, dims = model_and_dims
    twin = llava_twin(model)
    inputs = next_batch(dims, [(30, 80)])                       # 4 passes, 8 of 16 patches kept in each
    passes = dims.anyres_layout(30, 80).tower_passes
    per_pass = math.floor(budget * 16 / NOMINAL + 0.5)
    separate = passes_as_images(inputs, passes)
    with ficoco.apply(model, name, budget, **overrides) as handle, torch.no_grad():
        logits = model(**inputs).logits
        (counts,), (plan,) = handle.last_counts(), handle.row_plans()
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with ficoco.apply(twin, name, per_pass, **overrides) as twin_handle, torch.no_grad():
        twin_logits = twin(**separate).logits
        (twin_counts,) = twin_handle.last_counts()
        twin_generated = twin.generate(**separate, max_new_tokens=4, do_sample=False)
    assert logits.shape[1] == twin_logits.shape[1] == NEXT_TEXT + passes * per_pass     # placeholders collapsed
    torch.testing.assert_close(logits, twin_logits, rtol=1e-4, atol=1e-5)
    assert generated[0, inputs["input_ids"].shape[1]:].tolist() == twin_generated[0, separate["input_ids"].shape[1]:].tolist()
    assert generated[0, :inputs["input_ids"].shape[1]].tolist() == inputs["input_ids"][0].tolist()   # the caller's prompt
    # both list the tower passes one after the other: LLaVA-NeXT its base image and crops, LLaVA-1.5 its images
    assert counts["vision"] == twin_counts["vision"] and counts["vision_crops"] == twin_counts["vision_crops"] == passes
    assert len(counts["vision"]) == passes * len(plan.vision_counts) // plan.vision_crops
    assert counts["visual_delivered"] == twin_counts["visual_delivered"] == passes * per_pass
    assert counts["llm"] == twin_counts["llm"] and counts["overhead_macs"] == twin_counts["overhead_macs"]
    assert counts["overhead_macs"] > 0 or name in ("random", "pooling", "downsample")   # no matrix product there
    check_counts(name, plan, counts, has_image=True)
    planned = flops.planned_counts(dims, name, budget, NEXT_TEXT, (30, 80), **overrides)
    assert planned == {key: value for key, value in counts.items() if key != "overhead_macs"}


def test_cdpruner_reads_each_crops_instruction_as_llava_1_5_reads_each_images(model_and_dims, tmp_path):
    """CDPruner on every pass, conditioned on the instruction of the pass's prompt (the CLIP companion of the
    tower), equals LLaVA-1.5 under CDPruner given the passes as separate images of one prompt: logits, the
    generated tokens (generate encodes the images before its first forward) and counts."""
    from helpers_tiny import tiny_text_tower, tiny_word_tokenizer

    from ficoco.models.companion import load_text_tower

    model, dims = model_and_dims
    twin = llava_twin(model)
    next_tower = tiny_text_tower(model, tmp_path)
    twin_tower = load_text_tower(tmp_path, tiny_word_tokenizer(), "<image>{prompt}", twin.model.vision_tower,
                                 dims.last_vision_layer)
    inputs = next_batch(dims, [(30, 80)])
    passes = dims.anyres_layout(30, 80).tower_passes
    separate = passes_as_images(inputs, passes)
    with ficoco.apply(model, "cdpruner", 40, text_tower=next_tower) as handle, torch.no_grad():
        logits = model(**inputs).logits
        (counts,), (plan,) = handle.last_counts(), handle.row_plans()
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with ficoco.apply(twin, "cdpruner", 8, text_tower=twin_tower) as twin_handle, torch.no_grad():
        twin_logits = twin(**separate).logits
        (twin_counts,) = twin_handle.last_counts()
        twin_generated = twin.generate(**separate, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(logits, twin_logits, rtol=1e-4, atol=1e-5)
    assert generated[0, inputs["input_ids"].shape[1]:].tolist() == twin_generated[0, separate["input_ids"].shape[1]:].tolist()
    assert counts["visual_delivered"] == passes * 8 and counts["projector_tokens"] == passes * 16
    assert counts["overhead_macs"] == twin_counts["overhead_macs"] > 0
    check_counts("cdpruner", plan, counts, has_image=True)
    with pytest.raises(ValueError, match="pass text_tower"):
        ficoco.apply(model, "cdpruner", 40)


@pytest.mark.parametrize("name", ["prumerge-adaptive", "prumerge-plus-adaptive"])
def test_an_adaptive_method_chooses_each_crops_count_as_llava_1_5_each_images(model_and_dims, name):
    """PruMerge's IQR originals on every pass, each pass keeping a count of its own: equal to LLaVA-1.5 under
    the same method given the passes as separate images (logits, generated tokens, counts), and each
    image's count within its passes' bounds (ficoco.invariants, against the row's plan)."""
    model, dims = model_and_dims
    twin = llava_twin(model)
    inputs = next_batch(dims, [(30, 80)])
    passes = dims.anyres_layout(30, 80).tower_passes
    separate = passes_as_images(inputs, passes)
    with ficoco.apply(model, name, None, knn=4) as handle, torch.no_grad():
        logits = model(**inputs).logits
        (counts,), (plan,) = handle.last_counts(), handle.row_plans()
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with ficoco.apply(twin, name, None, knn=4) as twin_handle, torch.no_grad():
        twin_logits = twin(**separate).logits
        (twin_counts,) = twin_handle.last_counts()
        twin_generated = twin.generate(**separate, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(logits, twin_logits, rtol=1e-4, atol=1e-5)
    assert generated[0, inputs["input_ids"].shape[1]:].tolist() == twin_generated[0, separate["input_ids"].shape[1]:].tolist()
    assert counts["visual_delivered"] == twin_counts["visual_delivered"] < passes * 16
    assert counts["llm"] == twin_counts["llm"] and counts["overhead_macs"] == twin_counts["overhead_macs"] > 0
    assert plan.delivered is None and plan.vision_crops == passes
    check_counts(name, plan, counts, has_image=True)


@pytest.mark.parametrize("name, budget, overrides", TOWER_CASES[:2] + [("prumerge-plus-adaptive", None, {"knn": 4})])
def test_a_tower_method_batches_two_aspect_ratios_as_each_alone(model_and_dims, name, budget, overrides):
    """Under a tower method each pass keeps a count of its own reduction, so images of different spans batch
    together (an adaptive method: the rows' counts differ, and the batch is re-padded)."""
    model, dims = model_and_dims
    sizes = [(31, 34), (30, 80)]                               # 5 and 4 passes: 40 and 32 tokens
    together, _, counts = generate(model, name, budget, next_batch(dims, sizes), overrides)
    assert [row["visual_delivered"] for row in counts] == [40, 32] or budget is None
    for row, size in enumerate(sizes):
        inputs = next_batch(dims, [size])
        inputs["pixel_values"] = next_batch(dims, sizes)["pixel_values"][row:row + 1, :inputs["pixel_values"].shape[1]]
        alone, _, alone_counts = generate(model, name, budget, inputs, overrides)
        pad = together.sequences.shape[1] - alone.sequences.shape[1]
        assert together.sequences[row, pad:].tolist() == alone.sequences[0].tolist()
        for step_together, step_alone in zip(together.logits, alone.logits):
            torch.testing.assert_close(step_together[row], step_alone[0], rtol=1e-4, atol=1e-5)
        assert counts[row] == alone_counts[0]


def test_remove_restores_the_model_exactly(model_and_dims):
    model, dims = model_and_dims
    inputs = next_batch(dims, [(30, 80)])
    with torch.no_grad():
        before = model(**inputs).logits
        for name, budget, overrides in CASES + TOWER_CASES + BOTH_CASES + [("prumerge-adaptive", None, {"knn": 4})]:
            with ficoco.apply(model, name, budget, **overrides), torch.no_grad():
                reduced = model(**inputs).logits
            assert not torch.equal(reduced, before)
        after = model(**inputs).logits
    assert torch.equal(before, after)
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)
    assert not {"get_image_features", "pack_image_features"} & set(model.model.__dict__)
    assert "generate" not in model.__dict__


# Methods of both: FiCoCo-VL and VScan, on each pass in the tower, then on the passes' tokens in the LLM



def llm_inputs_under(model, runs):
    """The LLM's input embeddings of each (name, budget, overrides, inputs) run, in turn."""
    captured = []
    probe = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        for name, budget, overrides, inputs in runs:
            with ficoco.apply(model, name, budget, **overrides), torch.no_grad():
                model(**inputs)
    finally:
        probe.remove()
    return captured


def test_ficoco_vl_is_ficoco_v_on_each_pass_then_ficoco_l_on_the_passes_tokens(model_and_dims):
    """B = 10 of the nominal 80 is b = 2 a pass: FiCoCo-V keeps 2·b = 4 patches of each of the 4 passes of a
    30 x 80 image (its LLM input equals FiCoCo-V's at 20, which keeps 4 a pass), and FiCoCo-L brings those 16
    tokens to a layer average of 4·b = 8 (logits and LLM counts equal LLaVA-1.5's under FiCoCo-L at 8, given
    the 16 tokens as its one image)."""
    model, dims = model_and_dims
    inputs = next_batch(dims, [(30, 80)])
    with ficoco.apply(model, "ficoco-vl", 10, **VL) as handle, torch.no_grad():
        logits = model(**inputs).logits
        (counts,), (plan,) = handle.last_counts(), handle.row_plans()
    vl_input, v_input = llm_inputs_under(model, [("ficoco-vl", 10, VL, inputs), ("ficoco-v", 20, {"start": 1}, inputs)])
    assert torch.equal(vl_input, v_input) and vl_input.shape[1] == NEXT_TEXT + 16
    check_counts("ficoco-vl", plan, counts, has_image=True)
    assert plan.budget == 8 and counts["visual_delivered"] == 16 and sum(counts["llm_visual"]) / dims.llm_layers <= 8

    twin = llava_twin(model)
    image = vl_input[0, 3:3 + 16]                       # the prompt is [1, 10, 11] + image + [12, 13, 14, 15]
    swap = twin.model.multi_modal_projector.register_forward_hook(lambda module, args, output: image[None])
    try:
        with ficoco.apply(twin, "ficoco-l", 8, start=0, window=2) as twin_handle, torch.no_grad():
            twin_logits = twin(input_ids=torch.tensor([[1, 10, 11] + [IMAGE] * 16 + [12, 13, 14, 15]]),
                               pixel_values=inputs["pixel_values"][0, :1]).logits
            (twin_counts,) = twin_handle.last_counts()
    finally:
        swap.remove()
    torch.testing.assert_close(logits, twin_logits, rtol=1e-4, atol=1e-5)
    assert counts["llm"] == twin_counts["llm"] and counts["llm_visual"] == twin_counts["llm_visual"]


def test_vscan_scans_each_pass_as_on_an_image_of_its_own_then_prunes_the_passes_tokens(model_and_dims):
    """B = 40 is b = 8 a pass: the scans keep V = 12 of each pass's 16 patches, the others merged in (the LLM
    input equals LLaVA-1.5's under VScan at 8, given each pass as an image of its own prompt), and layer 2
    keeps k = (4·32 − 48·2) / 2 = 16 of the 4 passes' 48 tokens, so the layer average is 32 = 4·b."""
    model, dims = model_and_dims
    inputs = next_batch(dims, [(30, 80)])
    passes = dims.anyres_layout(30, 80).tower_passes
    with ficoco.apply(model, "vscan", 40, **VSCAN) as handle, torch.no_grad():
        model(**inputs)
        (counts,), (plan,) = handle.last_counts(), handle.row_plans()
        kept = handle.last_trace()["llm"][2]
    assert counts["llm_visual"] == [48, 48, 16, 16] and kept.shape == (1, 16) and plan.budget == 32
    assert counts["projector_tokens"] == passes * 16
    twin = llava_twin(model)
    prompts = {"input_ids": torch.tensor([[1, 10, 11] + [IMAGE] * 16 + [12, 13, 14, 15]] * passes),
               "pixel_values": inputs["pixel_values"][0, :passes]}
    (next_input,) = llm_inputs_under(model, [("vscan", 40, VSCAN, inputs)])
    (twin_input,) = llm_inputs_under(twin, [("vscan", 8, VSCAN, prompts)])
    assert twin_input.shape == (passes, NEXT_TEXT + 12, dims.llm_hidden)
    torch.testing.assert_close(next_input[0, 3:3 + 48], twin_input[:, 3:3 + 12].flatten(0, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, budget, overrides", BOTH_CASES)
@pytest.mark.parametrize("image_size", [(30, 80), (31, 34)])
def test_a_method_of_both_plans_each_image_as_it_runs(model_and_dims, name, budget, overrides, image_size):
    model, dims = model_and_dims
    with ficoco.apply(model, name, budget, **overrides) as handle, torch.no_grad():
        model(**next_batch(dims, [image_size]))
        (counts,), (plan,) = handle.last_counts(), handle.row_plans()
    passes = dims.anyres_layout(*image_size).tower_passes
    share = math.floor(budget * 16 / NOMINAL + 0.5)
    assert plan.vision_crops == counts["vision_crops"] == passes and plan.budget == passes * share
    assert sum(counts["llm_visual"]) / dims.llm_layers <= plan.budget
    check_counts(name, plan, counts, has_image=True)
    planned = flops.planned_counts(dims, name, budget, NEXT_TEXT, image_size, **overrides)
    assert planned == {key: value for key, value in counts.items() if key != "overhead_macs"}
    assert counts["overhead_macs"] > 0


def test_a_fitted_method_without_its_fit_is_refused_before_any_hook(model_and_dims):
    """Every registered method has a LLaVA-NeXT site (FitPrune: tests/test_fitprune_spans.py); FitPrune without
    its fitted schedule says how to fit it."""
    model, _ = model_and_dims
    with pytest.raises(ValueError, match=r"fitprune: budget 40 needs its fitted deletion schedule"):
        ficoco.apply(model, "fitprune", 40)
    assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_a_method_of_both_without_its_two_parts_is_refused_before_any_hook(model_and_dims):
    """A method that acts in the tower and the LLM must state its two parts to run on several crops; no
    registered one lacks them, so FiCoCo-VL stands in with its parts removed."""
    import dataclasses

    from ficoco import methods

    model, _ = model_and_dims
    whole = dataclasses.replace(methods.get("ficoco-vl"), name="vl-whole", tower_schedule=None, llm_schedule=None)
    with pytest.raises(ValueError, match=r"vl-whole \(phase both\): on LLaVA-NeXT .* it needs one crop per image "
                                         r"\(this model encodes 5; .*both with their two parts stated"):
        ficoco.apply(model, whole, 20)
    assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_an_infeasible_span_budget_fails_its_prefill_with_the_methods_message(model_and_dims):
    """A budget the nominal image reaches but a smaller span does not: that prefill fails (an evaluate job
    records the sample as a counted failure); other spans still run."""
    model, dims = model_and_dims
    assert dims.anyres_layout(10, 28).delivered == 34           # 41 of 80 -> 17 of 34, below FastV's 17.5 at K=2
    with ficoco.apply(model, "fastv", 41, layer=2) as handle, torch.no_grad():
        with pytest.raises(ValueError, match="fastv: budget B=17 is infeasible with pruning at layer K=2"):
            model(**next_batch(dims, [(10, 28)]))
        model(**next_batch(dims, [(31, 34)]))
        assert handle.row_plans()[0].budget == 45

"""The adaptive PruMerge originals (methods.md §8.6): `prumerge-adaptive` and `prumerge-plus-adaptive`.

A count per image: the patches whose layer-23 CLS attention is above Q3 + 1.5·IQR of the image's
patch attentions (at least the top-1), PruMerge+ adding every s-th raster patch below N − 1,
s = ⌊⌊1/ratio⌋/3⌋ with ratio the image's share of outliers (as the published code); then PruMerge's kNN
merge and extra token. References are independent: numpy's linear percentiles
in float64, the next layer's weights applied by hand to the eager tower's features, and Python
loops over positions. The model is the LLaVA-shaped one of test_baselines_postvision.py.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers_tiny import BOS, IMAGE, eager_attention, generate_batch_and_alone, images, llava_shaped, n_placeholders, \
    prompt
from test_baselines_postvision import FEATURE_LAYER, SHAPE

import ficoco
from ficoco import methods
from ficoco.config import ADAPTIVE, ConfigError, FULL, job_grid, validate
from ficoco.dims import llava_1_5_dims
from ficoco.flops import planned_counts
from ficoco.methods.prumerge import adaptive_raster_stride
from ficoco.paradigm.filter import iqr_outlier_mask

DIMS_7B = llava_1_5_dims("7b")
ADAPTIVE_METHODS = ["prumerge-adaptive", "prumerge-plus-adaptive"]
PROMPTS = [([10, 11, 12, 13], [14, 15, 16]), ([17], [18, 19, 20, 21, 22])]       # (before, after) the image


# ------------------------------------------------------------------------------------------------
# The IQR rule against an independent float64 reference

def _iqr_reference(row: list[float]) -> list[bool]:
    """Strictly above Q3 + 1.5·IQR (numpy's linear percentiles, float64); the top-1 when none is."""
    q1, q3 = np.percentile(np.asarray(row, dtype=np.float64), [25, 75])
    kept = [value > q3 + 1.5 * (q3 - q1) for value in row]
    if not any(kept):
        top = max(range(len(row)), key=lambda i: (row[i], -i))           # ties to the lower position
        kept = [i == top for i in range(len(row))]
    return kept


def test_iqr_rule_matches_a_float64_numpy_reference():
    generator = torch.Generator().manual_seed(7)
    rows = [torch.randn(576, generator=generator).exp() for _ in range(6)]                # heavy right tail
    rows.append(torch.rand(576, generator=generator))                                       # no outliers
    rows.append(torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1, 2.5, 3.0]))                        # fence exactly 2.5
    for row in rows:
        got = iqr_outlier_mask(row[None].float())[0].tolist()
        assert got == _iqr_reference(row.double().tolist())
    fence = iqr_outlier_mask(torch.tensor([[0.0, 0, 0, 0, 1, 1, 1, 1, 2.5, 3.0]]))[0]
    assert fence.nonzero()[:, 0].tolist() == [9]                              # 2.5 is on the fence: not above it
    assert iqr_outlier_mask(torch.ones(2, 8))[:, 0].all() and iqr_outlier_mask(torch.ones(2, 8)).sum() == 2
    assert iqr_outlier_mask(torch.stack(rows[:6])).tolist() == [_iqr_reference(r.double().tolist()) for r in rows[:6]]


# ------------------------------------------------------------------------------------------------
# Plans, parameters and the budget rule (no model)

def test_plans_are_adaptive_and_take_no_budget():
    for name in ADAPTIVE_METHODS:
        method = methods.get(name)
        assert not method.budgeted and method.phase == "vision" and method.acts_on == ("vision",)
        plan = method.plan(DIMS_7B, None)
        assert plan.delivered is None and plan.llm_visual is None and plan.layer_average is None
        assert plan.post_vision.tokens_out is None and plan.post_vision.details["rule"] == "iqr"
        (step,) = method.steps(plan)
        assert step.tokens_out is None
        for budget in (64, 576):
            with pytest.raises(ValueError, match=f"{name}: an adaptive method takes no budget"):
                method.plan(DIMS_7B, budget)
        with pytest.raises(ValueError, match=f"{name}: an adaptive method chooses its token count per image, so it "
                                             f"has no planned counts"):
            planned_counts(DIMS_7B, name, None)
    post = methods.get("prumerge-plus-adaptive").plan(DIMS_7B, None).post_vision
    assert post.details["raster_stride"].startswith("per image") and "ratio" not in post.details
    assert "raster_stride" not in methods.get("prumerge-adaptive").plan(DIMS_7B, None).post_vision.details
    # the realised count's bounds: PruMerge 1..144 outliers; PruMerge+ 3 (k = 1: 0, 192, 384) to every patch
    assert (post.tokens_min, post.tokens_max) == (4, 576)
    bounds = methods.get("prumerge-adaptive").plan(DIMS_7B, None).post_vision
    assert (bounds.tokens_min, bounds.tokens_max) == (2, 145)
    assert all(method.budgeted for method in map(methods.get, methods.names()) if method.name not in ADAPTIVE_METHODS)


def test_the_raster_stride_is_the_published_one_of_each_images_outlier_share():
    """42Shawn/LLaVA-PruMerge, `token_prune_merge_advanced_plus` (if_adaptive): ratio = k / N, then
    `int(int(1 / ratio) / 3)` in floats; its ratio is no parameter."""
    for k in range(1, 145):
        assert adaptive_raster_stride(k, 576) == int(int(1 / (k / 576)) / 3) == (576 // k) // 3 >= 1
    assert [adaptive_raster_stride(k, 576) for k in (1, 20, 32, 50, 96, 97)] == [192, 9, 6, 3, 2, 1]
    with pytest.raises(ValueError, match="'ratio'"):
        methods.get("prumerge-plus-adaptive").plan(DIMS_7B, None, ratio=1 / 16)


def test_a_budget_label_must_fit_the_method():
    assert methods.budget_from_label("prumerge-adaptive", ADAPTIVE) is None
    assert methods.budget_from_label("vanilla", FULL) is None and methods.budget_from_label("prumerge", "64") == 64
    with pytest.raises(ValueError, match="prumerge-plus-adaptive: an adaptive method takes no budget"):
        methods.budget_from_label("prumerge-plus-adaptive", "64")
    with pytest.raises(ValueError, match="prumerge: budget label 'adaptive' is only for adaptive methods"):
        methods.budget_from_label("prumerge", ADAPTIVE)
    assert methods.budget_label("prumerge-adaptive", None) == ADAPTIVE and methods.budget_label("ficoco-v", 64) == "64"


def test_the_grid_runs_each_adaptive_method_once_per_model_and_benchmark():
    config = validate({"models": ["llava-1.5-7b", "llava-1.5-13b"], "benchmarks": ["gqa", "pope"],
                       "methods": ["vanilla", "prumerge", *ADAPTIVE_METHODS], "budgets": [192, 64],
                       "method_params": {"prumerge-plus-adaptive": {"knn": 16, "per_budget": {64: {"knn": 3}}}}})
    jobs = job_grid(config)
    for name in ADAPTIVE_METHODS:
        runs = sorted((j.model, j.benchmark, j.budget) for j in jobs if j.method == name)
        assert runs == sorted((m, b, ADAPTIVE) for m in config["models"] for b in config["benchmarks"])
        assert {j.phase for j in jobs if j.method == name} == {"vision"}
    assert {j.budget for j in jobs if j.method == "prumerge"} == {"192", "64"}
    assert {j.budget for j in jobs if j.method == "vanilla"} == {FULL}
    assert all(j.run_dir.endswith(f"/{j.method}/badaptive") for j in jobs if j.budget == ADAPTIVE)
    with pytest.raises(ConfigError, match="prumerge-plus-adaptive.*'ratio'"):
        validate({"models": ["llava-1.5-7b"], "benchmarks": ["gqa"], "methods": ["prumerge-plus-adaptive"],
                  "budgets": [64], "method_params": {"prumerge-plus-adaptive": {"ratio": 0.5}}})


# ------------------------------------------------------------------------------------------------
# On the LLaVA-shaped model

@pytest.fixture(scope="module")
def model():
    return llava_shaped(**SHAPE)


@pytest.fixture(scope="module")
def pixels():
    return images(2, 336, seed=5)              # two images whose outlier counts differ


@pytest.fixture(scope="module")
def reference(model, pixels):
    """Per image, from the untouched eager tower and the next layer's weights applied by hand (float64):
    the CLS attention a over the patches, the unit keys and the features."""
    tower = model.model.vision_tower
    layer = tower.encoder.layers[FEATURE_LAYER + 1]
    out = []
    with torch.no_grad(), eager_attention(tower):
        hidden = tower(pixels, output_hidden_states=True).hidden_states[FEATURE_LAYER + 1]      # (2, 577, D)
        for features in hidden:
            normed = layer.layer_norm1(features)
            q, k = layer.self_attn.q_proj(normed[:1]).double(), layer.self_attn.k_proj(normed).double()
            a = ((q @ k.T) / k.shape[-1] ** 0.5).softmax(-1)[0, 1:].tolist()
            unit = k[1:] / k[1:].norm(dim=-1, keepdim=True)
            out.append({"a": a, "unit": unit, "x": features[1:].double()})
    return out


def _stride(outliers: int, n: int) -> int:
    """The published stride, in exact arithmetic: ⌊⌊n/k⌋/3⌋."""
    return math.floor(math.floor(Fraction(n, outliers)) / 3)


def _expected(image: dict, raster: bool, knn: int = 32) -> tuple[list[int], torch.Tensor]:
    """Kept positions (outliers ∪ raster below N − 1) and the merged tokens + extra token, by Python loops."""
    a, unit, x = image["a"], image["unit"], image["x"]
    kept = {p for p, keep in enumerate(_iqr_reference(a)) if keep}
    if raster:
        stride = _stride(len(kept), len(a))
        kept |= {p for p in range(len(a) - 1) if p % stride == 0}
    kept = sorted(kept)
    merged = []
    for i in kept:
        cosine = (unit @ unit[i]).tolist()
        nearest = sorted((j for j in range(len(a)) if j != i), key=lambda j: (-cosine[j], j))[:knn]
        merged.append(x[i] + sum(a[j] * x[j] for j in nearest))
    merged.append(sum(a[j] * x[j] for j in range(len(a)) if j not in set(kept)))
    return kept, torch.stack(merged)


@pytest.mark.parametrize("name, overrides", [("prumerge-adaptive", {}), ("prumerge-plus-adaptive", {}),
                                             ("prumerge-plus-adaptive", {"knn": 8})])
def test_each_image_gets_its_own_count_kept_plus_one(model, pixels, reference, name, overrides):
    n = n_placeholders(model)
    ids = torch.tensor([prompt(n, *PROMPTS[0]), prompt(n, *PROMPTS[0])])        # same text, two images
    seen = {}
    projector = model.model.multi_modal_projector
    with ficoco.apply(model, name, **overrides) as handle, torch.no_grad():
        probe = projector.register_forward_pre_hook(lambda module, args: seen.update(features=args[0]))
        embeds = model.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
        try:
            logits = model(input_ids=ids, pixel_values=pixels).logits
        finally:
            probe.remove()
            embeds.remove()
        counts, trace = handle.last_counts(), handle.last_trace()["vision"][FEATURE_LAYER]
    raster = name == "prumerge-plus-adaptive"
    expected = [_expected(image, raster, overrides.get("knn", 32)) for image in reference]
    realised = [len(kept) + 1 for kept, _ in expected]
    assert realised[0] != realised[1]                                            # the two images differ
    assert [c["visual_delivered"] for c in counts] == realised
    assert [c["llm_visual"] for c in counts] == [[k] for k in realised]
    text = ids.shape[1] - n
    assert [c["llm"] for c in counts] == [[text + k] for k in realised]        # padding excluded
    assert counts[0]["vision"] == [[577, 577]] * (FEATURE_LAYER + 1)
    longest = max(realised)
    assert logits.shape[1] == text + longest and seen["features"].shape[1] == longest
    for row, (kept, tokens) in enumerate(expected):
        assert trace[row, :len(kept)].tolist() == kept and (trace[row, len(kept):] == -1).all()
        torch.testing.assert_close(seen["features"][row, :realised[row]].double(), tokens, rtol=1e-4, atol=1e-4)
        if raster:                                                              # the raster positions are all in
            outliers = sum(_iqr_reference(reference[row]["a"]))
            assert set(range(0, 575, _stride(outliers, 576))) <= set(kept)


def test_raster_positions_against_a_brute_force_loop(model, pixels, reference):
    """PruMerge+'s raster sample: every patch p < 575 with p mod s == 0 (raster order), s from the image's own
    outlier count k as the published code takes it, added to the outliers; the two images' strides differ."""
    strides = []
    for image in (0, 1):
        with ficoco.apply(model, "prumerge-plus-adaptive") as handle, torch.no_grad():
            model(input_ids=torch.tensor([prompt(576, [10], [11])]), pixel_values=pixels[image:image + 1])
            kept = handle.last_trace()["vision"][FEATURE_LAYER][0].tolist()
        outliers = [p for p, keep in enumerate(_iqr_reference(reference[image]["a"])) if keep]
        stride = int(int(1 / (len(outliers) / 576)) / 3)                        # the published expression
        raster = []
        for row in range(24):
            for column in range(24):
                if (row * 24 + column) % stride == 0 and row * 24 + column < 575:
                    raster.append(row * 24 + column)
        assert kept == sorted(set(outliers) | set(raster))
        strides.append(stride)
    assert strides[0] != strides[1]


@pytest.mark.parametrize("name", ADAPTIVE_METHODS)
def test_batch_of_two_left_padded_equals_each_alone_under_generate(model, pixels, name):
    n = n_placeholders(model)
    prompts = [prompt(n, *PROMPTS[0]), prompt(n, *PROMPTS[1])]
    with ficoco.apply(model, name) as handle:
        ids, batched, batched_counts, singles, alone_counts = generate_batch_and_alone(model, handle, prompts, pixels)
    assert batched_counts[0]["visual_delivered"] != batched_counts[1]["visual_delivered"]
    assert torch.equal(batched.sequences[:, :ids.shape[1]], ids)                      # the caller's prompt in front
    for tokens, single, alone in zip(prompts, singles, alone_counts):
        assert torch.equal(single.sequences[0, :len(tokens)], torch.tensor(tokens))
        assert alone["llm"] == [len(tokens) - n + alone["visual_delivered"]]      # each row's realised count


def test_forward_without_mask_builds_one_and_pads_on_the_right(model, pixels):
    """Rows of equal length whose images realise different counts: re-padded on the right with a mask;
    each row's real positions give the logits of that row alone."""
    n = n_placeholders(model)
    ids = torch.tensor([prompt(n, [10, 11], [12, 13]), prompt(n, [14, 15], [16, 17])])
    with ficoco.apply(model, "prumerge-adaptive") as handle, torch.no_grad():
        batched = model(input_ids=ids, pixel_values=pixels).logits
        counts = handle.last_counts()
        for row in range(2):
            alone = model(input_ids=ids[row:row + 1], pixel_values=pixels[row:row + 1]).logits[0]
            length = alone.shape[0]
            assert length == ids.shape[1] - n + counts[row]["visual_delivered"]
            torch.testing.assert_close(batched[row, :length], alone, rtol=1e-4, atol=1e-5)
    assert batched.shape[1] == ids.shape[1] - n + max(c["visual_delivered"] for c in counts)


def test_a_budget_names_the_method_and_remove_restores_the_model(model):
    with pytest.raises(ValueError, match="prumerge-adaptive: an adaptive method takes no budget .* got budget 64"):
        ficoco.apply(model, "prumerge-adaptive", 64)
    assert not hasattr(model, "_ficoco_handle")

    def state():
        modules = list(model.modules())
        return (sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules),
                "get_image_features" in model.model.__dict__, "generate" in model.__dict__)

    before = state()
    for name in ADAPTIVE_METHODS:
        handle = ficoco.apply(model, name)
        assert state() != before and state()[1] and state()[2]
        handle.remove()
        assert state() == before and not hasattr(model, "_ficoco_handle")


def test_text_only_prompt_and_already_encoded_features(model, pixels):
    """No image: nothing to collapse. Features from the trimmed get_image_features with the collapsed
    prompt: forward takes them as they are."""
    with ficoco.apply(model, "prumerge-adaptive") as handle, torch.no_grad():
        text = torch.tensor([[BOS, 10, 11]])
        assert model(input_ids=text).logits.shape[1] == 3
        assert handle.last_counts()[0]["visual_delivered"] == 0
        encoded = model.model.get_image_features(pixel_values=pixels[:1], return_dict=True)
        count = encoded.pooler_output[0].shape[0]
        ids = torch.tensor([prompt(count, [10], [11, 12])])
        direct = model(input_ids=ids, mm_encoder_outputs={"image": encoded}).logits
        assert handle.last_counts()[0]["visual_delivered"] == count
        full = model(input_ids=torch.tensor([prompt(576, [10], [11, 12])]), pixel_values=pixels[:1]).logits
    torch.testing.assert_close(direct, full, rtol=1e-5, atol=1e-6)
    assert int((ids == IMAGE).sum()) == count

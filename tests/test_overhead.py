"""Selection overhead (`overhead_macs`): each method's analytic count against FlopCounterMode.

Every reduction step of every registered method is run on the LLaVA-1.5-shaped tiny model of the
method reference (tests/method_reference.py: 577 vision tokens, 4 LLM layers with grouped KV heads)
under torch's FlopCounterMode, which counts the matrix products (mm, bmm, addmm, SDPA, convolution;
and here torch.cdist's pairwise distances) the step executes; the adapter's `overhead_macs`, computed from the step's `overhead(dims, shape)`
formula alone, must equal half of those FLOPs exactly.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import ficoco
from ficoco.methods import get as get_method, names as method_names
from ficoco.models.llava import install_llava
from helpers_tiny import images, left_padded, n_placeholders, prompt, text_tower_for
from method_reference import SETTINGS, SPARSE, model

# further settings whose overhead formulas take other branches (pruning instead of merging, a fixed
# number of targets, no recycling, a layer-0 LLM step, no contextual tokens)
VARIANTS = {
    "ficoco-v-prune": ("ficoco-v", 128, {"start": 1, "k": 0}),
    "ficoco-v-k2": ("ficoco-v", 128, {"start": 1, "k": 2}),
    "ficoco-v-key-mean": ("ficoco-v", 128, {"start": 1, "semantic": "key-mean"}),
    "ficoco-l-prune": ("ficoco-l", 300, {"start": 0, "window": 3, "k": 0}),
    "ficoco-l-k3": ("ficoco-l", 300, {"start": 1, "window": 2, "k": 3}),
    "ficoco-vl-k1": ("ficoco-vl", 200, {"v_start": 1, "l_start": 1, "l_window": 2, "k": 1}),
    "ficoco-l-after-attention": ("ficoco-l", 400, {"start": 0, "window": 2, "placement": "attention"}),
    "sparsevlm-no-recycle": ("sparsevlm", 128, {**SPARSE, "recycle": False}),
    "divprune-original": ("divprune", 64, {"positions": "original"}),
    "visionzip-dominant-only": ("visionzip", 64, {"contextual": 0}),
}


@pytest.fixture(autouse=True)
def dense_merge(monkeypatch):
    """The merge as the dense product a GPU runs (and `overhead` counts): on the CPU it is summed over
    the nonzero weights only, which FlopCounterMode does not see as a product."""
    from ficoco.paradigm import compress

    monkeypatch.setattr(compress, "_sparse_incoming", lambda weights, x_sources: weights.transpose(1, 2) @ x_sources)


@pytest.fixture(scope="module")
def shaped():
    return model()


def pairwise_distance_flops(x1_shape, x2_shape, *args, out_shape=None, **kwargs) -> int:
    """torch.cdist (either of its kernels) as the product it is: D multiply-adds per pair of rows.
    FlopCounterMode has no formula for it and would count 0 (SparseVLM's DPC-kNN recycling)."""
    *batch, rows, width = x1_shape
    return 2 * math.prod(batch) * rows * x2_shape[-2] * width


DISTANCE_FORMULAS = {torch.ops.aten._cdist_forward: pairwise_distance_flops,
                     torch.ops.aten._euclidean_dist: pairwise_distance_flops}


def counted(method_name: str, counter: list[int]):
    """The method with every step's `reduce` run under FlopCounterMode, the FLOPs added to `counter`."""
    method = get_method(method_name)

    def counting(reduce):
        def run(*args):
            with FlopCounterMode(display=False, custom_mapping=DISTANCE_FORMULAS) as flops:
                out = reduce(*args)
            counter.append(flops.get_total_flops())
            return out
        return run

    def build(plan):
        return tuple(dataclasses.replace(step, reduce=counting(step.reduce)) if hasattr(step, "reduce") else step
                     for step in method.build(plan))

    return dataclasses.replace(method, build=build)


def run_counted(shaped, method_name: str, budget, overrides: dict, ids: torch.Tensor, mask: torch.Tensor,
                pixels: torch.Tensor, use_cache: bool = True) -> tuple[list[dict], int]:
    flops: list[int] = []
    with install_llava(shaped, counted(method_name, flops), budget, text_tower=text_tower_for(shaped, method_name),
                       **overrides) as handle, torch.no_grad():
        shaped(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=use_cache)
        counts = handle.last_counts()
    return counts, sum(flops)


def one_prompt(shaped):
    ids = torch.tensor([prompt(n_placeholders(shaped), [10, 11], [12, 13, 14, 15])])
    return ids, torch.ones_like(ids), images(1, 336, seed=3)


@pytest.mark.parametrize("name", sorted(SETTINGS) + sorted(VARIANTS))
def test_overhead_equals_flop_counter(shaped, name):
    method_name, budget, overrides = VARIANTS[name] if name in VARIANTS else (name, *SETTINGS[name])
    counts, flops = run_counted(shaped, method_name, budget, overrides, *one_prompt(shaped))
    assert flops % 2 == 0
    assert counts[0]["overhead_macs"] == flops // 2, (counts[0]["overhead_macs"], flops // 2)


@pytest.mark.parametrize("name", ["fastv", "dart", "sparsevlm"])
def test_scores_from_the_previous_layer_read_its_keys_from_the_cache(shaped, name):
    """Layer K−1 ran already and stored its keys: the step reads them instead of projecting the sequence
    again (one k projection of L tokens less per pruning layer); without a cache it projects them, and
    the recorded overhead follows, equal to FlopCounterMode's count either way."""
    ids, mask, pixels = one_prompt(shaped)
    cached, cached_flops = run_counted(shaped, name, *SETTINGS[name], ids, mask, pixels, use_cache=True)
    projected, projected_flops = run_counted(shaped, name, *SETTINGS[name], ids, mask, pixels, use_cache=False)
    assert cached[0]["overhead_macs"] == cached_flops // 2 and projected[0]["overhead_macs"] == projected_flops // 2
    config = shaped.config.text_config
    kv_width = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    k_projections = sum(length * config.hidden_size * kv_width                   # L·D·D_kv at each pruning layer
                        for layer, length in enumerate(projected[0]["llm"])
                        if layer + 1 < len(projected[0]["llm"])
                        and projected[0]["llm_visual"][layer + 1] < projected[0]["llm_visual"][layer])
    assert projected[0]["overhead_macs"] - cached[0]["overhead_macs"] == k_projections > 0


@pytest.mark.parametrize("image_size", [(40, 56), (64, 120)])
def test_sparsevlm_rates_the_prompts_own_image_tokens_where_images_differ_in_size(image_size):
    """On Qwen2-VL an image's token count is its own (35 and 120 here, against the tiny model's nominal
    1,280): SparseVLM's rater logits are counted over the prompt's N0, as FlopCounterMode counts them."""
    from helpers_tiny import qwen_inputs, tiny_qwen

    model, dims = tiny_qwen("qwen2_vl", patch_size=4, window_size=16, llm_layers=3)
    inputs = qwen_inputs(dims, [image_size])
    flops: list[int] = []
    with ficoco.apply(model, counted("sparsevlm", flops), ficoco.ImageTokens(20), layers=[0, 1],
                      keeps=[16, 8]) as handle, torch.no_grad():
        model(**inputs, logits_to_keep=1)
    counts, = handle.last_counts()
    assert counts["llm_visual"][0] == dims.image_tokens(*image_size) < dims.visual_tokens
    assert flops and counts["overhead_macs"] == sum(flops) // 2


def test_every_method_is_checked():
    assert set(method_names()) == set(SETTINGS)


def test_reducing_methods_count_work(shaped):
    """A method whose step scores with attention rows, similarities or merges records work > 0; the
    unreduced model none."""
    ids, mask, pixels = one_prompt(shaped)
    assert run_counted(shaped, "vanilla", None, {}, ids, mask, pixels)[0][0]["overhead_macs"] == 0
    for name in ("ficoco-v", "ficoco-l", "fastv", "divprune", "tome"):
        assert run_counted(shaped, name, *SETTINGS[name], ids, mask, pixels)[0][0]["overhead_macs"] > 0, name


def test_batch_rows_count_their_own_lengths(shaped):
    """In a left-padded batch each row's overhead is the one it has alone (padding excluded)."""
    image_tokens = n_placeholders(shaped)
    prompts = [prompt(image_tokens, [10, 11], [12, 13, 14, 15]), prompt(image_tokens, [10], [12, 13])]
    pixels = images(2, 336, seed=4)
    for name in ("ficoco-l", "fastv", "ficoco-vl"):
        budget, overrides = SETTINGS[name]
        ids, mask = left_padded(prompts)
        batched, _ = run_counted(shaped, name, budget, overrides, ids, mask, pixels)
        for row, single in enumerate(prompts):
            alone_ids = torch.tensor([single])
            alone, _ = run_counted(shaped, name, budget, overrides, alone_ids, torch.ones_like(alone_ids),
                                   pixels[row:row + 1])
            assert batched[row]["overhead_macs"] == alone[0]["overhead_macs"], (name, row)


def test_overhead_reaches_the_cost_record(shaped):
    """sample_cost reports it separately: total_with_overhead = total + overhead."""
    from ficoco.dims import ModelDims
    from ficoco.flops import sample_cost

    ids, mask, pixels = one_prompt(shaped)
    with ficoco.apply(shaped, "ficoco-v", 128, start=1) as handle, torch.no_grad():
        shaped(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        counts = handle.last_counts()[0]
    cost = sample_cost(ModelDims.from_config(shaped.config), counts, generated_tokens=1)
    assert cost["overhead_macs"] == counts["overhead_macs"] > 0
    assert cost["total_with_overhead_macs"] == cost["total_macs"] + cost["overhead_macs"]

"""FiCoCo-V inside the Qwen2-VL and Qwen2.5-VL towers (ficoco/models/qwen_tower.py): whole 2 × 2 merge groups,
the CLS-free key-mean semantic term, the kept tokens dropped at LLM layer 0 with their 3-D positions.

References are independent of the adapter: a float64 recomputation of the reducing block's scores, a float64
tower that hides the dropped patches as keys (windows included), and the unpatched model that hides the
dropped visual tokens from LLM layer 0 on, fed the reduced tower's features.
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers_tiny import IMAGE, masked_forward, qwen_inputs, tiny_qwen

import ficoco
from ficoco import methods
from ficoco.invariants import check_counts
from ficoco.models.qwen_tower import GroupScores, group_attention
from ficoco.qwen_dims import qwen_image_plan
from transformers import DynamicCache

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
SIZES = [(112, 224), (224, 224)]                      # 8 × 16 and 16 × 16 patches: 32 and 64 visual tokens
BUDGET = 640                                          # of the nominal 1,280 tokens: half of every image
FICOCO_V = {"semantic": "key-mean", "start": 0}       # tiny towers: Qwen2-VL's blocks 0..1, Qwen2.5-VL's block 1


@pytest.fixture(scope="module", params=FAMILIES)
def model_and_dims(request):
    return tiny_qwen(request.param, attention="sdpa")


def run(model, inputs, budget=BUDGET, **overrides):
    """One prefill under FiCoCo-V: (logits, counts, plans, trace, the tower's output features)."""
    features = []
    hook = model.model.visual.register_forward_hook(lambda module, args, output: features.append(output.pooler_output))
    try:
        with ficoco.apply(model, "ficoco-v", budget, **{**FICOCO_V, **overrides}) as handle, torch.no_grad():
            logits = model(**inputs).logits
            counts, plans, trace = handle.last_counts(), handle.row_plans(), handle.last_trace()
    finally:
        hook.remove()
    return logits, counts, plans, trace, features[0]


@pytest.mark.parametrize("max_elements", [1 << 26, 2 * 12 * 4])        # all rows at once, or 4 rows a chunk
def test_group_attention_is_attention_and_pools_each_groups_patches(max_elements):
    """The output is attention's (PyTorch's SDPA); a group attends to another with its patches' mean over the
    other's patches summed (a loop over groups, in float64); a group's key is its patches' mean key."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 5, generator=generator) for _ in range(3))    # (H, n, d): 3 groups of 4 patches
    out, pooled = group_attention(q, k, v, 0.5, 4, max_elements)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5)   # (H, n, d)
    torch.testing.assert_close(out, expected.transpose(0, 1).reshape(12, 10))
    head_mean = (q.double() @ k.double().transpose(-1, -2) * 0.5).softmax(-1).mean(0)
    for i in range(3):
        for j in range(3):
            block = head_mean[4 * i:4 * i + 4, 4 * j:4 * j + 4]
            assert abs(float(pooled[i, j]) - float(block.sum(1).mean())) < 1e-6
    scores = GroupScores(pooled, k, 4)
    for i in range(3):
        torch.testing.assert_close(scores.keys()[0, :, i], k[:, 4 * i:4 * i + 4].mean(1))
    torch.testing.assert_close(scores.probs()[0].sum(-1), torch.ones(3))
    torch.testing.assert_close(scores.rows(torch.tensor([[2, 0]])), scores.probs()[:, [2, 0]])


@pytest.mark.parametrize("image_size", SIZES)
@pytest.mark.parametrize("budget", [BUDGET, ficoco.ImageTokens(20)])
def test_each_image_keeps_its_plans_groups_block_by_block(model_and_dims, image_size, budget):
    model, dims = model_and_dims
    inputs = qwen_inputs(dims, [image_size])
    _, (counts,), (plan,), trace, _ = run(model, inputs, budget)
    grid = dims.patch_grid(*image_size)
    alone = methods.get("ficoco-v").plan(dims.for_image_grid(grid), 20 if budget != BUDGET else
                                         dims.image_tokens(*image_size) // 2, **FICOCO_V)
    assert plan == alone and plan.delivered < dims.image_tokens(*image_size)
    check_counts("ficoco-v", plan, counts, has_image=True)                   # blocks, delivered, every LLM layer
    assert counts["visual_delivered"] == plan.delivered and counts["llm_visual"] == [plan.delivered] * 4
    span = dims.image_tokens(*image_size)
    assert counts["llm"] == [inputs["input_ids"].shape[1] - span + plan.delivered] * 4
    last = max(trace["vision"])
    kept, = trace["vision"][last]
    assert len(set(kept.tolist())) == plan.delivered and int(kept.max()) < span
    reducing = [layer for layer in range(dims.vision_layers) if dims.attends_whole_image(layer)]
    assert sorted(trace["vision"]) == reducing                                 # Qwen2.5-VL: its full block only
    assert counts["overhead_macs"] > 0


def test_an_image_within_a_count_for_every_image_is_kept_whole(model_and_dims):
    model, dims = model_and_dims
    inputs = qwen_inputs(dims, [SIZES[0]])                                    # 32 tokens, within a count of 40
    with torch.no_grad():
        plain = model(**inputs).logits
    logits, (counts,), _, trace, _ = run(model, inputs, ficoco.ImageTokens(40))
    assert torch.equal(logits, plain) and trace["vision"] == {} and counts["visual_delivered"] == 32


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The tower's rotary embedding of x (n, H, d) at per-patch (cos, sin) tables (n, d), written out."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin[:, None]


def float64_scores(model, inputs, layer: int, lam: float) -> torch.Tensor:
    """FiCoCo-V's redundancy of every merge group of the one image at tower block `layer`, recomputed in float64
    from the unpatched block's input: λ·(attention the group receives from the other groups)
    − (1−λ)·cos(μ, K̄_g),
    with groups pooled from the head-mean patch attention and the head-mean keys (raster order)."""
    captured = {}

    def capture(block, args, kwargs):
        captured.update(hidden=args[0], **kwargs)
    visual = model.model.visual
    permute = visual.permute_input_for_window_attn if hasattr(visual, "fullatt_block_indexes") else None
    handle = visual.blocks[layer].register_forward_pre_hook(capture, with_kwargs=True)
    windows = {}
    if permute is not None:
        visual.permute_input_for_window_attn = lambda hidden, index, *a, **k: (windows.setdefault("index", index),
                                                                              permute(hidden, index, *a, **k))[1]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
        visual.__dict__.pop("permute_input_for_window_attn", None)
    block = copy.deepcopy(visual.blocks[layer]).double()
    hidden = captured["hidden"].double()
    cos, sin = (table.double() for table in captured["position_embeddings"])
    n, heads = hidden.shape[0], block.attn.num_heads
    q, k, _ = block.attn.qkv(block.norm1(hidden)).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rotary(q, cos, sin), rotary(k, cos, sin)
    probs = (torch.einsum("qhd,khd->hqk", q, k) * block.attn.scaling).softmax(-1).mean(0)    # (n, n)
    groups = n // 4
    order = windows.get("index", torch.arange(groups))                       # raster group at each tower position
    pooled = torch.zeros(groups, groups, dtype=torch.float64)
    keys = torch.zeros(groups, k.shape[-1], dtype=torch.float64)
    for a in range(groups):
        keys[order[a]] = k[4 * a:4 * a + 4].mean(1).mean(0)
        for b in range(groups):
            pooled[order[a], order[b]] = probs[4 * a:4 * a + 4, 4 * b:4 * b + 4].sum(1).mean()
    received = torch.tensor([(pooled[:, g].sum() - pooled[g, g]) / (groups - 1) for g in range(groups)])
    mean_key = keys.mean(0)
    similarity = torch.nn.functional.cosine_similarity(keys, mean_key[None], dim=-1)
    return lam * received + (1 - lam) * similarity


@pytest.mark.parametrize("lam", [0.35, 1.0])                   # 1.0: the attention term alone
def test_the_kept_groups_are_those_of_a_float64_recomputation_of_the_scores(model_and_dims, lam):
    """Without the local penalty (coef 1) the dropped groups are the highest-redundancy ones."""
    model, dims = model_and_dims
    inputs = qwen_inputs(dims, [SIZES[1]])
    first = min(layer for layer in range(dims.vision_layers) if dims.attends_whole_image(layer))
    _, _, (plan,), trace, _ = run(model, inputs, coef=1.0, k=0, lam=lam)
    with torch.no_grad():
        scores = float64_scores(model, inputs, first, lam=lam)
    discards = plan.vision.discards[0]
    expected = sorted(scores.argsort(descending=True)[discards:].tolist())
    assert sorted(trace["vision"][first][0].tolist()) == expected


def float64_masked_tower(model, inputs, dropped_after: dict[int, set[int]]) -> torch.Tensor:
    """The unpatched tower in float64 whose attention hides the patches of the dropped groups as keys in every
    block after the one that dropped them (windows as the tower cuts them); (G, d) features in raster order."""
    tower = copy.deepcopy(model.model.visual).double()
    windows = {}
    if hasattr(tower, "fullatt_block_indexes"):
        permute = tower.permute_input_for_window_attn
        tower.permute_input_for_window_attn = lambda hidden, index, *a, **k: (windows.setdefault("index", index),
                                                                             permute(hidden, index, *a, **k))[1]
    hidden_groups: set[int] = set()                                           # raster groups hidden as keys

    def masked_attention(attention):
        def forward(hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
            n, heads = hidden_states.shape[0], attention.num_heads
            q, k, v = attention.qkv(hidden_states).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = (rotary(x, *position_embeddings) for x in (q, k))
            order = windows.get("index", torch.arange(n // 4))
            hidden_key = torch.tensor([int(order[p // 4]) in hidden_groups for p in range(n)])
            out = torch.zeros_like(q)
            bounds = cu_seqlens.tolist()
            for start, end in zip(bounds, bounds[1:]):
                logits = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]) * attention.scaling
                logits[:, :, hidden_key[start:end]] = float("-inf")
                weights = logits.softmax(-1).nan_to_num()                      # a window wholly hidden: unused
                out[start:end] = torch.einsum("hqk,khd->qhd", weights, v[start:end])
            return attention.proj(out.reshape(n, -1))
        return forward

    handles = []
    for index, block in enumerate(tower.blocks):
        block.attn.forward = masked_attention(block.attn)

        def pre_hook(module, args, index=index):
            hidden_groups.update(dropped_after.get(index - 1, set()))
        handles.append(block.register_forward_pre_hook(pre_hook))
    with torch.no_grad():
        output = tower(inputs["pixel_values"].double(), grid_thw=inputs["image_grid_thw"]).pooler_output
    return output


def test_the_reduced_tower_equals_a_float64_tower_that_hides_the_dropped_patches(model_and_dims):
    """Pruning (k = 0): the kept groups' features are those of the unpatched tower whose later blocks' attention
    does not see the dropped patches, so the rotary rows, the per-image and per-window sequence lengths and the
    merger's rows of the reduced sequence are the right ones."""
    model, dims = model_and_dims
    inputs = qwen_inputs(dims, [SIZES[1]])
    _, _, _, trace, features = run(model, inputs, k=0)
    dropped_after, alive = {}, set(range(64))
    for layer in sorted(trace["vision"]):
        kept = set(trace["vision"][layer][0].tolist())
        dropped_after[layer], alive = alive - kept, kept
    reference = float64_masked_tower(model, inputs, dropped_after)
    kept = sorted(alive)
    torch.testing.assert_close(features[kept].double(), reference[kept], rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(features[sorted(set(range(64)) - alive)]) == 0     # dropped: no feature


def test_cached_decoding_equals_a_recompute_that_hides_the_dropped_tokens_from_layer_0(model_and_dims):
    """The LLM sees the reduced tower's features at the kept tokens, in their original 3-D positions, and not
    the dropped ones: cached `generate`, and a plain decode step, equal the unpatched model fed those features
    with the dropped tokens hidden as keys from layer 0 on."""
    model, dims = model_and_dims
    inputs = qwen_inputs(dims, [SIZES[0]])
    ids = inputs["input_ids"]
    features = []
    hook = model.model.visual.register_forward_hook(lambda module, args, output: features.append(output.pooler_output))
    try:
        with ficoco.apply(model, "ficoco-v", BUDGET, **FICOCO_V) as handle, torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            kept = handle.last_trace()["llm"][0][0].tolist()                  # kept positions in the sequence
            first = model(**inputs, cache=DynamicCache(config=model.config))
            step = model(input_ids=first.logits[:, -1:].argmax(-1), cache=first.cache)
            with pytest.raises(ValueError, match="ficoco-v: a decode step on a KV cache whose prefill this handle "
                                                 "did not see"):
                unseen = model(**inputs, use_cache=True).cache
                model(input_ids=first.logits[:, -1:].argmax(-1), cache=unseen)
    finally:
        hook.remove()
    image = [position for position in range(ids.shape[1]) if ids[0, position] == IMAGE]
    dropped = set(image) - set(kept)
    assert len(kept) == 16 and dropped
    overwrite = {0: {position: features[0][row] for row, position in enumerate(image)}}

    def recompute(prefix):
        logits, _, _ = masked_forward(model, prefix, inputs["pixel_values"], hidden_from={0: dropped},
                                      overwrite=overwrite, image_grid_thw=inputs["image_grid_thw"],
                                      mm_token_type_ids=(prefix == IMAGE).int())
        return logits[-1]
    sequence = out.sequences[0]
    for index, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0], recompute(sequence[: ids.shape[1] + index][None]),
                                   rtol=1e-4, atol=1e-5)
    prefix = torch.cat([ids, first.logits[:, -1:].argmax(-1)], dim=1)
    torch.testing.assert_close(step.logits[0, -1], recompute(prefix), rtol=1e-4, atol=1e-5)


def test_a_batch_of_two_images_of_different_sizes_and_one_span_equals_each_alone(model_and_dims):
    """Images of 8 × 16 and 16 × 8 patches (32 tokens each) in one tower call: each reduced on its own grid."""
    model, dims = model_and_dims
    batch = qwen_inputs(dims, [(112, 224), (224, 112)], seed=3)
    patches = batch["pixel_values"].shape[0] // 2
    rows = [qwen_inputs(dims, [(112, 224)], seed=3), qwen_inputs(dims, [(224, 112)], seed=3)]
    rows[1] = {**rows[1], "pixel_values": batch["pixel_values"][patches:]}
    together, counts, plans, _, _ = run(model, batch)
    alone = [run(model, row) for row in rows]
    assert plans[0].vision.grid_hw == [4, 8] and plans[1].vision.grid_hw == [8, 4]
    for row in range(2):
        torch.testing.assert_close(together[row], alone[row][0][0], rtol=1e-5, atol=1e-6)
        assert counts[row] == alone[row][1][0]
    with ficoco.apply(model, "ficoco-v", BUDGET, **FICOCO_V), torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        generated_alone = [model.generate(**row, max_new_tokens=3, min_new_tokens=3, do_sample=False) for row in rows]
    assert all(torch.equal(generated[row], generated_alone[row][0]) for row in range(2))


def test_remove_restores_the_model_bit_for_bit(model_and_dims):
    model, dims = model_and_dims
    inputs = qwen_inputs(dims, [SIZES[1]])
    with torch.no_grad():
        before = model(**inputs).logits
    handle = ficoco.apply(model, "ficoco-v", BUDGET, **FICOCO_V)
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] < before.shape[1]
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    visual = model.model.visual
    assert all("forward" not in block.__dict__ for block in visual.blocks)
    assert "permute_input_for_window_attn" not in visual.__dict__


def test_the_nominal_plan_reduces_in_the_blocks_that_attend_over_the_whole_image():
    """Qwen2-VL-7B: every block from 12 on; Qwen2.5-VL-7B: its full-attention blocks 15, 23 and 31 only."""
    from ficoco.qwen_dims import qwen_vl_dims

    method = methods.get("ficoco-v")
    for shape, layers in (("qwen2-vl-7b", list(range(12, 32))), ("qwen2.5-vl-7b", [15, 23, 31])):
        dims = qwen_vl_dims(shape)
        plan = qwen_image_plan(method, dims, dims.nominal_grid, ficoco.ImageTokens(600), semantic="key-mean")
        assert plan.vision.layers == layers and plan.delivered == 600 and plan.vision.patches_out[-1] == 600
        assert plan.vision_counts[-1] == [plan.vision_counts[layers[-1]][0], 2400]
    with pytest.raises(ValueError, match=r"start=16, end=22: no layer of that range attends over the whole image .*"
                                         r"\[7, 15, 23, 31\]"):
        method.plan(qwen_vl_dims("qwen2.5-vl-7b"), 600, semantic="key-mean", start=16, end=22)
    with pytest.raises(ValueError, match="start=32, end=31: need 0 <= start <= end <= 31"):
        method.plan(qwen_vl_dims("qwen2-vl-7b"), 600, semantic="key-mean", start=32)

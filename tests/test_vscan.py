"""VScan (`ficoco/methods/vscan.py`): the tower-side selection and merge against a plain-Python loop
written from the authors' `encode_images` / `window_cls_selection` / `token_merging`, the budget
mapping and its errors, and the method on a LLaVA-shaped tiny model with 4 LLM layers (counts equal
the plan, the kept patches and merged tokens equal the loop run on the untouched tower's eager
attention and features, cached generation equals a full recompute, a batch of two equals each prompt
alone, `remove()` restores bit-identical outputs).
"""
from __future__ import annotations

import pytest
import torch
from helpers_tiny import (eager_attention, generate_batch_and_alone, images, llava_shaped, n_placeholders,
                          one_image_prompt, prompt)

import ficoco
from ficoco import methods
from ficoco.budget import InfeasibleBudget
from ficoco.contract import ImageTokens, VisionTokens
from ficoco.dims import llava_1_5_dims
from ficoco.methods.vscan import GlobalScan, LocalScan, MergeProjected, split
from ficoco.paradigm.filter import window_top_k

DIMS_7B = llava_1_5_dims("7b")


# ------------------------------------------------------------------------------------------------
# The reference: the authors' selection and merge as plain loops (float64 cosines)

def reference_selection(local_attention: list[float], global_attention: list[float], delivered: int, ratio: float,
                        window: int, side: int) -> list[int]:
    """Kept raster positions, ascending. Local: the ⌊⌊r·V⌋/windows⌋ most attended cells of every
    window (layer `local_layer`'s CLS row); global: the rest of V among the other cells by the feature
    layer's CLS row. Ties: the lower position."""
    per_side = side // window
    per_window = int(delivered * ratio) // per_side ** 2
    local = []
    for window_row in range(per_side):
        for window_col in range(per_side):
            cells = [(window_row * window + dy) * side + window_col * window + dx
                     for dy in range(window) for dx in range(window)]
            local += sorted(cells, key=lambda cell: (-local_attention[cell], cell))[:per_window]
    others = [cell for cell in range(side * side) if cell not in set(local)]
    chosen = sorted(others, key=lambda cell: (-global_attention[cell], cell))[:delivered - len(local)]
    return sorted(local + chosen)


def reference_merge(x: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """Every token not kept joins the kept token of highest cosine (the lowest position on ties); each
    kept token becomes the mean of itself and its joiners. x: (N, D) -> (len(kept), D) float64."""
    x = x.double()
    unit = x / x.norm(dim=-1, keepdim=True)
    sums, counts = {j: x[j].clone() for j in kept}, {j: 1 for j in kept}
    for i in range(x.shape[0]):
        if i in counts:
            continue
        best = max(kept, key=lambda j: (float(unit[i] @ unit[j]), -j))
        sums[best] += x[i]
        counts[best] += 1
    return torch.stack([sums[j] / counts[j] for j in kept])


class _Rows:
    """A `VisionScores` whose CLS row is given (local scan)."""

    def __init__(self, cls_row: torch.Tensor):
        self._cls_row = cls_row                                                # (B, 1+N)

    def rows(self, queries: torch.Tensor) -> torch.Tensor:
        assert queries.shape[1] == 1 and not queries.any()                    # only the CLS query is asked for
        return self._cls_row[:, None]


class _ClsRow:
    """A `VisionOutputScores` whose CLS row is given (global scan)."""

    def __init__(self, cls_row: torch.Tensor):
        self._cls_row = cls_row

    def cls_row(self) -> torch.Tensor:
        return self._cls_row


def _tower_side(hidden, local_row, global_row, projector, delivered, ratio, window, side):
    """The three tower-side reductions chained as the adapter runs them: the local scan reorders the
    patches, the later layers (here: none) keep that order, the global scan sees its CLS row in that
    order, the merge gets the projected tokens."""
    per_window, global_count = split(delivered, ratio, (side // window) ** 2)
    batch, tokens, _ = hidden.shape
    local = LocalScan(per_window=per_window, window=window, grid_hw=(side, side))
    reordered = local(0, VisionTokens(hidden, torch.arange(tokens - 1).expand(batch, -1)), _Rows(local_row))
    current_row = torch.cat([global_row[:, :1], global_row[:, 1:].gather(1, reordered.positions)], dim=1)
    scan = GlobalScan(local_count=delivered - global_count, global_count=global_count)
    selected = scan(1, reordered, _ClsRow(current_row))
    projected = projector(selected.hidden)
    merged = MergeProjected(kept=delivered)(0, ImageTokens(projected, None), None)
    return selected, merged


@pytest.mark.parametrize("side, window, delivered, ratio", [
    (24, 6, 96, 0.5), (24, 6, 100, 0.5), (24, 6, 60, 1.0), (12, 3, 40, 0.3), (12, 4, 144, 0.5),
    (12, 6, 5, 0.5), (12, 12, 30, 0.5), (12, 2, 77, 0.0)])
def test_selection_and_merge_equal_the_loop_on_random_inputs(side, window, delivered, ratio):
    generator = torch.Generator().manual_seed(side + window + delivered)
    n = side * side
    hidden = torch.randn(2, 1 + n, 12, generator=generator)                   # two images, CLS first
    local_row, global_row = torch.rand(2, 1 + n, generator=generator), torch.rand(2, 1 + n, generator=generator)
    weight = torch.randn(12, 20, generator=generator)                          # a projector to another width
    selected, merged = _tower_side(hidden, local_row, global_row, lambda x: x @ weight, delivered, ratio, window,
                                   side)
    for row in range(2):
        kept = reference_selection(local_row[row, 1:].tolist(), global_row[row, 1:].tolist(), delivered, ratio,
                                   window, side)
        assert len(kept) == delivered
        assert selected.positions[row, :delivered].tolist() == kept            # kept first, positional order
        assert sorted(selected.positions[row].tolist()) == list(range(n))      # every patch goes on to the projector
        assert torch.equal(selected.hidden[row], hidden[row, 1:][selected.positions[row]])
        expected = reference_merge(hidden[row, 1:] @ weight, kept)
        torch.testing.assert_close(merged.hidden[row].double(), expected, rtol=1e-5, atol=1e-5)
    assert merged.positions is None


def test_ties_go_to_the_lower_position():
    """Three attention levels, so most windows and the global ranking tie; duplicated feature rows, so
    cosines tie exactly."""
    generator = torch.Generator().manual_seed(3)
    side, window, delivered = 12, 3, 50
    prototypes = torch.randn(4, 8, generator=generator)
    hidden = prototypes[torch.randint(0, 4, (2, 1 + side * side), generator=generator)]
    local_row = torch.randint(0, 3, (2, 1 + side * side), generator=generator).float()
    global_row = torch.randint(0, 3, (2, 1 + side * side), generator=generator).float()
    selected, merged = _tower_side(hidden, local_row, global_row, lambda x: x, delivered, 0.5, window, side)
    for row in range(2):
        kept = reference_selection(local_row[row, 1:].tolist(), global_row[row, 1:].tolist(), delivered, 0.5,
                                   window, side)
        assert selected.positions[row, :delivered].tolist() == kept
        torch.testing.assert_close(merged.hidden[row].double(), reference_merge(hidden[row, 1:], kept),
                                   rtol=1e-5, atol=1e-5)


def test_window_top_k_takes_k_per_window_and_refuses_a_window_that_does_not_tile():
    scores = torch.arange(16.0).view(1, 16)                                    # 4x4 grid, raster order
    assert window_top_k(scores, (4, 4), 2, 1).tolist() == [[5, 7, 13, 15]]     # each 2x2 window's bottom-right
    assert window_top_k(scores, (4, 4), 2, 0).shape == (1, 0)
    with pytest.raises(ValueError, match="window=3 must be >= 1 and divide both sides of the 4x4 grid"):
        window_top_k(scores, (4, 4), 3, 1)
    with pytest.raises(ValueError, match=r"k must be in \[0, 4\] .* got 5"):
        window_top_k(scores, (4, 4), 2, 5)


# ------------------------------------------------------------------------------------------------
# Budgets and parameters (no model)

@pytest.mark.parametrize("budget, delivered, local, keep", [(192, 288, 144, 96), (128, 192, 96, 64), (64, 96, 48, 32)])
def test_the_paper_budgets_split_as_the_authors_setting(budget, delivered, local, keep):
    """B = 64 is the authors' README setting: 96 tokens from the tower, 32 from LLM layer 16 on."""
    plan = methods.get("vscan").check_budget(DIMS_7B, budget)
    post = plan.post_vision
    assert (post.site, post.layer, post.tokens_out, plan.delivered) == ("vision_output", 22, delivered, delivered)
    assert post.details == {"local": local, "global": delivered - local, "per_window": local // 16}
    assert (plan.vision.layers, plan.vision.discards, plan.vision.patches_out) == ([5], [0], [576])
    assert plan.vision_counts == [[577, 577]] * 23                             # the tower keeps every token
    assert (plan.llm.layers, plan.llm.n0, plan.llm.visual_out) == ([16], delivered, [keep])
    assert plan.llm_visual == [delivered] * 16 + [keep] * 16 and plan.layer_average == budget


@pytest.mark.parametrize("budget", [2, 3, 17, 55, 65, 100, 250, 383, 384, 385, 500, 576])
def test_every_budget_averages_at_most_b(budget):
    plan = methods.get("vscan").check_budget(DIMS_7B, budget)
    delivered = min(int(1.5 * budget + 0.5), 576)
    keep = min((32 * budget - 16 * delivered) // 16, delivered)
    assert plan.delivered == delivered and plan.llm_visual == [delivered] * 16 + [keep] * 16
    assert plan.layer_average <= budget
    assert sum(plan.post_vision.details[part] for part in ("local", "global")) == delivered


def test_a_local_pick_count_that_does_not_fill_the_windows_goes_to_the_global_scan():
    """B = 100: V = 150, ⌊0.5·150⌋ = 75 local picks do not split over 16 windows; 4 per window (64), and
    the global scan takes the other 86 (the authors' code would take 75 and deliver 139)."""
    details = methods.get("vscan").check_budget(DIMS_7B, 100).post_vision.details
    assert details == {"local": 64, "global": 86, "per_window": 4}


def test_the_pruning_layer_and_the_split_can_be_set():
    plan = methods.get("vscan").check_budget(DIMS_7B, 64, layer=8, vision_factor=2, local_ratio=0.25)
    assert plan.delivered == 128 and plan.llm.layers == [8]
    assert plan.llm.visual_out == [(32 * 64 - 128 * 8) // 24] and plan.layer_average <= 64
    assert plan.post_vision.details == {"local": 32, "global": 96, "per_window": 2}
    unreduced = methods.get("vscan").check_budget(DIMS_7B, None)
    assert unreduced.delivered == 576 and unreduced.layer_average == 576 and methods.get("vscan").steps(unreduced) == ()


def test_bad_budgets_and_parameters_name_the_value_and_the_valid_range():
    method = methods.get("vscan")
    for budget in (0, 577):
        with pytest.raises(ValueError, match=rf"vscan: budget {budget} must be in \[1, 576\]"):
            method.check_budget(DIMS_7B, budget)
    with pytest.raises(InfeasibleBudget, match=r"vscan: budget B=1 is infeasible with pruning at layer K=16: the "
                                               r"minimum achievable average is 1\.50 .* K <= 0 \(the LLM starts "
                                               r"from the V=2 tokens"):
        method.check_budget(DIMS_7B, 1)
    with pytest.raises(ValueError, match=r"vscan: local_layer=22: need 0 <= local_layer <= 21 \(a CLIP layer before "
                                         r"the feature layer 22"):
        method.check_budget(DIMS_7B, 64, local_layer=22)
    with pytest.raises(ValueError, match=r"vscan: window=5 must divide the side of the 24x24 patch grid; valid: "
                                         r"\[1, 2, 3, 4, 6, 8, 12, 24\]"):
        method.check_budget(DIMS_7B, 64, window=5)
    with pytest.raises(ValueError, match=r"vscan: layer=32: need 0 <= layer <= 31 \(the 32 LLM layers\)"):
        method.check_budget(DIMS_7B, 64, layer=32)
    with pytest.raises(ValueError, match=r"vscan: vision_factor=0\.001 x budget 64 rounds to 0 tokens"):
        method.check_budget(DIMS_7B, 64, vision_factor=0.001)
    for name, value, message in [("local_ratio", 1.5, r"must be a number in \[0, 1\]"),
                                 ("vision_factor", 0, "must be a finite number > 0"),
                                 ("window", 0, "must be an integer >= 1"),
                                 ("local_layer", -1, "must be an integer >= 0"),
                                 ("layer", 2.5, "must be an integer >= 0")]:
        with pytest.raises(ValueError, match=rf"vscan: {name}={value!r} {message}"):
            method.check_budget(DIMS_7B, 64, **{name: value})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['ratio'\]; valid parameters: vision_factor, "
                                         r"local_ratio, window, local_layer, layer"):
        method.check_budget(DIMS_7B, 64, ratio=0.5)


def test_the_registry_describes_it():
    method = methods.get("vscan")
    assert (method.phase, method.acts_on) == ("both", ("vision", "projector", "llm"))
    assert method.defaults == {"vision_factor": 1.5, "local_ratio": 0.5, "window": 6, "local_layer": 5, "layer": None}
    assert set(method.stages) == {"filter", "correlate", "compress"} and "CLS rows" in method.needs_attention


# ------------------------------------------------------------------------------------------------
# On a LLaVA-shaped model: 577 vision tokens, CLIP layers 0..1 run (LLaVA reads layer 1), 4 LLM layers

SHAPE = dict(vision_layers=3, vision_hidden=32, vision_heads=2, vision_mlp=64, llm_layers=4, llm_hidden=32,
             llm_heads=2, llm_mlp=64)
LOCAL_LAYER, FEATURE_LAYER = 0, 1
BUDGET, DELIVERED, KEEP = 64, 96, 32               # LLM layer 2 keeps ⌊(4·64 − 96·2)/2⌋ = 32: average 64
BEFORE, AFTER = [10, 11], [12, 13, 14]
TEXT = 1 + len(BEFORE) + len(AFTER)
IMAGE_START = 1 + len(BEFORE)


@pytest.fixture(scope="module")
def model():
    return llava_shaped(**SHAPE)


@pytest.fixture(scope="module")
def inputs(model):
    return one_image_prompt(model, BEFORE, AFTER)


def _run(model, inputs, **overrides):
    """One reduced forward: what the projector received and returned, the LLM input, counts, trace, plan."""
    seen = {}
    projector = model.model.multi_modal_projector
    with ficoco.apply(model, "vscan", BUDGET, local_layer=LOCAL_LAYER, **overrides) as handle, torch.no_grad():
        probes = [projector.register_forward_pre_hook(lambda module, args: seen.update(projector_input=args[0])),
                  projector.register_forward_hook(lambda module, args, out: seen.update(projected=out)),
                  model.model.language_model.register_forward_pre_hook(
                      lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)]
        try:
            model(input_ids=inputs[0], attention_mask=inputs[1], pixel_values=inputs[2])
        finally:
            for probe in probes:
                probe.remove()
        seen.update(counts=handle.last_counts()[0], trace=handle.last_trace(), plan=handle.plan)
    return seen


def test_counts_kept_patches_and_merged_tokens_equal_the_loop(model, inputs):
    """The loop runs on the untouched tower's eager attention (layers 0 and 1) and layer-1 output."""
    tower = model.model.vision_tower
    with torch.no_grad(), eager_attention(tower):
        untouched = tower(inputs[2], output_hidden_states=True, output_attentions=True)
        features = untouched.hidden_states[FEATURE_LAYER + 1][0, 1:]                       # (576, D)
        projected = model.model.multi_modal_projector(features)                            # (576, D_llm)
    local_row = untouched.attentions[LOCAL_LAYER][0, :, 0].double().mean(0)[1:].tolist()
    global_row = untouched.attentions[FEATURE_LAYER][0, :, 0].double().mean(0)[1:].tolist()
    kept = reference_selection(local_row, global_row, DELIVERED, 0.5, 6, 24)

    run = _run(model, inputs)
    counts, plan = run["counts"], run["plan"]
    assert counts["vision"] == [[577, 577]] * 2 == plan.vision_counts
    assert counts["visual_delivered"] == DELIVERED == plan.delivered
    assert counts["llm_visual"] == [DELIVERED, DELIVERED, KEEP, KEEP] == plan.llm_visual
    assert counts["llm"] == [TEXT + DELIVERED] * 2 + [TEXT + KEEP] * 2
    assert run["trace"]["vision"][FEATURE_LAYER][0, :DELIVERED].tolist() == kept
    assert run["projector_input"].shape[1] == 576                              # the projector runs on every patch
    torch.testing.assert_close(run["projected"][0].double(), reference_merge(projected, kept), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run["embeds"][0, IMAGE_START:IMAGE_START + DELIVERED], run["projected"][0])
    pruned = run["trace"]["llm"][2][0]
    assert pruned.shape == (KEEP,) and bool(((pruned >= IMAGE_START) & (pruned < IMAGE_START + DELIVERED)).all())


def test_cached_generation_equals_full_recompute(model, inputs):
    """Every decoding step of the cached run against the unmodified LLM re-run without a cache on the
    whole sequence: the prefill's reduced input embeddings (the merged tokens) and the generated
    tokens, the tokens LLM layer 2 pruned hidden as keys from that layer on."""
    language = model.model.language_model
    prefill = {}

    def record(module, args, kwargs):
        prefill.setdefault("embeds", kwargs["inputs_embeds"])                 # the first call is the prefill

    with ficoco.apply(model, "vscan", BUDGET, local_layer=LOCAL_LAYER) as handle, torch.no_grad():
        probe = language.register_forward_pre_hook(record, with_kwargs=True)
        try:
            out = model.generate(input_ids=inputs[0], attention_mask=inputs[1], pixel_values=inputs[2],
                                 max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        finally:
            probe.remove()
        kept = set(handle.last_trace()["llm"][2][0].tolist())
    embeds = prefill["embeds"]                                                 # (1, TEXT + DELIVERED, D)
    hidden = set(range(IMAGE_START, IMAGE_START + DELIVERED)) - kept

    def mask(length):
        allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))
        allowed[:, sorted(hidden)] = False
        return (allowed | torch.eye(length, dtype=torch.bool))[None, None]    # a hidden query still sees itself

    generated = out.sequences[0, inputs[0].shape[1]:]
    for step, step_logits in enumerate(out.logits):
        with torch.no_grad():
            sequence = torch.cat([embeds, language.embed_tokens(generated[:step])[None]], dim=1)
            hooks = [layer.register_forward_pre_hook(
                lambda module, args, kwargs: (args, {**kwargs, "attention_mask": mask(sequence.shape[1])}),
                with_kwargs=True) for layer in language.layers[2:]]
            try:
                recomputed = model.lm_head(language(inputs_embeds=sequence, use_cache=False).last_hidden_state)
            finally:
                for hook in hooks:
                    hook.remove()
        torch.testing.assert_close(step_logits[0], recomputed[0, -1], rtol=1e-4, atol=1e-5)
        assert int(recomputed[0, -1].argmax()) == int(generated[step])


def test_batch_of_two_left_padded_equals_each_alone(model):
    n = n_placeholders(model)
    prompts = [prompt(n, [10, 11, 12, 13], [14, 15, 16]), prompt(n, [17], [18, 19, 20, 21, 22])]
    with ficoco.apply(model, "vscan", BUDGET, local_layer=LOCAL_LAYER) as handle:
        ids, batched, batched_counts, _, _ = generate_batch_and_alone(model, handle, prompts, images(2, 336, seed=5))
    for row, tokens in enumerate(prompts):
        assert torch.equal(batched.sequences[row, :ids.shape[1]], ids[row])           # the caller's prompt
        text = len(tokens) - n
        assert batched_counts[row]["llm_visual"] == [DELIVERED, DELIVERED, KEEP, KEEP]
        assert batched_counts[row]["llm"] == [text + DELIVERED] * 2 + [text + KEEP] * 2


def test_remove_restores_bit_identical_outputs(model, inputs):
    ids, mask, pixels = inputs
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        handle = ficoco.apply(model, "vscan", BUDGET, local_layer=LOCAL_LAYER)
        reduced = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        handle.remove()
        after = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert reduced.shape[1] == TEXT + KEEP and before.shape[1] == TEXT + 576             # logits of the kept positions
    assert torch.equal(before, after) and not hasattr(model, "_ficoco_handle")

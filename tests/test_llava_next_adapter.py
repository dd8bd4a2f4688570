"""The unreduced LLaVA-NeXT under ficoco.apply (issue 18, first part of the LLaVA-NeXT adapter).

On a tiny random `LlavaNextForConditionalGeneration` (tests/test_llava_next_dims.py): the counts of a
prefill equal `flops.vanilla_counts` of each image's size (an independent computation from the
AnyRes layout), a batch of two images of different aspect ratios gives each row what it gives alone,
the logits are the unpatched model's, a decode step does not overwrite the prefill's counts,
and `remove()` restores the model. The methods that reduce: tests/test_llava_next_reductions.py.
"""
from __future__ import annotations

import pytest
import torch
from helpers_tiny import NEXT_TEXT, next_batch, tiny_llava_next

import ficoco
from ficoco import flops
from ficoco.invariants import InvariantViolation, check_counts

@pytest.fixture(scope="module")
def model_and_dims():
    return tiny_llava_next(attention="sdpa")


def expected_counts(dims, image_size):
    counts = flops.vanilla_counts(dims, text_tokens=NEXT_TEXT, image_size=image_size)
    counts["overhead_macs"] = 0
    return counts


@pytest.mark.parametrize("image_size", [(56, 56), (30, 80), (90, 25)])
def test_counts_of_one_image_are_the_vanilla_counts_of_its_size(model_and_dims, image_size):
    model, dims = model_and_dims
    inputs = next_batch(dims, [image_size])
    with ficoco.apply(model, "vanilla") as handle, torch.no_grad():
        model(**inputs)
        (counts,) = handle.last_counts()
    assert handle.plan is None
    assert counts == expected_counts(dims, image_size)
    assert counts["vision"][:dims.vision_layers_run] == [[17, 17]] * dims.vision_layers_run   # layer 3 is skipped


def test_a_batch_of_two_aspect_ratios_equals_each_alone(model_and_dims):
    model, dims = model_and_dims
    sizes = [(30, 80), (90, 25)]
    together = next_batch(dims, sizes)
    with torch.no_grad():
        plain = model(**together).logits
    with ficoco.apply(model, "vanilla") as handle, torch.no_grad():
        patched = model(**together).logits
        rows = handle.last_counts()
        alone = []
        for size in sizes:
            model(**next_batch(dims, [size]))
            alone += handle.last_counts()
    assert torch.equal(patched, plain)                      # the unreduced model, untouched
    assert rows == alone == [expected_counts(dims, size) for size in sizes]
    assert rows[0]["visual_delivered"] != rows[1]["visual_delivered"]      # two span lengths in one batch


def test_each_row_is_held_to_the_plan_of_its_image_size(model_and_dims):
    """`row_plans()`: per row, the unreduced plan of its image's layout, which its counts realise (what an
    evaluate job checks every record against, ficoco.invariants); another row's plan does not fit."""
    model, dims = model_and_dims
    sizes = [(56, 56), (30, 80)]                                            # 5 and 4 tower passes
    with ficoco.apply(model, "vanilla") as handle, torch.no_grad():
        model(**next_batch(dims, sizes))
        plans, counts = handle.row_plans(), handle.last_counts()
    assert [plan.vision_crops for plan in plans] == [5, 4]
    for plan, row, size in zip(plans, counts, sizes):
        check_counts("vanilla", plan, row, has_image=True)
        assert {**flops.counts_from_plan(dims, plan, NEXT_TEXT), "overhead_macs": 0} == \
            expected_counts(dims, size)
    with pytest.raises(InvariantViolation, match="tokens the projector ran on: expected 64, found 80"):
        check_counts("vanilla", plans[1], counts[0], has_image=True)


def test_generation_keeps_the_prefill_counts_and_remove_restores(model_and_dims):
    model, dims = model_and_dims
    inputs = next_batch(dims, [(56, 56)])
    with torch.no_grad():
        before = model(**inputs).logits
        plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    handle = ficoco.apply(model, "vanilla")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, plain)
    assert handle.last_counts() == [expected_counts(dims, (56, 56))]        # decode steps did not overwrite it
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert handle.last_counts() == [expected_counts(dims, (56, 56))]


def test_image_tokens_that_are_not_the_images_spans_are_refused(model_and_dims):
    model, dims = model_and_dims
    inputs = next_batch(dims, [(56, 56)])
    inputs["image_sizes"] = torch.tensor([[30, 80]])        # another size: another span length
    with ficoco.apply(model, "vanilla"), torch.no_grad(), pytest.raises(ValueError, match="do not split into the images"):
        model(**inputs)


def test_a_tower_that_runs_other_passes_than_the_layouts_say_fails_loudly(model_and_dims, monkeypatch):
    """The counts rest on transformers encoding every crop of `anyres_layout`: a changed packing must fail,
    not give wrong FLOPs."""
    from transformers.models.llava_next import modeling_llava_next

    model, dims = model_and_dims
    inputs = next_batch(dims, [(56, 56)])                       # a 2x2 canvas: 5 passes
    monkeypatch.setattr(modeling_llava_next, "image_size_to_num_patches", lambda **kwargs: 4)
    inputs["pixel_values"] = inputs["pixel_values"][:, :4]
    with ficoco.apply(model, "vanilla") as handle, torch.no_grad():
        with pytest.raises(RuntimeError):                  # transformers cannot pack 4 passes as a 2x2 canvas ...
            model(**inputs)
        with pytest.raises(RuntimeError, match="the tower ran 4 passes for images whose layouts make 5"):
            handle.last_counts()                           # ... and the prefill it recorded gives no counts

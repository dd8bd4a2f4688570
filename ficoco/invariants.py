"""The numbers an evaluate job checks before it records a sample (DESIGN.md, "Invariants worth keeping").

A record's token counts (contracts §2) are checked against the plan its batch row was held to
(`handle.row_plans()`: the method's plan; on LLaVA-NeXT, the plan of the row's image size):
- a non-adaptive method realises its planned schedule exactly: the tower passes, every executed
  vision layer's [attention, MLP] tokens, the visual tokens delivered to the LLM, and the visual tokens of every
  LLM layer (and of its MLP, for a plan that reduces between an LLM layer's attention and MLP);
- an adaptive method (plan.delivered None: PruMerge's IQR originals) delivers a count within its
  bounds (plan.post_vision.tokens_min / tokens_max, else 1 .. the tower's patches), the same
  count in every LLM layer;
- an image row delivers visual tokens (> 0); a text-only row runs no vision layer and delivers none;
- every LLM layer processed tokens (> 0), never more visual tokens than its sequence holds, and the
  same text tokens as layer 0 (methods drop visual tokens only), which are the prompt's own: its
  tokens that are neither padding nor image placeholders (`prompt_text_tokens`, counted from the
  model's input, not from the adapter);
- a text-only row runs no vision layer, delivers no visual tokens and projects none;
- the selection overhead (`overhead_macs`) is recorded, a whole number >= 0, and 0 when the plan
  reduces nothing;
- costs are finite and never negative, and the ones every sample pays (prefill, total; for an image
  row also vision and projector) are positive.

A violation raises `InvariantViolation` with one line naming the method, sample, place, expected
and found values; the job fails before the record reaches the journal. Failure records (a bad row,
an error: counts None) carry no counts and are not checked.
"""
from __future__ import annotations

import math
from typing import Mapping

from ficoco.contract import Plan

POSITIVE_COSTS = ("prefill_layers_flops", "prefill_flops", "total_flops")
POSITIVE_IMAGE_COSTS = ("vision_layers_flops", "vision_flops", "projector_flops")


class InvariantViolation(ValueError):
    """A recorded number contradicts the method's plan or cannot be true."""


def _fail(method: str, sample: str | None, what: str, expected, found) -> None:
    where = f"{method}: sample {sample}: " if sample is not None else f"{method}: "
    raise InvariantViolation(f"{where}{what}: expected {expected}, found {found}")


def prompt_text_tokens(inputs: Mapping, image_token_id: int) -> list[int]:
    """Per row of a processed batch, its text tokens: those its attention mask keeps that are not image
    placeholders (`input_ids` (B, L), `attention_mask` (B, L) tensors)."""
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    return ((mask != 0) & (input_ids != image_token_id)).sum(dim=1).tolist()


def check_counts(method: str, plan: Plan, counts: Mapping, has_image: bool, sample: str | None = None,
                 text_tokens: int | None = None) -> None:
    """`counts` (one sample, contracts §2) against `plan` (`Method.plan`) and, when given, the prompt's
    `text_tokens` (`prompt_text_tokens`); InvariantViolation if not."""
    def fail(what, expected, found):
        _fail(method, sample, what, expected, found)

    vision, delivered = counts["vision"], counts["visual_delivered"]
    llm, llm_visual = list(counts["llm"]), list(counts["llm_visual"])
    overhead = counts.get("overhead_macs")
    if isinstance(overhead, bool) or not isinstance(overhead, int) or overhead < 0:
        fail("selection overhead (overhead_macs)", "a whole number of MACs >= 0",
             "missing" if overhead is None else repr(overhead))
    if overhead and plan.vision is None and plan.llm is None and plan.post_vision is None:
        fail("selection overhead of a plan that reduces nothing", 0, overhead)
    projected = counts.get("projector_tokens", delivered)
    planned_projected = delivered if plan.projector_tokens is None else plan.projector_tokens
    if has_image and projected != planned_projected:
        fail("tokens the projector ran on", planned_projected, projected)
    if has_image and counts.get("vision_crops", 1) != plan.vision_crops:
        fail("vision tower passes (vision_crops)", plan.vision_crops, counts.get("vision_crops", 1))
    if not llm:
        fail("LLM layers recorded", ">= 1", 0)
    if len(llm_visual) != len(llm):
        fail("LLM layers with a visual-token count", len(llm), len(llm_visual))
    for layer, (length, visual) in enumerate(zip(llm, llm_visual)):
        if length <= 0:
            fail(f"LLM layer {layer} sequence length", "> 0", length)
        if not 0 <= visual <= length:
            fail(f"LLM layer {layer} visual tokens", f"0..{length} (the layer's sequence length)", visual)
    text = llm[0] - llm_visual[0]
    if text_tokens is not None and text != text_tokens:
        fail("text tokens of LLM layer 0", f"{text_tokens} (the prompt's, padding and image placeholders "
                                            "excluded)", text)
    for layer, (length, visual) in enumerate(zip(llm, llm_visual)):
        if length - visual != text:
            fail(f"LLM layer {layer} text tokens", f"{text} (as in layer 0)", length - visual)

    if not has_image:
        if vision:
            fail("vision layers of a text-only row", "none", len(vision))
        if delivered != 0:
            fail("visual tokens delivered for a text-only row", 0, delivered)
        if projected != 0:
            fail("tokens the projector ran on for a text-only row", 0, projected)
        return

    if delivered <= 0:
        fail("visual tokens delivered to the LLM for an image row", "> 0", delivered)
    planned_vision = [list(pair) for pair in plan.vision_counts]
    if len(vision) != len(planned_vision):
        fail("vision layers executed", len(planned_vision), len(vision))
    for layer, (found, expected) in enumerate(zip(vision, planned_vision)):
        if list(found) != expected:
            fail(f"vision layer {layer} [attention, MLP] tokens", expected, list(found))

    if plan.delivered is None:                     # adaptive: a count of its own per image, within bounds
        post = plan.post_vision
        low = post.tokens_min if post and post.tokens_min is not None else 1
        high = post.tokens_max if post and post.tokens_max is not None else (
            planned_vision[-1][1] - 1 if planned_vision else delivered)
        if not low <= delivered <= high:
            fail("visual tokens delivered to the LLM", f"{low}..{high} (the method's adaptive bounds)", delivered)
        expected_visual = [delivered] * len(llm)   # an adaptive method does not reduce inside the LLM
    else:
        if delivered != plan.delivered:
            fail("visual tokens delivered to the LLM", plan.delivered, delivered)
        expected_visual = list(plan.llm_visual)
    if len(llm_visual) != len(expected_visual):
        fail("LLM layers", len(expected_visual), len(llm_visual))
    for layer, (found, expected) in enumerate(zip(llm_visual, expected_visual)):
        if found != expected:
            fail(f"LLM layer {layer} visual tokens", expected, found)
    # the MLP of each layer: the plan's in-layer reductions, else the same tokens as the attention
    planned_mlp = expected_visual if plan.llm_mlp_visual is None else plan.llm_mlp_visual
    mlp = counts.get("llm_mlp", llm)
    if len(mlp) != len(llm):
        fail("LLM layers with an MLP token count", len(llm), len(mlp))
    for layer, (found, expected) in enumerate(zip(mlp, planned_mlp)):
        if found - text != expected:
            fail(f"LLM layer {layer} MLP visual tokens", expected, found - text)


def checked_counts(handle, inputs: Mapping) -> list[dict]:
    """The counts of every row of `handle`'s last prefill, of `inputs` (rows with an image each: a measure job's or
    a bench's synthetic prompt), each checked against its row's plan and its prompt's text tokens."""
    counts, plans = handle.last_counts(), handle.row_plans()
    text_tokens = prompt_text_tokens(inputs, handle.model.config.image_token_id)
    if not len(counts) == len(plans) == len(text_tokens):
        _fail(handle.method.name, None, "counts and plans of the prefill's rows", len(text_tokens),
              f"{len(counts)} counts and {len(plans)} plans")
    for row_counts, plan, text in zip(counts, plans, text_tokens):
        check_counts(handle.method.name, plan, row_counts, has_image=True, text_tokens=text)
    return counts


def check_cost(method: str, cost: Mapping, has_image: bool, sample: str | None = None) -> None:
    """Every cost finite and >= 0; the ones every sample pays > 0 (missing counts as a violation)."""
    for key, value in cost.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or value < 0:
            _fail(method, sample, f"cost {key}", "a finite number >= 0", value)
    for key in POSITIVE_COSTS + (POSITIVE_IMAGE_COSTS if has_image else ()):
        value = cost.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            _fail(method, sample, f"cost {key}", "> 0", "missing" if value is None else value)


def check_record(method: str, plan: Plan, record: Mapping, has_image: bool, text_tokens: int | None = None) -> None:
    """The counts and costs of one journal record (contracts §6); failure records are skipped."""
    if record.get("error") is not None and record.get("counts") is None:
        return
    sample = str(record.get("id"))
    if record.get("counts") is None or record.get("cost") is None:
        _fail(method, sample, "counts and cost of a sample that ran", "both recorded",
              f"counts {record.get('counts')!r}, cost {record.get('cost')!r}")
    check_counts(method, plan, record["counts"], has_image, sample, text_tokens)
    check_cost(method, record["cost"], has_image, sample)

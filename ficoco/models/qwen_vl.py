"""Attach a method to a transformers 5.x `Qwen2VLForConditionalGeneration` or `Qwen2_5_VLForConditionalGeneration`
(issue 19; tested versions: guard.py). So far: unreduced, and the reductions inside the LLM.

| part           | how                                                                                  |
|----------------|--------------------------------------------------------------------------------------|
| vision tower   | not patched: it runs unreduced over each image's patch grid (`image_grid_thw`)         |
| Qwen2-VL model | pre-/post-hooks on `model.model`: locate the image span from `input_ids`, plan the     |
|                | image's LLM reduction for its span, open/close the per-call state                    |
| language model | `LlamaPatch` (ficoco/models/llama.py): counts, reduction, rotary/mask/cache slicing   |

M-RoPE. The text model builds one rotary table per position from the 3-D (temporal, height, width) ids
and hands every decoder layer the merged (cos, sin) of shape (B, L, head_dim); `LlamaPatch` slices those
tables by the kept positions, so kept tokens keep their 3-D positions. A decode step's positions come
from the length of layer 0's cache plus the prefill's `rope_deltas`; when layer 0 itself reduced, that
length is the kept one, so this adapter passes the decode positions: the unreduced prompt's length plus
the steps so far, plus `rope_deltas`, as the unreduced model numbers them.

Budgets are stated on the nominal image (`QwenVLDims.nominal_grid`, 1,280 LLM tokens): an image keeps the
budget's fraction of its own span (`ficoco.budget.span_budget`), as on LLaVA-NeXT; or as a count for every
image (`ImageTokens`, the paper's 600 / 500 / 400), all of its span for an image with fewer. One image per prompt,
and every image row of a batch with the same span, for an LLM reduction (planned for one span).
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from ficoco.budget import image_budget
from ficoco.budget_labels import ImageTokens
from ficoco.contract import LLMLayerStep, Plan
from ficoco.dims import span_plan
from ficoco.models.guard import require_tested_transformers
from ficoco.models.handle import Handle
from ficoco.models.llama import LlamaPatch
from ficoco.models.placeholders import images_per_row, layouts_per_row
from ficoco.qwen_dims import QwenVLDims, qwen_refusal

if TYPE_CHECKING:                    # for annotations only: an adapter never imports the methods package
    from ficoco.methods.base import Method


def apply_qwen_vl(model, method: Method, budget: int | ImageTokens | None = None, text_tower=None,
                  **overrides) -> "QwenVLHandle":
    """Install `method` at `budget` on a Qwen2-VL or Qwen2.5-VL model; returns the handle. `budget`: visual tokens
    of the nominal image (each image keeps that fraction of its own), or `ImageTokens(n)`: n for every image (all
    of its own when it has fewer). Refuses an untested transformers version first (ficoco/models/guard.py), then
    any method this adapter cannot place."""
    require_tested_transformers(model.config.model_type)
    return install_qwen_vl(model, method, budget, text_tower=text_tower, **overrides)


def install_qwen_vl(model, method: Method, budget: int | ImageTokens | None = None, text_tower=None,
                    **overrides) -> "QwenVLHandle":
    """`apply_qwen_vl` without the version guard: for the self-check, which is what the guard runs."""
    if text_tower is not None:
        raise ValueError(f"{method.name}: the Qwen2-VL adapter takes no text tower (no method that reads one runs "
                         f"on Qwen2-VL yet)")
    dims = QwenVLDims.from_config(model.config)
    refusal = qwen_refusal(method, dims, **overrides)
    if refusal:
        raise ValueError(refusal)
    plan = span_plan(method, dims, dims.visual_tokens, budget, **overrides)     # the nominal image's
    return QwenVLHandle(model, method, dims, plan, budget, overrides)


class QwenVLHandle(Handle):
    """The installed method on a Qwen2-VL-family model: the LLM patch and the hooks that plan each prefill."""

    def __init__(self, model, method: Method, dims: QwenVLDims, plan: Plan, budget: int | ImageTokens | None,
                 overrides: dict):
        steps = method.steps(plan)
        if not all(isinstance(step, LLMLayerStep) for step in steps):      # `qwen_refusal` admits LLM methods only
            raise ValueError(f"{method.name}: the Qwen2-VL adapter has no site for {[type(s).__name__ for s in steps]}")
        super().__init__(model, method, dims, plan, steps)
        self.budget, self.overrides = budget, overrides
        self.image_token_id = model.config.image_token_id
        self._span_steps: dict[int, LLMLayerStep | None] = {}      # image span -> the LLM step planned for it
        inner = model.model
        self._parameter_names = list(inspect.signature(type(inner).forward).parameters)[1:]
        self._encoded_grids: list[list[int]] | None = None   # the tower's latest grids, until a prefill reads them
        self._install(lambda: inner.visual.register_forward_pre_hook(self._before_tower, with_kwargs=True))
        self._install(lambda: LlamaPatch(inner.language_model, self.llm_step, self._current_llm_pass))
        self._install(lambda: inner.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._install(lambda: inner.register_forward_hook(lambda module, args, output: self._close_call(),
                                                          always_call=True))
        self._installed()

    # -- hooks on the Qwen2-VL model ------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        call, cache, kwargs = self._open_forward(self._parameter_names, args, kwargs)
        if not call.prefill:
            return (), kwargs
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if input_ids is None:
            raise ValueError(f"{self.dims.model_type}: pass input_ids (not inputs_embeds) so the image spans can be "
                             f"located from config.image_token_id={self.image_token_id}")
        if kwargs.get("pixel_values_videos") is not None:
            raise ValueError(f"{self.method.name}: videos are not supported on {self.dims.model_type} yet; images only")
        is_image = input_ids == self.image_token_id                                  # (B, L)
        valid = None if mask is None or mask.dim() != 2 else mask.bool()
        call.placeholders_per_row = is_image.sum(1).tolist()
        call.pads_per_row = [0] * input_ids.shape[0] if valid is None else (~valid).sum(1).tolist()
        call.image_grids = self._image_grids(kwargs)                                # each image's patch grid
        call.image_layouts = [rows * cols // self.dims.merge_size ** 2 for rows, cols in call.image_grids]
        call.images_per_row = images_per_row(call.placeholders_per_row, call.image_layouts)
        spans = sorted({span for span in call.placeholders_per_row if span})
        step = None
        if self.llm_step is not None and spans:
            if len(spans) > 1 or any(images > 1 for images in call.images_per_row):
                raise ValueError(f"{self.method.name}: an LLM reduction is planned for one image per prompt and one "
                                 f"span per batch; this batch's rows hold {call.images_per_row} images of "
                                 f"{spans} tokens: batch images of one size, or one at a time")
            if self._kept_whole(spans[0]):    # images within a per-image count: no reduction runs on them
                call.llm = self._unreduced_pass(input_ids.shape[1], valid)
            else:
                step = self._span_step(spans[0])
        if call.llm is None:
            call.llm = self._prefill_pass(is_image, valid, input_ids.shape[1], step, spans[0] if step else None)
        self._remember_prefill(call, cache)
        return (), kwargs

    def _before_tower(self, module, args, kwargs):
        """Remember the grids the tower encodes: `generate` encodes the images before the prefill and hands the
        model their features (`mm_encoder_outputs`) without `image_grid_thw`."""
        grids = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self._encoded_grids = None if grids is None else grids.tolist()

    def _image_grids(self, kwargs: dict) -> list[list[int]]:
        """Each image's patch grid [rows, cols], in order: from `image_grid_thw`, or from the tower's call that
        encoded the features `generate` hands over (`mm_encoder_outputs["image"]`, one tensor per image)."""
        grids = kwargs.get("image_grid_thw")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if grids is not None:
            grids = grids.tolist()
        elif encoded is not None:
            grids, self._encoded_grids = self._encoded_grids, None
            spans = [int(image.shape[0]) for image in encoded.pooler_output]
            if grids is None or [t * h * w // self.dims.merge_size ** 2 for t, h, w in grids] != spans:
                raise ValueError(f"{self.dims.model_type}: the encoded images hold {spans} tokens, and the tower's "
                                 f"last call encoded grids {grids}: encode the images of this prefill with the "
                                 f"model's own tower")
        else:
            return []
        if any(t != 1 for t, _, _ in grids):
            raise ValueError(f"image_grid_thw {grids}: an image has one temporal patch; more are a video")
        return [[rows, cols] for _, rows, cols in grids]

    def _kept_whole(self, span: int) -> bool:
        """Whether an image of `span` tokens is within a per-image count (`ImageTokens`), so kept whole: its plan
        is the unreduced one."""
        return self.budget is not None and image_budget(self.budget, span, self.dims.visual_tokens) is None

    def _span_step(self, span: int) -> LLMLayerStep | None:
        """The LLM step of the method's plan for one image of `span` visual tokens (the nominal budget's kept
        fraction of its span), which must reduce on the layers installed."""
        if span not in self._span_steps:
            self._span_steps[span] = self._span_llm_step(self._image_plan(span), f"an image of {span} tokens")
        return self._span_steps[span]

    def _image_plan(self, span: int) -> Plan:
        """The method's plan for one image of `span` visual tokens, at the budget's kept fraction of its span."""
        return span_plan(self.method, self.dims, span, self.budget, **self.overrides)

    def row_plans(self) -> list[Plan]:
        """Per batch row of the most recent prefill: the plan of its image (unreduced for a row without one)."""
        call = self._last_prefill
        if call is None:
            return []
        return [self._image_plan(spans[0]) if spans else self.method.plan(self.dims, None, **self.overrides)
                for spans in layouts_per_row(call.image_layouts, call.images_per_row)]

    def last_counts(self) -> list[dict]:
        """Per batch row of the most recent prefill: contracts §2 counts (`Handle.last_counts`), with the tower's
        tokens per block, its images' patches (the tower is not patched: every block runs on every patch), and
        `vision_grids`, each image's patch grid (the windows of Qwen2.5-VL's blocks, and so their cost, follow it)."""
        call = self._last_prefill
        if call is None:
            return []
        counts = super().last_counts()
        for row_counts, grids in zip(counts, layouts_per_row(call.image_grids, call.images_per_row)):
            patches = sum(rows * cols for rows, cols in grids)
            row_counts["vision"] = [[patches, patches]] * self.dims.vision_layers if grids else []
            row_counts["vision_grids"] = grids
        return counts

    def _decode_inputs(self, kwargs: dict, cache, decode) -> dict:
        """A decode step whose cache was reduced from layer 0: `Handle._decode_inputs`'s mask and 1-D positions,
        shifted by the prefill's `rope_deltas` (M-RoPE numbers text after an image from the image's largest
        position id on, not from its index)."""
        given = kwargs.get("position_ids")
        kwargs = super()._decode_inputs(kwargs, cache, decode)
        deltas = self.model.model.rope_deltas
        if given is None and kwargs.get("position_ids") is not None and deltas is not None:
            kwargs = {**kwargs, "position_ids": kwargs["position_ids"] + deltas.to(kwargs["position_ids"].device)}
        return kwargs

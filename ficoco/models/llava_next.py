"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, AnyRes) under the model-neutral `Handle`: the unreduced
model with its counts, the first part of issue 18's LLaVA-NeXT adapter.

An image of LLaVA-NeXT is a base image and the crops of a canvas chosen by its size
(`ModelDims.anyres_layout`): the tower runs once per pass, the projector on every pass's patches, and
the LLM gets a packed span whose length depends on the image's size. The same patches as LLaVA-1.5
record what ran: `ClipPatch` on the tower (one `VisionPass` holds every pass of the call),
`LlamaPatch` on the language model, and pre-/post-hooks on `model.model` that open and close the
per-call state. `last_counts()` gives each row's record with `vision_crops` passes, their layers
listed one pass after the other (contracts §2), and `projector_tokens`.

Methods are planned for one crop per image, so only the unreduced model (`vanilla`) is installed
here; a method with a reduction is refused with a message until its sites exist for crops and
variable spans. There is no single plan either (`handle.plan` is None): the unreduced counts vary per
image, and `row_plans()` gives each batch row the plan of its image sizes (`ficoco.dims.unreduced_plan`).
"""
from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING

import torch

from ficoco.contract import Plan
from ficoco.dims import ModelDims, unreduced_plan
from ficoco.models.clip import ClipPatch
from ficoco.models.guard import require_tested_transformers
from ficoco.models.handle import Handle, Replacement
from ficoco.models.llama import LlamaPatch
from ficoco.models.placeholders import images_per_row

if TYPE_CHECKING:                    # for annotations only: an adapter never imports the methods package
    from ficoco.methods.base import Method


def apply_llava_next(model, method: Method, budget: int | None = None, text_tower=None,
                     **overrides) -> "LlavaNextHandle":
    """Install `method` on a `LlavaNextForConditionalGeneration`; only the unreduced model so far."""
    require_tested_transformers()
    if not callable(getattr(method, "plan", None)):
        raise TypeError(f"apply_llava_next: method {method!r} is not a Method; ficoco.apply resolves a name "
                        f"(`ficoco methods` lists them) to one")
    if method.phase != "none" or budget is not None or overrides or text_tower is not None:
        raise ValueError(f"{method.name} at budget {budget}: on LLaVA-NeXT only the unreduced model (method "
                         f"vanilla, budget None, no options) runs so far; the reduction sites for its crops and "
                         f"variable image spans are not there yet (docs/contracts.md §3)")
    return LlavaNextHandle(model, method, ModelDims.from_config(model.config))


class LlavaNextHandle(Handle):
    """The unreduced LLaVA-NeXT model with its counts: the tower and LLM patches, and the forward hooks."""

    def __init__(self, model, method: Method, dims: ModelDims):
        super().__init__(model, method, dims, None, ())
        self.image_token_id = model.config.image_token_id
        self._parameter_names = list(inspect.signature(type(model.model).forward).parameters)[1:]
        inner = model.model
        self._install(lambda: ClipPatch(inner.vision_tower, dims.last_vision_layer, None, self._on_vision_pass))
        self._install(lambda: LlamaPatch(inner.language_model, None, self._current_llm_pass))
        self._install(lambda: inner.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._install(lambda: inner.register_forward_hook(lambda module, args, output: self._close_call(),
                                                          always_call=True))
        self._sizes_outside_call: torch.Tensor | None = None     # generate encodes the images before the prefill
        self._install(lambda: Replacement(inner, "get_image_features",
                                          self._recording_sizes(inner.get_image_features)))
        self._installed()

    def _recording_sizes(self, get_image_features):
        """`get_image_features` that remembers the image sizes it encodes outside a forward call (`generate`
        encodes the images first and passes their features to the prefill)."""
        @functools.wraps(get_image_features)
        def recording(*args, **kwargs):
            if self._call is None:
                self._sizes_outside_call = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
            return get_image_features(*args, **kwargs)
        return recording

    def _before_forward(self, module, args, kwargs):
        kwargs = {**dict(zip(self._parameter_names, args)), **kwargs}
        call, cache = self._open_call(kwargs)
        if not call.prefill:
            return (), kwargs
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if input_ids is None:
            raise ValueError("LLaVA-NeXT: pass input_ids (not inputs_embeds) so the image spans can be located from "
                             f"config.image_token_id={self.image_token_id}")
        is_image = input_ids == self.image_token_id                                  # (B, L)
        valid = None if mask is None or mask.dim() != 2 else mask.bool()
        call.placeholders_per_row = is_image.sum(1).tolist()
        call.pads_per_row = [0] * input_ids.shape[0] if valid is None else (~valid).sum(1).tolist()
        sizes = kwargs.get("image_sizes")
        if kwargs.get("pixel_values") is None and (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None:
            sizes = self._sizes_outside_call                        # the features generate encoded beforehand
            if self._vision_outside_call is not None:
                call.vision.append(self._vision_outside_call)
        call.image_layouts = [] if sizes is None else [self.dims.anyres_layout(int(h), int(w)) for h, w in sizes.tolist()]
        call.images_per_row = images_per_row(call.placeholders_per_row,
                                             [layout.delivered for layout in call.image_layouts])
        call.llm = self._prefill_pass(is_image, valid, input_ids.shape[1])
        self._remember_prefill(call, cache)
        return (), kwargs

    def row_plans(self) -> list[Plan]:
        """Per batch row of the most recent prefill: the unreduced plan of its images' AnyRes layouts (the
        image sizes the model got), which its counts must realise."""
        call = self._last_prefill
        if call is None:
            return []
        plans, first_image = [], 0
        for images in call.images_per_row:
            plans.append(unreduced_plan(self.dims, call.image_layouts[first_image:first_image + images],
                                        self.method.name))
            first_image += images
        return plans

    def last_counts(self) -> list[dict]:
        """Per batch row of the most recent prefill: contracts §2 counts with `vision_crops` and
        `projector_tokens` (padding excluded)."""
        call = self._last_prefill
        if call is None:
            return []
        passes_run = sum(vision_pass.n_images for vision_pass in call.vision)
        passes_planned = sum(layout.tower_passes for layout in call.image_layouts)
        if passes_run != passes_planned:     # transformers encodes crops otherwise than anyres_layout says
            raise RuntimeError(f"LLaVA-NeXT: the tower ran {passes_run} passes for images whose layouts make "
                               f"{passes_planned}; the counts would be wrong")
        one_pass = call.vision[0].layer_counts if call.vision else []
        lengths = call.llm.layer_lengths if call.llm else []
        counts, first_image = [], 0
        for images, placeholders, pads in zip(call.images_per_row, call.placeholders_per_row, call.pads_per_row):
            layouts = call.image_layouts[first_image:first_image + images]
            first_image += images
            passes = sum(layout.tower_passes for layout in layouts)
            row = {"vision": [list(pair) for pair in one_pass] * passes, "visual_delivered": placeholders,
                   "llm": [length - pads for length in lengths], "llm_visual": [placeholders] * len(lengths),
                   "overhead_macs": 0}
            if passes:
                row["vision_crops"] = passes
                row["projector_tokens"] = sum(layout.projector_tokens for layout in layouts)
            counts.append(row)
        return counts

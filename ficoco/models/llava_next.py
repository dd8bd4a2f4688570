"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, AnyRes) under the model-neutral `Handle`: the unreduced
model and the methods that reduce each crop (in or right after the tower) or the span inside the LLM.

An image of LLaVA-NeXT is a base image and the crops of a canvas chosen by its size
(`ModelDims.anyres_layout`): the tower runs once per pass, the projector on every pass's patches, and
the LLM gets a packed span whose length depends on the image's size. The same patches as LLaVA-1.5
record what ran: `ClipPatch` on the tower (one `VisionPass` holds every pass of the call),
`LlamaPatch` on the language model, and pre-/post-hooks on `model.model` that open and close the
per-call state. `last_counts()` gives each row's record with `vision_crops` passes, their layers
listed one pass after the other (contracts §2), and `projector_tokens`.

A budget is stated for the nominal image (`ModelDims.visual_tokens`, 2,880 on LLaVA-NeXT-7B) and every
image keeps the same fraction (`ficoco.budget.span_budget`):
- per-pass methods (in the tower's layers, at its output, after the projector: `ClipPatch` and
  `FeaturePatch` as on LLaVA-1.5) run on every pass alike, the plan of one pass (`ficoco.dims.pass_plan`);
  the kept tokens go to the LLM pass after pass without image-newlines (`concatenated_passes` replaces
  `pack_image_features`), each image's placeholders cut to match;
- LLM-side methods (phase "llm": FastV, PDrop, SparseVLM, DART, FiCoCo-L) act on the whole visual span,
  image-newline tokens included (visual tokens of the span like any patch): a prefill's step is the
  method's plan for its span (`ModelDims.for_image_span`), on the layers the installed step hooks, so
  every image row of a batch must have the same span;
- a method of both (FiCoCo-VL, VScan: its `tower_schedule` and `llm_schedule`) reduces every pass in the
  tower (and after the projector) as a per-pass method, then the passes' tokens in the LLM as an
  LLM-side method does a span (`ficoco.dims.passes_plan`);
- an adaptive per-pass method (PruMerge's IQR originals) gives every pass a count of its own: the images
  are encoded first (`_encoded_first`), each image's placeholders cut to its passes' counts, and the
  passes trimmed to them before packing (`realised_passes`).
A fitted method (FitPrune) is refused with a message. There is no single plan (`handle.plan` is None);
`row_plans()` gives each row the plan of its image sizes.
"""
from __future__ import annotations

import functools
import types
from typing import TYPE_CHECKING

import torch

from ficoco.contract import LLMLayerStep, Plan, VisionInputStep, VisionLayerStep, VisionOutputStep
from ficoco.dims import PER_PASS_PHASES, ModelDims, image_plan, pass_plan, passes_plan, span_plan
from ficoco.models.clip import ClipPatch
from ficoco.models.features import FEATURE_STEPS, FeaturePatch
from ficoco.models.guard import require_tested_transformers
from ficoco.models.handle import Handle, Replacement, forward_parameters, row_instructions
from ficoco.models.llama import LlamaPatch
from ficoco.models.placeholders import (collapse_placeholders, collapsing_generate, images_per_row,
                                        instructing_generate, layouts_per_row, pad_token_id)

if TYPE_CHECKING:                    # for annotations only: an adapter never imports the methods package
    from ficoco.methods.base import Method

PER_PASS_STEPS = (VisionInputStep, VisionLayerStep, *FEATURE_STEPS)   # the steps of a per-pass method it installs
TOWER_PHASES = (*PER_PASS_PHASES, "both")        # the phases that reduce each tower pass


def apply_llava_next(model, method: Method, budget: int | None = None, text_tower=None,
                     **overrides) -> "LlavaNextHandle":
    """Install `method` at `budget` (visual tokens of the nominal image) on a `LlavaNextForConditionalGeneration`:
    the unreduced model, a method that reduces inside the tower's layers (on each crop), or one inside the LLM."""
    require_tested_transformers()
    if not callable(getattr(method, "plan", None)):
        raise TypeError(f"apply_llava_next: method {method!r} is not a Method; ficoco.apply resolves a name "
                        f"(`ficoco methods` lists them) to one")
    if method.needs_text_tower != (text_tower is not None):
        raise ValueError(f"{method.name}: pass text_tower (ficoco.models.companion) to a method that reads the "
                         f"instruction through CLIP's text tower, and only to one (`ficoco methods`: needs_text_tower)")
    dims = ModelDims.from_config(model.config)
    unmet = method.unmet_needs(dims, **overrides)   # on multi-crop images: what the adapter has no site for
    if unmet:
        raise ValueError(f"{method.name} (phase {method.phase}): on LLaVA-NeXT the unreduced model and the methods "
                         f"planned from a budget that reduce each crop (in or right after the tower), the span "
                         f"inside the LLM, or both run; it needs {'; '.join(unmet)} (docs/contracts.md §3)")
    # the budget and options are checked before any patch: a per-pass method on one pass, a method of both on
    # the passes of the largest canvas, an LLM-side one on the nominal image
    if method.phase == "both":
        plan = passes_plan(method, dims, dims.max_tower_passes, budget, **overrides)
    elif method.phase in PER_PASS_PHASES:
        plan = pass_plan(method, dims, budget, **overrides)
    else:
        plan = method.plan(dims, budget, **overrides)
    steps = method.steps(plan)
    per_pass = method.phase in PER_PASS_PHASES
    unsupported = [type(step).__name__ for step in steps if per_pass and not isinstance(step, PER_PASS_STEPS)]
    if unsupported:
        raise ValueError(f"{method.name}: on LLaVA-NeXT its {unsupported} steps have no per-pass site; "
                         f"docs/contracts.md §3")
    return LlavaNextHandle(model, method, dims, plan, steps, budget, overrides, text_tower)


class LlavaNextHandle(Handle):
    """A method on LLaVA-NeXT with its counts: the tower, feature and LLM patches, and the forward hooks. `plan`:
    the method's plan of one tower pass (a per-pass method, whose steps every pass runs), of the largest
    canvas's passes (a method of both) or of the nominal image (an LLM-side one): its LLM step fixes the
    reducing layers; `budget`: of the nominal image."""

    def __init__(self, model, method: Method, dims: ModelDims, plan: Plan, steps: tuple, budget: int | None,
                 overrides: dict, text_tower=None):
        super().__init__(model, method, dims, None, steps)
        self.budget, self.overrides = budget, dict(overrides)
        tower = method.phase in TOWER_PHASES
        # an adaptive vision-output step (PruMerge's originals) chooses a count per pass while it runs
        self.adaptive = any(isinstance(step, VisionOutputStep) and step.tokens_out is None for step in steps)
        # per tower pass: the tokens it delivers to the LLM (None: its span, or an adaptive count) and those the
        # projector runs on (None: the delivered ones)
        self.pass_delivered, self.pass_projected = None, dims.num_patches
        if self.adaptive:
            self.pass_projected = None
        elif tower:
            passes = plan.vision_crops                                       # 1 for a per-pass method's plan
            self.pass_delivered = plan.delivered // passes
            self.pass_projected = (plan.projector_tokens or plan.delivered) // passes
        self._span_steps: dict[int, LLMLayerStep | None] = {}     # image span -> the LLM step planned for it
        self.image_token_id = model.config.image_token_id
        self.pad_token_id = pad_token_id(model, self.image_token_id)
        self._parameter_names = forward_parameters(model.model, ("input_ids", "pixel_values", "image_sizes",
                                                                 "attention_mask", "position_ids", "inputs_embeds",
                                                                 "mm_encoder_outputs"))
        inner = model.model
        clip = self._install(lambda: ClipPatch(inner.vision_tower, dims.last_vision_layer, self.vision_step,
                                               self._on_vision_pass, input_step=self.input_step))
        features = self._install(lambda: FeaturePatch(inner, dims.last_vision_layer,
                                                      [step for step in steps if isinstance(step, FEATURE_STEPS)],
                                                      lambda: clip.current, text_tower, self._encoding_instructions))
        self.reads_instruction = text_tower is not None           # a projector step reads each prompt's instruction
        self._install(lambda: LlamaPatch(inner.language_model, self.llm_step, self._current_llm_pass))
        self._install(lambda: inner.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._install(lambda: inner.register_forward_hook(lambda module, args, output: self._close_call(),
                                                          always_call=True))
        self._sizes_outside_call: torch.Tensor | None = None     # generate encodes the images before the prefill
        self._install(lambda: Replacement(inner, "get_image_features",
                                          self._recording_sizes(inner.get_image_features)))
        if tower:                                # fewer tokens a pass: packed pass after pass, fewer placeholders
            pack = functools.partial(realised_passes, features) if self.adaptive else concatenated_passes
            self._install(lambda: Replacement(inner, "pack_image_features", pack))
            generate = collapsing_generate(self._collapsed_for_generate, type(model).generate)
            if self.reads_instruction:
                generate = instructing_generate(generate, self._remember_instructions)
            self._install(lambda: Replacement(model, "generate", types.MethodType(generate, model)))
        self._installed()

    def _delivered(self, kwargs: dict, layouts: list) -> list[int]:
        """The LLM tokens of each image of a call with these AnyRes layouts: its packed span, under a tower
        reduction the kept tokens of each of its passes, under an adaptive one those its passes realised
        (the call's pre-encoded features)."""
        if self.adaptive:
            return [len(image) for image in kwargs["mm_encoder_outputs"]["image"].pooler_output]
        if self.pass_delivered is None:
            return [layout.delivered for layout in layouts]
        return [layout.tower_passes * self.pass_delivered for layout in layouts]

    def _encoded_first(self, kwargs: dict, inner) -> dict:
        """An adaptive reduction's call with its images encoded (`mm_encoder_outputs`) instead of pixel values:
        each image's count is known only once its passes are reduced, and the placeholders must match it."""
        if not self.adaptive or kwargs.get("pixel_values") is None:
            return kwargs
        encoded = inner.get_image_features(pixel_values=kwargs["pixel_values"], image_sizes=kwargs["image_sizes"],
                                           vision_feature_layer=kwargs.get("vision_feature_layer"),
                                           vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                                           return_dict=True)
        encoders = {**(kwargs.get("mm_encoder_outputs") or {}), "image": encoded}
        without_pixels = {key: value for key, value in kwargs.items() if key != "pixel_values"}
        return {**without_pixels, "mm_encoder_outputs": encoders}

    def _collapsed(self, kwargs: dict, layouts: list, pad_side: str | None) -> dict:
        """`kwargs` with each image's placeholder run (the span the processor inserted) cut to `delivered`,
        rows re-padded on `pad_side` (None: on the left when a row's mask starts with 0, else the right)."""
        mask = kwargs.get("attention_mask")
        if pad_side is None:
            pad_side = "left" if mask is not None and mask.dim() == 2 and bool((mask[:, 0] == 0).any()) else "right"
        collapsed = collapse_placeholders(kwargs["input_ids"], len(layouts), self.image_token_id,
                                          [layout.delivered for layout in layouts], self._delivered(kwargs, layouts),
                                          mask, kwargs.get("position_ids"), pad_side=pad_side, pad_token_id=self.pad_token_id)
        return {**kwargs, **collapsed}

    def _collapsed_for_generate(self, kwargs: dict, inner) -> dict:
        sizes = kwargs.get("image_sizes")
        if sizes is None:
            raise ValueError(f"{self.method.name}: LLaVA-NeXT's generate needs image_sizes with pixel_values")
        kwargs = self._encoded_first(kwargs, inner)
        return self._collapsed(kwargs, [self.dims.anyres_layout(int(h), int(w)) for h, w in sizes.tolist()], "left")

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
        call, cache, kwargs = self._open_forward(self._parameter_names, args, kwargs)
        if not call.prefill:
            return (), kwargs
        if kwargs.get("input_ids") is None:
            raise ValueError("LLaVA-NeXT: pass input_ids (not inputs_embeds) so the image spans can be located from "
                             f"config.image_token_id={self.image_token_id}")
        sizes = kwargs.get("image_sizes")
        if kwargs.get("pixel_values") is None and (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None:
            sizes = self._sizes_outside_call                        # the features generate encoded beforehand
            if self._vision_outside_call is not None:
                call.vision.append(self._vision_outside_call)
        call.image_layouts = [] if sizes is None else [self.dims.anyres_layout(int(h), int(w)) for h, w in sizes.tolist()]
        if self.method.phase in TOWER_PHASES and call.image_layouts:
            kwargs = self._collapsed(self._encoded_first(kwargs, module), call.image_layouts, pad_side=None)
        input_ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        is_image = input_ids == self.image_token_id                                  # (B, L)
        valid = None if mask is None or mask.dim() != 2 else mask.bool()
        call.placeholders_per_row = is_image.sum(1).tolist()
        call.pads_per_row = [0] * input_ids.shape[0] if valid is None else (~valid).sum(1).tolist()
        call.images_per_row = images_per_row(call.placeholders_per_row, self._delivered(kwargs, call.image_layouts)
                                             if call.image_layouts else [])
        if self.reads_instruction:
            call.instructions = row_instructions(input_ids, is_image, valid,
                                                 passes_per_row(call.image_layouts, call.images_per_row))
        spans = sorted({span for span in call.placeholders_per_row if span})
        if self.llm_step is not None and len(spans) > 1:
            raise ValueError(f"{self.method.name}: the image spans of this batch's rows hold {spans} tokens; an LLM "
                             f"reduction is planned for one span per batch: batch images of one size, or one at a time")
        step = self._span_step(spans[0]) if spans and self.llm_step is not None else None
        call.llm = self._prefill_pass(is_image, valid, input_ids.shape[1], step, spans[0] if step else None)
        self._remember_prefill(call, cache)
        return (), kwargs

    # -- the instruction, for a projector step that reads it ------------------------------------------
    def _remember_instructions(self, kwargs: dict | None) -> None:
        """Each tower pass's instruction in the prompts of a `generate` call (`instructing_generate`); None after."""
        if kwargs is None or kwargs.get("image_sizes") is None:
            self._generate_instructions = None
            return
        input_ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        layouts = [self.dims.anyres_layout(int(h), int(w)) for h, w in kwargs["image_sizes"].tolist()]
        is_image = input_ids == self.image_token_id
        images_in_rows = images_per_row(is_image.sum(1).tolist(),
                                        [layout.delivered for layout in layouts])      # the caller's full spans
        valid = mask.bool() if mask is not None and mask.dim() == 2 else None
        self._generate_instructions = row_instructions(input_ids, is_image, valid,
                                                       passes_per_row(layouts, images_in_rows))

    def _span_step(self, span: int) -> LLMLayerStep | None:
        """The LLM step of the method's plan for an image span of `span` LLM tokens (`ficoco.dims.span_plan`: the
        nominal budget's kept fraction of the span; a method of both: `passes_plan` of the passes whose kept
        tokens the span holds), which must reduce on the layers installed."""
        if span not in self._span_steps:
            if self.method.phase == "both":
                plan = passes_plan(self.method, self.dims, span // self.pass_delivered, self.budget, **self.overrides)
            else:
                plan = span_plan(self.method, self.dims, span, self.budget, **self.overrides)
            self._span_steps[span] = self._span_llm_step(plan, f"a span of {span} tokens")
        return self._span_steps[span]

    def row_plans(self) -> list[Plan]:
        """Per batch row of the most recent prefill: the plan of its images (`ficoco.dims.image_plan` of their
        AnyRes layouts, the image sizes the model got), which its counts must realise."""
        call = self._last_prefill
        if call is None:
            return []
        return [image_plan(self.method, self.dims, layouts, self.budget, **self.overrides)
                for layouts in layouts_per_row(call.image_layouts, call.images_per_row)]

    def last_counts(self) -> list[dict]:
        """Per batch row of the most recent prefill: contracts §2 counts (`Handle.last_counts`) with every tower
        pass of its images (`vision_crops`, their layers one pass after the other) and `projector_tokens`."""
        call = self._last_prefill
        if call is None:
            return []
        passes_run = sum(vision_pass.n_images for vision_pass in call.vision)
        passes_planned = sum(layout.tower_passes for layout in call.image_layouts)
        if passes_run != passes_planned:     # transformers encodes crops otherwise than anyres_layout says
            raise RuntimeError(f"LLaVA-NeXT: the tower ran {passes_run} passes for images whose layouts make "
                               f"{passes_planned}; the counts would be wrong")
        one_pass = call.vision[0].layer_counts if call.vision else []
        counts = super().last_counts()
        for row, passes in zip(counts, self._tower_images_per_row(call)):
            row["vision"] = [list(pair) for pair in one_pass] * passes
            if passes:
                row["vision_crops"] = passes
            if passes and self.pass_projected and passes * self.pass_projected != row["visual_delivered"]:
                row["projector_tokens"] = passes * self.pass_projected              # contracts §2: when they differ
        return counts

    def _tower_images_per_row(self, call) -> list[int]:
        """Tower passes per batch row: the base image and the crops of each of its images."""
        return passes_per_row(call.image_layouts, call.images_per_row)


def passes_per_row(layouts: list, images_in_rows: list[int]) -> list[int]:
    """Tower passes per batch row: the base image and the crops of each of its images."""
    return [sum(layout.tower_passes for layout in row) for row in layouts_per_row(layouts, images_in_rows)]


def realised_passes(feature_patch: FeaturePatch, image_features, image_sizes, vision_feature_select_strategy,
                    image_newline=None):
    """`concatenated_passes` after an adaptive vision-output step, whose passes come padded to the largest
    count: each pass trimmed to the count it realised (`FeaturePatch.take_realised`), then packed."""
    realised = feature_patch.take_realised()
    passes = [len(features) for features in image_features]
    if realised is None or len(realised) != sum(passes):
        raise RuntimeError(f"LLaVA-NeXT: {sum(passes)} tower passes to pack, and {realised} realised counts")
    trimmed, first = [], 0
    for features in image_features:                               # (passes, max count, D)
        counts = realised[first:first + len(features)]
        first += len(features)
        trimmed.append(torch.cat([one_pass[:count] for one_pass, count in zip(features, counts)])[None])
    return concatenated_passes(trimmed, image_sizes, vision_feature_select_strategy, image_newline)


def concatenated_passes(image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
    """`LlavaNextModel.pack_image_features` once a tower reduction kept k tokens of each pass: each image's
    (passes, k, D) features pass after pass (base image, then the crops in raster order) as (passes·k, D),
    without unpadding or image-newlines (the patch grid is gone); and their lengths."""
    packed = [features.flatten(0, 1) for features in image_features]
    return packed, torch.tensor([len(features) for features in packed], dtype=torch.long, device=packed[0].device)

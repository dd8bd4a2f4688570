"""Attach a method to a transformers 5.x `LlavaForConditionalGeneration` (LLaVA-1.5; tested versions: guard.py).

`apply_llava(model, method, budget, **overrides)` plans the schedule, turns it into the method's
steps and installs them through three small patches, all reverted by `handle.remove()`:

| part           | how                                                                                 |
|----------------|-------------------------------------------------------------------------------------|
| vision tower   | `ClipPatch` (ficoco/models/clip.py): counts, skipped unused layers, reducing layers  |
| LLaVA forward  | pre-/post-hooks on `model.model`: locate the image span from `input_ids`, collapse   |
|                | each image's placeholder run to the delivered count, open/close the per-call state  |
| language model | `LlamaPatch` (ficoco/models/llama.py): counts, reduction, RoPE/mask/cache slicing     |
| generate       | an instance `generate` that collapses the placeholders *before* generation, so the  |
|                | cache, masks and positions are built for the reduced prompt, and that puts the      |
|                | caller's original prompt back in front of the returned sequences                    |

A vision reduction delivers fewer image features than the processor inserted placeholders; the
LLM then sees exactly that many placeholders per image, at contiguous positions (placeholders.py).
The model-neutral part (per-call state, counts, `remove()`) is `Handle` (handle.py); this module
adds LLaVA's parts: where the patches go and how a forward call's inputs are prepared.

An adaptive vision-output step (PruMerge's IQR originals, `VisionOutputStep.tokens_out=None`)
chooses a count per image while it runs, so the images are encoded *before* the placeholders are
collapsed: an instance `model.model.get_image_features` trims each image's projected tokens to its
realised count; the forward pre-hook (when pixel_values are given) and `generate` encode first,
collapse every image's placeholder run to its own count, re-pad the rows to one length (on the
left when any row's attention mask starts with 0, and always in `generate`; an attention mask is
built when there was none and the rows now differ), and pass `mm_encoder_outputs` instead of the
pixel values. `last_counts()` reports each row's realised count. An LLM reduction
keeps the original positions (platform-notes §4).
"""
from __future__ import annotations

import functools
import types
from typing import TYPE_CHECKING

import torch

from ficoco.contract import LLMLayerStep, VisionInputStep, VisionLayerStep, VisionOutputStep
from ficoco.dims import ModelDims
from ficoco.models.clip import ClipPatch
from ficoco.models.features import FEATURE_STEPS, FeaturePatch
from ficoco.models.guard import require_tested_transformers
from ficoco.models.handle import Handle, Replacement, forward_parameters, row_instructions
from ficoco.models.llama import LlamaPatch
from ficoco.models.placeholders import (collapse_placeholders, collapsing_generate, images_per_row,
                                        instructing_generate, pad_token_id)

if TYPE_CHECKING:                    # for annotations only: an adapter never imports the methods package
    from ficoco.methods.base import Method


def apply_llava(model, method: Method, budget: int | None = None, text_tower=None, **overrides) -> "LlavaHandle":
    """Install `method` at `budget` on a `LlavaForConditionalGeneration`; returns the handle.

    `text_tower` (ficoco/models/companion.py) is the CLIP text tower a method that reads the
    instruction needs (`Method.needs_text_tower`, CDPruner). Refuses an untested transformers version
    first (ficoco/models/guard.py).
    """
    require_tested_transformers()
    return install_llava(model, method, budget, text_tower=text_tower, **overrides)


def install_llava(model, method: Method, budget: int | None = None, text_tower=None, **overrides) -> "LlavaHandle":
    """`apply_llava` without the version guard: for the self-check, which is what the guard runs."""
    if not callable(getattr(method, "plan", None)):
        raise TypeError(f"install_llava: method {method!r} is not a Method; ficoco.apply resolves a name "
                        f"(`ficoco methods` lists them) to one")
    if method.needs_text_tower and text_tower is None:
        raise ValueError(f"{method.name} reads the instruction through the CLIP text tower of the vision tower's "
                         f"checkpoint: pass text_tower=ficoco.models.companion.load_text_tower(...) (the pipeline "
                         f"loads it from the model directory's clip/)")
    if text_tower is not None and not method.needs_text_tower:
        raise ValueError(f"{method.name} does not read a text tower; pass text_tower only to a method that does "
                         f"(`ficoco methods`: needs_text_tower)")
    dims = ModelDims.from_config(model.config)
    plan = method.plan(dims, budget, **overrides)
    return LlavaHandle(model, method, dims, plan, text_tower)


class LlavaHandle(Handle):
    """The installed method on a LLaVA model: the tower, LLM and feature patches, the forward hooks
    that prepare each call's inputs, and (when the prompt shrinks) the collapsing `generate`."""

    def __init__(self, model, method: Method, dims: ModelDims, plan: dict, text_tower=None):
        steps = method.steps(plan)
        super().__init__(model, method, dims, plan, steps)
        unknown = [type(step).__name__ for step in steps
                   if not isinstance(step, (VisionLayerStep, LLMLayerStep, VisionInputStep, *FEATURE_STEPS))]
        if unknown:
            raise ValueError(f"{method.name}: the LLaVA adapter has no site for {unknown}")
        self.image_token_id = model.config.image_token_id
        self.reads_instruction = text_tower is not None             # a projector step reads each prompt's instruction
        self.full_per_image = dims.visual_tokens
        self.delivered_per_image = plan.delivered                 # None: adaptive, a count per image
        self.adaptive = any(isinstance(step, VisionOutputStep) and step.tokens_out is None for step in steps)
        if self.adaptive and self.llm_step is not None:
            raise ValueError(f"{method.name}: an adaptive vision-output step (a count per image) cannot be combined "
                             f"with an LLM reduction, which is planned for one count per prompt")
        self.pad_token_id = pad_token_id(model, self.image_token_id)
        self._parameter_names = forward_parameters(model.model, ("input_ids", "pixel_values", "attention_mask",
                                                                 "position_ids", "inputs_embeds", "mm_encoder_outputs"))

        inner = model.model
        clip = self._install(lambda: ClipPatch(inner.vision_tower, dims.last_vision_layer, self.vision_step,
                                               self._on_vision_pass, input_step=self.input_step))
        self._install(lambda: LlamaPatch(inner.language_model, self.llm_step, self._current_llm_pass))
        features = self._install(lambda: FeaturePatch(inner, dims.last_vision_layer,
                                                      [step for step in steps if isinstance(step, FEATURE_STEPS)],
                                                      lambda: clip.current, text_tower, self._encoding_instructions))
        self._install(lambda: inner.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._install(lambda: inner.register_forward_hook(lambda module, args, output: self._close_call(),
                                                          always_call=True))
        if self.adaptive:                                         # trim each image to its realised count
            self._install(lambda: Replacement(inner, "get_image_features",
                                              _trimming_image_features(inner.get_image_features, features)))
        if self.adaptive or self.delivered_per_image != self.full_per_image or self.reads_instruction:
            collapse = functools.partial(self._collapse_inputs, pad_side="left")
            generate = collapsing_generate(collapse, type(model).generate)
            if self.reads_instruction:
                generate = instructing_generate(generate, self._remember_instructions)
            self._install(lambda: Replacement(model, "generate", types.MethodType(generate, model)))
        self._installed()

    # -- hooks on LlavaModel ----------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        call, cache, kwargs = self._open_forward(self._parameter_names, args, kwargs)
        if not call.prefill:
            return (), kwargs
        kwargs = self._collapse_inputs(kwargs, module)
        if kwargs.get("pixel_values") is None and _image_features(kwargs) is not None \
                and self._vision_outside_call is not None:
            call.vision.append(self._vision_outside_call)        # the features generate encoded beforehand
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        reference = input_ids if input_ids is not None else kwargs["inputs_embeds"][..., 0]
        batch, length = reference.shape
        is_image = (input_ids == self.image_token_id) if input_ids is not None else torch.zeros_like(reference,
                                                                                                        dtype=torch.bool)
        if input_ids is None and (kwargs.get("pixel_values") is not None or self.llm_step is not None):
            raise ValueError(f"{self.method.name}: pass input_ids (not inputs_embeds) so the image span can be "
                             f"located from config.image_token_id={self.image_token_id}")
        valid = None if mask is None or mask.dim() != 2 else mask.bool()
        call.placeholders_per_row = is_image.sum(1).tolist()
        if self.adaptive:
            features = _image_features(kwargs)
            realised = [int(image.shape[0]) for image in features.pooler_output] if features is not None else []
            call.images_per_row = images_per_row(call.placeholders_per_row, realised)
        else:
            call.images_per_row = [n // self.delivered_per_image for n in call.placeholders_per_row]
        call.pads_per_row = [0] * batch if valid is None else (~valid).sum(1).tolist()
        if self.reads_instruction and input_ids is not None:
            call.instructions = row_instructions(input_ids, is_image, valid, call.images_per_row)
        call.llm = self._prefill_pass(is_image, valid, length)
        self._remember_prefill(call, cache)
        return (), kwargs

    def _remember_instructions(self, kwargs: dict | None) -> None:
        """Each image's instruction in the prompts of a `generate` call (`instructing_generate`); None after."""
        if kwargs is None:
            self._generate_instructions = None
            return
        input_ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        valid = mask.bool() if mask is not None and mask.dim() == 2 else None
        is_image = input_ids == self.image_token_id
        self._generate_instructions = row_instructions(input_ids, is_image, valid,
                                                       (is_image.sum(1) // self.full_per_image).tolist())

    # -- input preparation ---------------------------------------------------------------------
    def _collapse_inputs(self, kwargs: dict, inner, pad_side: str | None = None) -> dict:
        """Collapse each image's placeholder run to the delivered count (vision reductions only).

        Adaptive: images given as pixel values are encoded first (through the hooks) and passed on as
        `mm_encoder_outputs`; every image's run is collapsed to its own realised count. Rows whose
        lengths now differ are re-padded on `pad_side` (default: "left" when any row's attention mask
        starts with 0, else "right").
        """
        input_ids, n_images = kwargs.get("input_ids"), _n_images(kwargs)
        if self.delivered_per_image == self.full_per_image or input_ids is None or not n_images:
            return kwargs
        kept = self.delivered_per_image
        if self.adaptive:
            if kwargs.get("pixel_values") is not None:
                encoded = _encode_images(inner, kwargs)
                encoders = {**(kwargs.get("mm_encoder_outputs") or {}), "image": encoded}
                kwargs = {**{k: v for k, v in kwargs.items() if k != "pixel_values"}, "mm_encoder_outputs": encoders}
            kept = [int(image.shape[0]) for image in _image_features(kwargs).pooler_output]
        mask = kwargs.get("attention_mask")
        if pad_side is None:
            pad_side = "left" if mask is not None and mask.dim() == 2 and bool((mask[:, 0] == 0).any()) else "right"
        collapsed = collapse_placeholders(input_ids, n_images, self.image_token_id, self.full_per_image, kept,
                                          attention_mask=mask, position_ids=kwargs.get("position_ids"),
                                          pad_side=pad_side, pad_token_id=self.pad_token_id)
        return {**kwargs, **collapsed}


def _image_features(kwargs: dict):
    """The pre-encoded image features of a forward call (`mm_encoder_outputs["image"]`), if any."""
    encoded = kwargs.get("mm_encoder_outputs") or {}
    return encoded.get("image")


def _n_images(kwargs: dict) -> int:
    """Images in a forward call: from pixel_values, or from the pre-encoded features (one entry per image)."""
    if kwargs.get("pixel_values") is not None:
        return kwargs["pixel_values"].shape[0]
    features = _image_features(kwargs)
    return 0 if features is None else len(features.pooler_output)


def _encode_images(inner, kwargs: dict):
    """`LlavaModel.get_image_features` (trimmed to the realised counts) of the call's pixel values."""
    return inner.get_image_features(pixel_values=kwargs["pixel_values"],
                                    vision_feature_layer=kwargs.get("vision_feature_layer"),
                                    vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                                    image_sizes=kwargs.get("image_sizes"), return_dict=True)


def _trimming_image_features(get_image_features, feature_patch: FeaturePatch):
    """An instance `get_image_features` whose `pooler_output` holds each image's realised tokens only."""

    @functools.wraps(get_image_features)
    def trimming(*args, **kwargs):
        return_dict = kwargs.pop("return_dict", None)
        output = get_image_features(*args, **kwargs, return_dict=True)
        realised = feature_patch.take_realised()
        if realised is not None:
            features = output.pooler_output
            if len(features) != len(realised):
                raise RuntimeError(f"{len(features)} image(s) of features for {len(realised)} realised counts")
            output.pooler_output = [image[:count] for image, count in zip(features, realised)]
        return output if return_dict is not False else output.to_tuple()

    return trimming

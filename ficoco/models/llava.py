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
LLM then sees exactly that many placeholders per image, at contiguous positions.

An adaptive vision-output step (PruMerge's IQR originals, `VisionOutputStep.tokens_out=None`)
chooses a count per image while it runs, so the images are encoded *before* the placeholders are
collapsed: an instance `model.model.get_image_features` trims each image's projected tokens to its
realised count; the forward pre-hook (when pixel_values are given) and `generate` encode first,
collapse every image's placeholder run to its own count, re-pad the rows to one length (on the
left when any row's attention mask starts with 0, and always in `generate`; an attention mask is
built when there was none and the rows now differ), and pass `mm_encoder_outputs` instead of the
pixel values. `last_counts()` reports each row's realised count. An LLM reduction
keeps the original positions (platform-notes §4). No state is module-level: every call's state
lives in the handle, and decode steps find their prefill through the KV cache object.
"""
from __future__ import annotations

import copy
import functools
import inspect
import logging
import types
import weakref
from typing import TYPE_CHECKING, Sequence

import torch
from transformers.cache_utils import Cache

from ficoco.contract import LLMLayerStep, VisionInputStep, VisionLayerStep, VisionOutputStep
from ficoco.dims import ModelDims
from ficoco.models.clip import ClipPatch, VisionPass
from ficoco.models.llama import LlamaPatch, LLMPass
from ficoco.models.features import FEATURE_STEPS, FeaturePatch
from ficoco.models.guard import require_tested_transformers

if TYPE_CHECKING:                    # for annotations only: an adapter never imports the methods package
    from ficoco.methods.base import Method

log = logging.getLogger(__name__)

_INSTALLED = "_ficoco_handle"        # attribute on the patched model naming the active handle


def apply_llava(model, method: Method, budget: int | None = None, **overrides) -> "LlavaHandle":
    """Install `method` at `budget` on a `LlavaForConditionalGeneration`; returns the handle.

    Refuses an untested transformers version first (ficoco/models/guard.py).
    """
    require_tested_transformers()
    return install_llava(model, method, budget, **overrides)


def install_llava(model, method: Method, budget: int | None = None, **overrides) -> "LlavaHandle":
    """`apply_llava` without the version guard: for the self-check, which is what the guard runs."""
    if not callable(getattr(method, "plan", None)):
        raise TypeError(f"install_llava: method {method!r} is not a Method; ficoco.apply resolves a name "
                        f"(`ficoco methods` lists them) to one")
    if getattr(model, _INSTALLED, None) is not None:
        raise RuntimeError("a ficoco method is already installed on this model; call its handle.remove() first")
    dims = ModelDims.from_config(model.config)
    plan = method.plan(dims, budget, **overrides)
    return LlavaHandle(model, method, dims, plan)


class _Call:
    """State of one `LlavaModel.forward` call."""

    def __init__(self, prefill: bool):
        self.prefill = prefill
        self.vision: list[VisionPass] = []
        self.llm: LLMPass | None = None
        self.images_per_row: list[int] = []
        self.placeholders_per_row: list[int] = []
        self.pads_per_row: list[int] = []


class LlavaHandle:
    """The installed method. `remove()`, `last_counts()`, `last_trace()`, `plan`; also a context manager."""

    def __init__(self, model, method: Method, dims: ModelDims, plan: dict):
        self.model, self.method, self.dims, self.plan = model, method, dims, plan
        steps = method.steps(plan)
        vision_steps = [step for step in steps if isinstance(step, VisionLayerStep)]
        llm_steps = [step for step in steps if isinstance(step, LLMLayerStep)]
        input_steps = [step for step in steps if isinstance(step, VisionInputStep)]
        unknown = [type(step).__name__ for step in steps
                   if not isinstance(step, (VisionLayerStep, LLMLayerStep, VisionInputStep, *FEATURE_STEPS))]
        if unknown or len(vision_steps) > 1 or len(llm_steps) > 1 or len(input_steps) > 1:
            raise ValueError(f"{method.name}: the LLaVA adapter supports at most one VisionInputStep, one "
                             f"VisionLayerStep and one LLMLayerStep; got {[type(step).__name__ for step in steps]}")
        self.vision_step = vision_steps[0] if vision_steps else None
        self.llm_step = llm_steps[0] if llm_steps else None
        self.image_token_id = model.config.image_token_id
        self.full_per_image = dims.visual_tokens
        self.delivered_per_image = plan["delivered"]              # None: adaptive, a count per image
        self.adaptive = any(isinstance(step, VisionOutputStep) and step.tokens_out is None for step in steps)
        if self.adaptive and self.llm_step is not None:
            raise ValueError(f"{method.name}: an adaptive vision-output step (a count per image) cannot be combined "
                             f"with an LLM reduction, which is planned for one count per prompt")
        self.pad_token_id = _pad_token_id(model, self.image_token_id)
        self.llm_n0 = plan["llm"]["n0"] if plan.get("llm") else None

        self._call: _Call | None = None
        self._last_prefill: _Call | None = None
        self._vision_outside_call: VisionPass | None = None   # generate encodes images before the prefill
        self._prefill_by_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._parameter_names = list(inspect.signature(type(model.model).forward).parameters)[1:]

        inner = model.model
        self._clip = ClipPatch(inner.vision_tower, dims.last_vision_layer, self.vision_step, self._on_vision_pass,
                               input_step=input_steps[0] if input_steps else None)
        try:
            self._llama = LlamaPatch(inner.language_model, self.llm_step, self._current_llm_pass)
        except Exception:
            self._clip.remove()                                   # leave the model as it was
            raise
        try:                                                      # vision-output / projector steps
            self._features = FeaturePatch(inner, dims.last_vision_layer,
                                          [step for step in steps if isinstance(step, FEATURE_STEPS)],
                                          lambda: self._clip.current)
        except Exception:
            self._clip.remove()
            self._llama.remove()
            raise
        self._hooks = [inner.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                       inner.register_forward_hook(self._after_forward, always_call=True)]
        self._features_patched = self.adaptive
        if self.adaptive:                                         # trim each image to its realised count
            inner.get_image_features = _trimming_image_features(inner.get_image_features, self._features)
        self._generate_patched = self.adaptive or self.delivered_per_image != self.full_per_image
        if self._generate_patched:
            model.generate = types.MethodType(_collapsing_generate(self, type(model).generate), model)
        setattr(model, _INSTALLED, self)

    # -- public ---------------------------------------------------------------------------------
    def remove(self) -> None:
        """Restore the model exactly: every hook, replacement forward and the generate override."""
        if getattr(self.model, _INSTALLED, None) is not self:
            return
        self._clip.remove()
        self._llama.remove()
        self._features.remove()
        for hook in self._hooks:
            hook.remove()
        if self._features_patched:
            del self.model.model.get_image_features
        if self._generate_patched:
            del self.model.generate
        delattr(self.model, _INSTALLED)
        self._call = None

    def __enter__(self) -> "LlavaHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def last_counts(self) -> list[dict]:
        """Per batch row of the most recent prefill: the contracts §2 token counts (padding excluded)."""
        call = self._last_prefill
        if call is None:
            return []
        per_image_vision = call.vision[0].layer_counts if call.vision else []
        counts = []
        for images, placeholders, pads in zip(call.images_per_row, call.placeholders_per_row, call.pads_per_row):
            llm_pass = call.llm
            lengths = llm_pass.layer_lengths if llm_pass else []
            dropped = llm_pass.layer_dropped if llm_pass else []
            counts.append({
                "vision": [[n_attn * images, n_mlp * images] for n_attn, n_mlp in per_image_vision] if images else [],
                "visual_delivered": placeholders,
                "llm": [length - pads for length in lengths],
                "llm_visual": [placeholders - n for n in dropped] if placeholders else [0] * len(lengths),
            })
        return counts

    def last_trace(self) -> dict:
        """Kept positions of the most recent prefill, per reducing layer (for analysis and tests).

        "vision": layer -> (images, N_l) original patch raster positions;
        "llm": layer -> (B, N_l) kept visual positions in the LLM input sequence.
        """
        call = self._last_prefill
        if call is None:
            return {"vision": {}, "llm": {}}
        vision = {}
        for vision_pass in call.vision:
            for layer, positions in vision_pass.trace.items():
                vision.setdefault(layer, []).append(positions)
        return {"vision": {layer: torch.cat(parts) for layer, parts in vision.items()},
                "llm": dict(call.llm.trace) if call.llm else {}}

    # -- hooks on LlavaModel ----------------------------------------------------------------------
    def _current_llm_pass(self) -> LLMPass | None:
        return self._call.llm if self._call is not None else None

    def _on_vision_pass(self, vision_pass: VisionPass) -> None:
        if self._call is not None:
            self._call.vision.append(vision_pass)
        else:
            self._vision_outside_call = vision_pass

    def _before_forward(self, module, args, kwargs):
        kwargs = {**dict(zip(self._parameter_names, args)), **kwargs}
        cache = _cache_of(kwargs)
        prefill = cache is None or cache.get_seq_length() == 0
        if not prefill:
            self._call = _Call(prefill=False)
            prefill_call = self._prefill_by_cache.get(cache)
            if prefill_call is not None and prefill_call.llm is not None and prefill_call.llm.keep_at:
                self._call.llm = prefill_call.llm.decode_view()
                kwargs = self._decode_inputs(kwargs, cache, self._call.llm)
            return (), kwargs
        kwargs = self._collapse_inputs(kwargs, module)
        self._call = call = _Call(prefill=True)
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
            call.images_per_row = _images_per_row(call.placeholders_per_row, realised)
        else:
            call.images_per_row = [n // self.delivered_per_image for n in call.placeholders_per_row]
        call.pads_per_row = [0] * batch if valid is None else (~valid).sum(1).tolist()
        call.llm = self._prefill_pass(is_image, valid, length)
        if cache is not None:
            self._prefill_by_cache[cache] = call
        return (), kwargs

    def _after_forward(self, module, args, output):
        if self._call is not None and self._call.prefill:
            self._last_prefill = self._call
        self._call = None

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

    def _prefill_pass(self, is_image: torch.Tensor, valid: torch.Tensor | None, length: int) -> LLMPass:
        """The LLM state of a prefill: visual and instruction positions when this call reduces."""
        counts = is_image.sum(1)
        reduce = self.llm_step is not None and bool(counts.any())
        if self.llm_step is not None and not reduce:
            log.info("%s: no image tokens in this prefill; the LLM reduction is skipped", self.method.name)
        if not reduce:
            return LLMPass(True, length, valid, None, None, reduce=False)
        if not bool((counts == self.llm_n0).all()):
            raise ValueError(f"{self.method.name}: the LLM reduction is planned for {self.llm_n0} visual tokens "
                             f"per prompt; this batch has {counts.tolist()} image tokens per row (one image per "
                             f"prompt is supported, in every row of the batch)")
        batch = is_image.shape[0]
        visual = is_image.nonzero()[:, 1].view(batch, -1)                              # (B, N)
        positions = torch.arange(length, device=is_image.device)
        after_image = positions[None, :] > visual[:, -1:]                                # (B, L)
        if valid is not None:
            after_image = after_image & valid
        instruction = [positions[after_image[row]] for row in range(batch)]
        empty = [row for row, index in enumerate(instruction) if index.numel() == 0]
        if empty and self.llm_step.needs_instruction:
            if batch == 1:
                log.info("%s: no instruction tokens after the image; the LLM reduction is skipped",
                         self.method.name)
                return LLMPass(True, length, valid, None, None, reduce=False)
            raise ValueError(f"{self.method.name}: rows {empty} have no prompt tokens after the image, so FiCoCo-L "
                             f"cannot score them; run them alone (they are then left unreduced)")
        return LLMPass(True, length, valid, visual, instruction, reduce=True)

    def _decode_inputs(self, kwargs: dict, cache, decode: LLMPass) -> dict:
        """A decode step whose cache was reduced from layer 0: the 2-D mask and positions to match it."""
        layer0_keep = decode.keep_at.get(0)
        if layer0_keep is None:
            return kwargs
        kept = layer0_keep.shape[1]
        past_full = decode.full_len + cache.get_seq_length() - kept                     # positions seen so far
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            new = torch.arange(decode.full_len, mask.shape[1], device=mask.device).expand(mask.shape[0], -1)
            kwargs = {**kwargs, "attention_mask": mask.gather(1, torch.cat([layer0_keep, new], dim=1))}
        if kwargs.get("position_ids") is None:
            reference = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"][..., 0]
            kwargs = {**kwargs, "position_ids": (torch.arange(reference.shape[1], device=reference.device)
                                                 + past_full)[None]}
        return kwargs


def _cache_of(kwargs: dict) -> Cache | None:
    """The KV cache of a forward call, found by its type rather than its keyword.

    transformers 5.23 passes it as `past_key_values`, 5.24 as `cache`; a lookup by name took every
    decode step for a prefill under 5.24 and recorded the last decode step's counts.
    """
    caches = [value for value in kwargs.values() if isinstance(value, Cache)]
    if len(caches) > 1:
        raise RuntimeError(f"{len(caches)} KV cache objects in one LlavaModel.forward call; expected at most one")
    return caches[0] if caches else None


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


def collapse_placeholders(input_ids: torch.Tensor, n_images: int, image_token_id: int, full: int,
                          kept: int | Sequence[int], attention_mask: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None, *, pad_side: str = "left",
                          pad_token_id: int = 0) -> dict:
    """Keep the first `kept` of every image's `full` placeholders (input_ids (B, L) -> (B, L')).

    `kept` is one count for every image, or one count per image (images in reading order: row by
    row, left to right). Returns the new input_ids and, when given, attention_mask and position_ids
    (renumbered so the positions stay contiguous). Rows left with different lengths are padded to
    the longest on `pad_side` ("left" or "right") with `pad_token_id`, attention mask 0 (a mask is
    built when none was given) and position 0. Input that already holds the kept counts is returned
    unchanged ({}); any other count raises ValueError.
    """
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side={pad_side!r}; valid choices are 'left' and 'right'")
    per_image = [int(kept)] * n_images if isinstance(kept, int) else [int(count) for count in kept]
    if len(per_image) != n_images or not all(0 <= count <= full for count in per_image):
        raise ValueError(f"kept={per_image}: need one count in [0, {full}] for each of the {n_images} image(s)")
    is_image = input_ids == image_token_id                                        # (B, L)
    total = int(is_image.sum())
    if total == sum(per_image):
        return {}
    reduced = f"{kept} per image" if isinstance(kept, int) else f"{sum(per_image)} in all ({per_image})"
    per_row = is_image.sum(1)
    if total != n_images * full or bool((per_row % full != 0).any()):
        raise ValueError(f"input_ids hold {total} image tokens (id {image_token_id}) for {n_images} image(s); "
                         f"expected {full} per image (as the processor inserts) or {reduced} (already reduced); "
                         f"image tokens per row: {per_row.tolist()}")
    batch, length = input_ids.shape
    order = is_image.reshape(-1).cumsum(0).view(batch, length) - 1                 # placeholder index, reading order
    limit = torch.tensor(per_image, device=input_ids.device)[(order // full).clamp(min=0, max=n_images - 1)]
    drop = is_image & (order % full >= limit)                                      # (B, L)
    keep = ~drop
    lengths = keep.sum(1)                                                          # (B,)
    new_length = int(lengths.max())
    offset = new_length - lengths if pad_side == "left" else torch.zeros_like(lengths)
    slot = keep.cumsum(1) - 1 + offset[:, None]                                    # (B, L) destination of a kept token
    rows = torch.arange(batch, device=input_ids.device)[:, None].expand(batch, length)
    where = (rows[keep], slot[keep])

    def placed(values: torch.Tensor, fill) -> torch.Tensor:
        out = torch.full((batch, new_length), fill, dtype=values.dtype, device=values.device)
        out[where] = values[keep]
        return out

    out = {"input_ids": placed(input_ids, pad_token_id)}
    uneven = bool((lengths != new_length).any())
    if attention_mask is not None and attention_mask.dim() == 2:
        out["attention_mask"] = placed(attention_mask, 0)
    elif attention_mask is None and uneven:
        out["attention_mask"] = placed(torch.ones_like(input_ids), 0)
    if position_ids is not None:
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids of shape {tuple(position_ids.shape)}: expected (batch, length)")
        out["position_ids"] = placed((position_ids - drop.cumsum(1)).expand(batch, length), 0)
    return out


def _images_per_row(placeholders_per_row: list[int], counts: list[int]) -> list[int]:
    """How many images each row holds, given every image's placeholder count (images in reading order)."""
    images, index = [], 0
    for placeholders in placeholders_per_row:
        taken, total = 0, 0
        while total < placeholders and index < len(counts):
            total, taken, index = total + counts[index], taken + 1, index + 1
        if total != placeholders:
            raise ValueError(f"image tokens per row {placeholders_per_row} do not split into the images' realised "
                             f"counts {counts}")
        images.append(taken)
    if index != len(counts):
        raise ValueError(f"{len(counts)} image(s) for image tokens per row {placeholders_per_row}")
    return images


def _pad_token_id(model, image_token_id: int) -> int:
    """The id that re-pads collapsed rows: the text pad token, else the generation pad token, else 0."""
    for candidate in (getattr(model.config.get_text_config(), "pad_token_id", None),
                      getattr(getattr(model, "generation_config", None), "pad_token_id", None), 0):
        if isinstance(candidate, int) and candidate != image_token_id:
            return candidate
    return 0 if image_token_id != 0 else 1


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


def _collapsing_generate(handle: LlavaHandle, generate):
    """`model.generate` that runs on the collapsed prompt and returns the caller's prompt in front."""

    def collapsing_generate(model, inputs=None, *args, **kwargs):
        input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
        pixel_values = kwargs.get("pixel_values")
        if input_ids is None or pixel_values is None or inputs_are_embeds(input_ids):
            return generate(model, input_ids, *args, **kwargs)
        with torch.no_grad():                                     # adaptive: the images are encoded here
            collapsed = handle._collapse_inputs({**kwargs, "input_ids": input_ids}, model.model, pad_side="left")
        short_ids = collapsed.pop("input_ids")
        output = generate(model, short_ids, *args, **collapsed)
        return _restore_prompt(output, input_ids, short_ids.shape[1])

    return collapsing_generate


def inputs_are_embeds(inputs) -> bool:
    return isinstance(inputs, torch.Tensor) and inputs.dim() == 3


def _restore_prompt(output, input_ids: torch.Tensor, short_length: int):
    """Replace the collapsed prompt at the front of the generated sequences by the original one."""
    def restore(sequences: torch.Tensor) -> torch.Tensor:
        return torch.cat([input_ids.to(sequences.device), sequences[:, short_length:]], dim=1)

    if isinstance(output, torch.Tensor):
        return restore(output)
    output = copy.copy(output)
    output.sequences = restore(output.sequences)
    return output

"""The model-neutral part of an installed method: patches it owns, per-call state, counts, `remove()`.

A model family (llava.py, llava_next.py, qwen_vl.py) subclasses `Handle`: it installs its tower and LLM
patches through `_install` (each with the callable that reverts it) and hooks the multimodal forward,
calling `_open_forward` first and `_close_call` last. Everything a call records lives in a `Call`; a
decode step finds the prefill that filled its KV cache through the cache object, so no state is
module-level and two handles on two models never meet.
"""
from __future__ import annotations

import inspect
import logging
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers.cache_utils import Cache

from ficoco.contract import (LLMLayerStep, Plan, ProjectorStep, Step, StepShape, VisionInputStep, VisionLayerStep,
                             VisionOutputStep)
from ficoco.dims import ModelDims
from ficoco.models.clip import VisionPass
from ficoco.models.llama import LLMPass, cache_of, holds_tokens

if TYPE_CHECKING:                    # for annotations only: an adapter never imports the methods package
    from ficoco.methods.base import Method

log = logging.getLogger(__name__)

INSTALLED = "_ficoco_handle"         # attribute on the patched model naming the active handle


class Call:
    """State of one forward call of the multimodal model."""

    def __init__(self, prefill: bool):
        self.prefill = prefill
        self.vision: list[VisionPass] = []
        self.llm: LLMPass | None = None
        self.images_per_row: list[int] = []
        self.placeholders_per_row: list[int] = []
        self.pads_per_row: list[int] = []
        self.instructions: list[list[int]] | None = None   # per image, its row's token ids after the row's last image
        self.image_layouts: list = []                     # per image: LLaVA-NeXT's AnyresLayout (ficoco.dims),
                                                          # Qwen2-VL's span (its visual tokens in the LLM)
        self.image_grids: list[list[int]] = []            # per image: Qwen2-VL's patch grid [rows, cols]
        self.tower = None                                 # Qwen2-VL: the `QwenTowerPass` of a reducing tower


class Handle:
    """The installed method. `remove()`, `last_counts()`, `last_trace()`, `plan`; also a context manager."""

    def __init__(self, model, method: Method, dims: ModelDims, plan: Plan | None, steps: tuple[Step, ...]):
        if getattr(model, INSTALLED, None) is not None:
            raise RuntimeError("a ficoco method is already installed on this model; call its handle.remove() first")
        self.model, self.method, self.dims, self.plan = model, method, dims, plan
        self.vision_step = _at_most_one(method, steps, VisionLayerStep)
        self.input_step = _at_most_one(method, steps, VisionInputStep)
        self.llm_step = _at_most_one(method, steps, LLMLayerStep)
        self.steps_by_site = {"layer": self.vision_step, "output": _at_most_one(method, steps, VisionOutputStep),
                              "projector": _at_most_one(method, steps, ProjectorStep)}   # VisionPass.step_shapes
        self.llm_n0 = plan.llm.n0 if plan is not None and plan.llm else None
        self._undo: list[Callable[[], None]] = []
        self._call: Call | None = None
        self._last_prefill: Call | None = None
        self._vision_outside_call: VisionPass | None = None   # generate encodes images before the prefill
        self._generate_instructions: list[list[int]] | None = None   # per image encoded while `generate` runs
        self._prefill_by_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # -- installing ---------------------------------------------------------------------------------
    def _install(self, install: Callable[[], Any]) -> Any:
        """Run `install`, which patches the model and returns the patch (anything with `remove()`: a
        patch class, a hook handle, a `Replacement`); if it fails, revert everything installed so far,
        so the model is left as it was."""
        try:
            patch = install()
        except Exception:
            for undo in reversed(self._undo):
                undo()
            self._undo.clear()
            raise
        self._undo.append(patch.remove)
        return patch

    def _installed(self) -> None:
        setattr(self.model, INSTALLED, self)

    # -- public ---------------------------------------------------------------------------------
    def remove(self) -> None:
        """Restore the model exactly: every hook and replacement, in the reverse order of installing."""
        if getattr(self.model, INSTALLED, None) is not self:
            return
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        delattr(self.model, INSTALLED)
        self._call = None

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def last_counts(self) -> list[dict]:
        """Per batch row of the most recent prefill: the contracts §2 token counts (padding excluded)."""
        call = self._last_prefill
        if call is None:
            return []
        per_image_vision = call.vision[0].layer_counts if call.vision else []
        image_overhead = self._image_overhead(call)
        image_projected = self._image_projected(call)
        counts, first_image = [], 0
        for row, (images, passes, placeholders, pads) in enumerate(zip(
                call.images_per_row, self._tower_images_per_row(call), call.placeholders_per_row, call.pads_per_row)):
            llm_pass = call.llm
            lengths = llm_pass.layer_lengths if llm_pass else []
            dropped = llm_pass.layer_dropped if llm_pass else []
            row_counts = {
                # each image its own tower pass, their layers one pass after the other (`vision_crops` passes):
                # attention within an image, so two images are not one sequence of twice the tokens
                "vision": [list(pair) for pair in per_image_vision] * images,
                "visual_delivered": placeholders,
                "llm": [length - pads for length in lengths],
                "llm_visual": [placeholders - n for n in dropped] if placeholders else [0] * len(lengths),
                "overhead_macs": sum(image_overhead[first_image:first_image + passes])
                                 + self._llm_overhead(llm_pass, row, pads),
            }
            if images > 1:
                row_counts["vision_crops"] = images
            projected = image_projected[first_image:first_image + passes]
            if any(tokens is not None for tokens in projected):   # a projector step: the projector ran on more
                row_counts["projector_tokens"] = sum(tokens for tokens in projected if tokens is not None)
            if llm_pass is not None and llm_pass.mlp_dropped:     # reductions between a layer's attention and MLP
                row_counts["llm_mlp"] = [length - pads - (llm_pass.mlp_dropped.get(layer, before) - before)
                                         for layer, (length, before) in enumerate(zip(lengths, dropped))]
            counts.append(row_counts)
            first_image += passes
        return counts

    def _tower_images_per_row(self, call: Call) -> list[int]:
        """How many images each batch row put through the tower (its vision passes' rows): one per image
        here; a family that encodes an image in several passes (LLaVA-NeXT) counts the passes."""
        return call.images_per_row

    def last_padding(self) -> list[int]:
        """Per batch row of the most recent prefill, the padding tokens its LLM input held."""
        call = self._last_prefill
        return [] if call is None else list(call.pads_per_row)

    def row_plans(self) -> list[Plan]:
        """The plan each batch row of the most recent prefill is held to (ficoco.invariants checks its
        counts against it): the method's plan, the same for every row."""
        call = self._last_prefill
        return [] if call is None else [self.plan] * len(call.images_per_row)

    def _image_overhead(self, call: Call) -> list[int]:
        """Selection overhead of each image of a prefill's vision passes (`StepShape`), in image order."""
        overhead = []
        for vision_pass in call.vision:
            per_image = [0] * vision_pass.n_images
            for site, shapes in vision_pass.step_shapes:
                step = self.steps_by_site[site]
                for image, shape in enumerate(shapes):
                    per_image[image] += checked_overhead(self.method, step, self.dims, shape)
            overhead += per_image
        return overhead

    @staticmethod
    def _image_projected(call: Call) -> list[int | None]:
        """Tokens the projector ran on for each image where a projector step reduced its output (None
        elsewhere: the projector ran on the delivered tokens), in image order."""
        projected = []
        for vision_pass in call.vision:
            per_image = [None] * vision_pass.n_images
            for site, shapes in vision_pass.step_shapes:
                if site == "projector":
                    per_image = [shape.tokens for shape in shapes]
            projected += per_image
        return projected

    def _llm_overhead(self, llm_pass: LLMPass | None, row: int, pads: int) -> int:
        """Selection overhead of batch row `row`'s LLM steps, on its own length (padding excluded)."""
        if llm_pass is None or not llm_pass.step_shapes:
            return 0
        delivered = llm_pass.input_positions[0].shape[1]          # the (B, N0) image positions in the LLM input
        return sum(checked_overhead(self.method, llm_pass.step, self.dims,
                                     StepShape(layer, visual, kept, length=length - pads, instruction=instruction[row],
                                               delivered=delivered, keys_cached=keys_cached))
                   for layer, length, visual, kept, instruction, keys_cached in llm_pass.step_shapes)

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

    # -- what the patches ask for ---------------------------------------------------------------
    def _reduces_llm_cache(self) -> bool:
        """Whether a prefill may leave a reduced KV cache, whose decode steps need its record."""
        return self.llm_step is not None

    def _encoding_instructions(self) -> list[list[int]] | None:
        """Per image (tower pass) being encoded, its row's token ids after the row's last image: those of the
        current prefill, or of the `generate` call that encodes its images first; None outside both."""
        call = self._call
        if call is not None and call.prefill:
            return call.instructions
        return self._generate_instructions

    def _current_llm_pass(self) -> LLMPass | None:
        return self._call.llm if self._call is not None else None

    def _on_vision_pass(self, vision_pass: VisionPass) -> None:
        if self._call is not None:
            self._call.vision.append(vision_pass)
        else:
            self._vision_outside_call = vision_pass

    # -- per call -----------------------------------------------------------------------------------
    def _open_call(self, kwargs: dict) -> tuple[Call, Cache | None]:
        """Start the state of a forward call: a decode step (its cache already holds a prompt) takes its
        prefill's LLM view and gets its mask and positions to match a cache reduced from layer 0; a
        prefill gets a fresh `Call` that the family fills in. Returns the call and its cache."""
        cache = cache_of(kwargs)
        prefill = cache is None or not holds_tokens(cache)
        if not prefill:
            reference = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
            if reference is not None and reference.shape[1] > 1:
                raise ValueError(f"{self.method.name}: a forward of {reference.shape[1]} tokens per row on a KV cache "
                                 f"that already holds the prompt's first part (a chunked prefill, e.g. generate's "
                                 f"prefill_chunk_size): the counts and the reduction see one prefill of the whole "
                                 f"prompt; run the prompt in one forward")
        self._call = call = Call(prefill=prefill)
        if not prefill:
            prefill_call = self._prefill_by_cache.get(cache)
            if prefill_call is None and self._reduces_llm_cache():
                raise ValueError(f"{self.method.name}: a decode step on a KV cache whose prefill this handle did not "
                                 f"see (the prefill made its own cache); the cache may be reduced, and this step's "
                                 f"mask and positions could not be matched to it. Pass the prefill a cache "
                                 f"(cache=transformers.DynamicCache(config=model.config)) or use generate")
            if prefill_call is not None and prefill_call.llm is not None and prefill_call.llm.keep_at:
                call.llm = prefill_call.llm.decode_view()
        return call, cache

    def _open_forward(self, parameter_names: list[str], args: tuple, kwargs: dict) -> tuple[Call, Cache | None, dict]:
        """The start of a family's forward pre-hook: the call's keyword arguments (positional ones named by
        `parameter_names`), opened as `_open_call` does; a decode step whose cache was reduced from layer 0
        gets its mask and positions to match (`_decode_inputs`). Returns the call, its cache and the kwargs."""
        kwargs = {**dict(zip(parameter_names, args)), **kwargs}
        call, cache = self._open_call(kwargs)
        if not call.prefill and call.llm is not None:
            kwargs = self._decode_inputs(kwargs, cache, call.llm)
        return call, cache, kwargs

    def _span_llm_step(self, plan: Plan, where: str) -> LLMLayerStep | None:
        """The LLM step of `plan`, planned for one image span (`where`, in words), which must reduce on the
        layers installed (those of the nominal image's plan)."""
        steps = [step for step in self.method.steps(plan) if isinstance(step, LLMLayerStep)]
        step, installed = (steps[0] if steps else None), self.llm_step
        if (step is None) != (installed is None) or step is not None and (
                step.layers, step.placement, step.scores_from) != (installed.layers, installed.placement,
                                                                   installed.scores_from):
            raise ValueError(f"{self.method.name} at budget {plan.budget} on {where} plans its LLM reduction at layers "
                             f"{None if step is None else list(step.layers)}, and the nominal image's at "
                             f"{None if installed is None else list(installed.layers)}: one set of layers is installed")
        return step

    def _remember_prefill(self, call: Call, cache: Cache | None) -> None:
        if cache is not None:
            self._prefill_by_cache[cache] = call

    def _close_call(self) -> None:
        if self._call is not None and self._call.prefill:
            self._last_prefill = self._call
        self._call = None

    def _prefill_pass(self, is_image: torch.Tensor, valid: torch.Tensor | None, length: int,
                      step: LLMLayerStep | None = None, n0: int | None = None) -> LLMPass:
        """The LLM state of a prefill: visual and instruction positions when this call reduces. `step` and
        `n0` (the visual tokens per prompt it is planned for): the installed step's, unless given (a family
        whose plan depends on the image span, LLaVA-NeXT)."""
        step, n0 = (self.llm_step, self.llm_n0) if step is None else (step, n0)
        counts = is_image.sum(1)
        reduce = step is not None and bool(counts.any())
        if step is not None and not reduce:
            log.info("%s: no image tokens in this prefill; the LLM reduction is skipped", self.method.name)
        if not reduce:
            return self._unreduced_pass(length, valid)
        if not bool((counts == n0).all()):
            raise ValueError(f"{self.method.name}: the LLM reduction is planned for {n0} visual tokens "
                             f"per prompt; this batch has {counts.tolist()} image tokens per row (one image per "
                             f"prompt is supported, in every row of the batch)")
        batch = is_image.shape[0]
        visual = is_image.nonzero()[:, 1].view(batch, -1)                              # (B, N)
        instruction = after_last_image(is_image, valid)
        empty = [row for row, index in enumerate(instruction) if index.numel() == 0]
        if empty and step.needs_instruction:
            if batch == 1:
                log.info("%s: no instruction tokens after the image; the LLM reduction is skipped",
                         self.method.name)
                return self._unreduced_pass(length, valid)
            raise ValueError(f"{self.method.name}: rows {empty} have no prompt tokens after the image, so FiCoCo-L "
                             f"cannot score them; run them alone (they are then left unreduced)")
        return LLMPass(True, length, valid, visual, instruction, reduce=True, step=step)

    @staticmethod
    def _unreduced_pass(length: int, valid: torch.Tensor | None) -> LLMPass:
        """The LLM state of a prefill that reduces nothing."""
        return LLMPass(True, length, valid, None, None, reduce=False)

    @staticmethod
    def _decode_inputs(kwargs: dict, cache, decode: LLMPass) -> dict:
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


class Replacement:
    """An instance attribute set on an object (a method replaced on one model only); `remove()` deletes
    it, so the class's own attribute shows through again."""

    def __init__(self, owner, name: str, value):
        self.owner, self.name = owner, name
        setattr(owner, name, value)

    def remove(self) -> None:
        delattr(self.owner, self.name)


def forward_parameters(module, read: tuple[str, ...]) -> list[str]:
    """The parameter names of `type(module).forward` after `self` (a hook names positional arguments by them).
    RuntimeError when one of `read`, the keywords an adapter reads or passes by name, is not among them: a rename in
    transformers would leave the adapter reading None (padding counted, images never inserted) without an error."""
    import transformers

    names = list(inspect.signature(type(module).forward).parameters)[1:]
    missing = [name for name in read if name not in names]
    if missing:
        raise RuntimeError(f"transformers {transformers.__version__}: {type(module).__name__}.forward has no parameter "
                           f"{', '.join(map(repr, missing))} (it has {', '.join(names)}); the ficoco adapter reads and "
                           f"passes these by name. Install a tested version (requirements/lock.txt)")
    return names


def checked_overhead(method, step: Step, dims: ModelDims, shape: StepShape) -> int:
    """step.overhead(dims, shape), which must be a whole number of MACs >= 0."""
    macs = step.overhead(dims, shape)
    if isinstance(macs, bool) or not isinstance(macs, int) or macs < 0:
        raise ValueError(f"{method.name}: the {type(step).__name__} overhead at {shape} is {macs!r}; it must be an "
                         f"integer number of multiply-accumulates >= 0")
    return macs


def after_last_image(is_image: torch.Tensor, valid: torch.Tensor | None) -> list[torch.Tensor]:
    """Per row, the positions after its last image token that are not padding (the instruction its
    prompt asks about); every position of a row without an image token that is not padding.

    is_image, valid: (B, L) booleans (valid None: no padding)."""
    length = is_image.shape[1]
    positions = torch.arange(length, device=is_image.device)                           # (L,)
    last_image = torch.where(is_image, positions, -1).amax(dim=1, keepdim=True)          # (B, 1); -1: no image
    after_image = positions[None, :] > last_image                                      # (B, L)
    if valid is not None:
        after_image = after_image & valid
    return [positions[row] for row in after_image]


def row_instructions(input_ids: torch.Tensor, is_image: torch.Tensor, valid: torch.Tensor | None,
                     repeats: list[int]) -> list[list[int]]:
    """Each row's instruction (its token ids after its last image, padding excluded) `repeats[row]` times, row
    after row: one per image the tower encodes for it (LLaVA-NeXT: per tower pass)."""
    return [ids for row_ids, after, times in zip(input_ids, after_last_image(is_image, valid), repeats)
            for ids in [row_ids[after].tolist()] * times]


def _at_most_one(method, steps: tuple[Step, ...], kind: type):
    """The one step of `kind` among `steps` (None when there is none)."""
    found = [step for step in steps if isinstance(step, kind)]
    if len(found) > 1:
        raise ValueError(f"{method.name}: an adapter installs at most one {kind.__name__}; got "
                         f"{[type(step).__name__ for step in steps]}")
    return found[0] if found else None

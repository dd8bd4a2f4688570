"""Attach a method to a transformers 5.x `Qwen2VLForConditionalGeneration` or `Qwen2_5_VLForConditionalGeneration`
(issue 19; tested versions: guard.py): unreduced, the reductions inside the LLM, and those inside the tower's
blocks alone (FiCoCo-V with its CLS-free semantic term).

| part           | how                                                                                  |
|----------------|--------------------------------------------------------------------------------------|
| vision tower   | unpatched, unreduced over each image's patch grid (`image_grid_thw`); or, for a step in |
|                | its blocks, `QwenTowerPatch` (ficoco/models/qwen_tower.py): whole merge groups         |
|                | reduced, the merger's output put back at their groups' rows, dropped at LLM layer 0  |
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
and every image row of a batch with the same span, for a reduction (planned for one span in the LLM; in the
tower, each image on its own grid, and the LLM drops the same count of every row).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ficoco.budget import image_budget
from ficoco.budget_labels import ImageTokens
from ficoco.contract import LLMLayerStep, Plan, VisionLayerStep
from ficoco.models.guard import require_tested_transformers
from ficoco.models.handle import Handle, after_last_image, checked_overhead, forward_parameters
from ficoco.models.llama import LlamaPatch, LLMPass
from ficoco.models.placeholders import images_per_row, layouts_per_row
from ficoco.models.qwen_tower import QwenTowerPass, QwenTowerPatch
from ficoco.qwen_dims import QwenVLDims, qwen_has_sites, qwen_image_plan, qwen_refusal

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
    plan = qwen_image_plan(method, dims, dims.nominal_grid, budget, **overrides)     # the nominal image's
    return QwenVLHandle(model, method, dims, plan, budget, overrides)


class QwenVLHandle(Handle):
    """The installed method on a Qwen2-VL-family model: the LLM patch and the hooks that plan each prefill."""

    def __init__(self, model, method: Method, dims: QwenVLDims, plan: Plan, budget: int | ImageTokens | None,
                 overrides: dict):
        steps = method.steps(plan)
        if not qwen_has_sites(steps):
            raise ValueError(f"{method.name}: the Qwen2-VL adapter has no site for {[type(s).__name__ for s in steps]} "
                             f"(steps inside the LLM, or one inside the tower's blocks alone)")
        super().__init__(model, method, dims, plan, steps)
        self.budget, self.overrides = budget, overrides
        self.image_token_id = model.config.image_token_id
        self._span_steps: dict[int, LLMLayerStep | None] = {}      # image span -> the LLM step planned for it
        self._grid_steps: dict[tuple[int, int], VisionLayerStep | None] = {}   # patch grid -> its tower step
        inner = model.model
        self._parameter_names = forward_parameters(inner, ("input_ids", "attention_mask", "position_ids", "pixel_values",
                                                           "pixel_values_videos", "image_grid_thw", "mm_encoder_outputs"))
        self._encoded_grids: list[list[int]] | None = None   # the tower's latest grids, until a prefill reads them
        self._tower_outside_call: QwenTowerPass | None = None   # generate encodes the images before the prefill
        self._install(lambda: inner.visual.register_forward_pre_hook(self._before_tower, with_kwargs=True))
        if self.vision_step is not None:
            self._install(lambda: QwenTowerPatch(inner.visual, self.vision_step.layers, self._tower_steps,
                                                 self._on_tower_pass))
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
        if (self.llm_step is not None or self.vision_step is not None) and spans:
            if len(spans) > 1 or any(images > 1 for images in call.images_per_row):
                raise ValueError(f"{self.method.name}: a reduction is planned for one image per prompt and one "
                                 f"span per batch; this batch's rows hold {call.images_per_row} images of "
                                 f"{spans} tokens: batch images of one size, or one at a time")
            if self._kept_whole(spans[0]):    # images within a per-image count: no reduction runs on them
                call.llm = self._unreduced_pass(input_ids.shape[1], valid)
            elif self.vision_step is not None:
                call.llm = self._tower_kept_pass(is_image, valid, input_ids.shape[1])
                if kwargs.get("pixel_values") is None:      # generate encoded the images before this prefill
                    tower_pass, self._tower_outside_call = self._tower_outside_call, None
                    if tower_pass is None:
                        raise ValueError(f"{self.method.name}: this prefill's image features were not encoded by "
                                         f"the model's own tower under this handle, so which tokens the tower kept "
                                         f"is unknown: pass pixel_values, or use generate")
                    self._attach_tower(call, tower_pass)
            else:
                step = self._span_step(call.image_grids[0])
        if call.llm is None:
            call.llm = self._prefill_pass(is_image, valid, input_ids.shape[1], step, spans[0] if step else None)
        self._remember_prefill(call, cache)
        return (), kwargs

    # -- a reduction inside the tower ------------------------------------------------------------------
    def _tower_steps(self, grids: list[list[int]]) -> list[VisionLayerStep | None]:
        """Per image of a tower call, the step of its own plan (None: kept whole), on the installed blocks."""
        return [self._grid_step(tuple(grid)) for grid in grids]

    def _grid_step(self, grid: tuple[int, int]) -> VisionLayerStep | None:
        if grid not in self._grid_steps:
            steps = self.method.steps(self._grid_plan(grid))
            step = steps[0] if steps else None
            if step is not None and step.layers != self.vision_step.layers:
                raise ValueError(f"{self.method.name} on an image of patch grid {list(grid)} plans its tower "
                                 f"reduction at blocks {list(step.layers)}, and the nominal image's at "
                                 f"{list(self.vision_step.layers)}: one set of blocks is installed")
            self._grid_steps[grid] = step
        return self._grid_steps[grid]

    def _grid_plan(self, grid) -> Plan:
        """The method's plan for one image of patch grid `grid` (its span's share of the budget)."""
        return qwen_image_plan(self.method, self.dims, tuple(grid), self.budget, **self.overrides)

    @staticmethod
    def _tower_kept_pass(is_image: torch.Tensor, valid: torch.Tensor | None, length: int) -> LLMPass:
        """The LLM state of a prefill whose images the tower reduces: the visual tokens it did not keep are
        dropped at the input of layer 0 (`LLMPass.tower_kept`, set when the tower has run)."""
        visual = is_image.nonzero()[:, 1].view(is_image.shape[0], -1)                # (B, N)
        llm_pass = LLMPass(True, length, valid, visual, after_last_image(is_image, valid), reduce=False)
        llm_pass.awaits_tower_kept = True
        return llm_pass

    def _on_tower_pass(self, tower_pass: QwenTowerPass) -> None:
        call = self._call
        if call is not None and call.prefill:
            self._attach_tower(call, tower_pass)
        else:
            self._tower_outside_call = tower_pass

    @staticmethod
    def _attach_tower(call, tower_pass: QwenTowerPass) -> None:
        """The tower call of a prefill's images: its record, and which visual tokens of each row the LLM keeps."""
        call.tower = tower_pass
        if call.llm is not None and call.llm.awaits_tower_kept:
            if tower_pass.n_images != len(call.images_per_row):
                raise ValueError(f"the tower encoded {tower_pass.n_images} images for a prefill of "
                                 f"{len(call.images_per_row)} rows of one image each")
            call.llm.tower_kept = torch.stack(tower_pass.kept_raster())                  # (B, T)

    def _reduces_llm_cache(self) -> bool:
        return self.llm_step is not None or self.vision_step is not None

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

    def _span_step(self, grid: list[int]) -> LLMLayerStep | None:
        """The LLM step of the method's plan for an image of patch grid `grid` (the nominal budget's kept fraction
        of its span: every image of that span alike), which must reduce on the layers installed."""
        span = grid[0] * grid[1] // self.dims.merge_size ** 2
        if span not in self._span_steps:
            self._span_steps[span] = self._span_llm_step(self._grid_plan(grid), f"an image of {span} tokens")
        return self._span_steps[span]

    def row_plans(self) -> list[Plan]:
        """Per batch row of the most recent prefill: the plan of its image (unreduced for a row without one)."""
        call = self._last_prefill
        if call is None:
            return []
        return [self._grid_plan(grids[0]) if grids else self.method.plan(self.dims, None, **self.overrides)
                for grids in layouts_per_row(call.image_grids, call.images_per_row)]

    def last_counts(self) -> list[dict]:
        """Per batch row of the most recent prefill: contracts §2 counts (`Handle.last_counts`), with the tower's
        tokens per block, `vision_grids` (each image's patch grid: the windows of Qwen2.5-VL's blocks, and so
        their cost, follow it) and `vision_attention_pairs` (per block, the query-key pairs its attention
        scored: Σ s² over the sequences it attends within). An unpatched tower runs every block on every patch;
        a reducing one records what each block ran on, and `visual_delivered` is the groups it kept."""
        call = self._last_prefill
        if call is None:
            return []
        counts = super().last_counts()
        first_image = 0
        for row_counts, grids in zip(counts, layouts_per_row(call.image_grids, call.images_per_row)):
            images = range(first_image, first_image + len(grids))
            first_image += len(grids)
            row_counts["vision_grids"] = grids
            row_counts.pop("vision_crops", None)   # a row's images share one tower pass: each block runs them all
            if call.tower is None:
                patches = sum(rows * cols for rows, cols in grids)
                row_counts["vision"] = [[patches, patches]] * self.dims.vision_layers if grids else []
                continue
            tower = call.tower
            row_counts["vision"] = [[sum(pair) for pair in zip(*layer)] for layer in
                                    zip(*(tower.layer_counts[image] for image in images))] if grids else []
            row_counts["vision_attention_pairs"] = [sum(layer) for layer in
                                                    zip(*(tower.attention_pairs[image] for image in images))]
            row_counts["visual_delivered"] = sum(len(tower.units[image]) for image in images)
            row_counts["overhead_macs"] += sum(checked_overhead(self.method, self.vision_step, self.dims, shape)
                                               for image in images for shape in tower.step_shapes[image])
        return counts

    def last_trace(self) -> dict:
        """`Handle.last_trace`; with a reduction inside the tower, "vision" maps each reducing block to, per image,
        the raster positions of the merge groups it kept on that image's grid of groups, (N_l,) each (None for an
        image it did not reduce), and "llm" holds layer 0's drop of the others."""
        trace = super().last_trace()
        call = self._last_prefill
        if call is not None and call.tower is not None:
            trace["vision"] = {layer: list(kept) for layer, kept in call.tower.trace.items()}
        return trace

    def _decode_inputs(self, kwargs: dict, cache, decode) -> dict:
        """A decode step whose cache was reduced from layer 0: `Handle._decode_inputs`'s mask and 1-D positions,
        shifted by the prefill's `rope_deltas` (M-RoPE numbers text after an image from the image's largest
        position id on, not from its index) and, with a 2-D mask, back by each row's left padding, which the
        unreduced model's positions leave out as `rope_deltas` do."""
        given, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
        kwargs = super()._decode_inputs(kwargs, cache, decode)
        deltas = self.model.model.rope_deltas
        if given is None and kwargs.get("position_ids") is not None and deltas is not None:
            positions = kwargs["position_ids"] + deltas.to(kwargs["position_ids"].device)        # (B, Q)
            if mask is not None and mask.dim() == 2:
                pads = (mask[:, :decode.full_len] == 0).sum(dim=1, keepdim=True)                # (B, 1)
                positions = positions - pads.to(positions.device)
            kwargs = {**kwargs, "position_ids": positions}
        return kwargs

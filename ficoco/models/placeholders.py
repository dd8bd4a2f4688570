"""Image placeholders in the prompt (the LLaVA family's layout): one run of placeholder tokens per
image, which a vision-side reduction collapses to the count it delivers before the LLM runs.

`collapse_placeholders` shortens each image's run (one count for all images, or one per image),
re-pads rows whose lengths now differ and renumbers positions; `collapsing_generate` makes
`model.generate` run on the collapsed prompt and hand the caller's own prompt back in front of the
generated tokens, so the cache, masks and positions are built for the reduced prompt.
"""
from __future__ import annotations

import copy
import itertools
from typing import Callable, Sequence

import torch


def collapse_placeholders(input_ids: torch.Tensor, n_images: int, image_token_id: int, full: int | Sequence[int],
                          kept: int | Sequence[int], attention_mask: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None, *, pad_side: str = "left",
                          pad_token_id: int = 0) -> dict:
    """Keep the first `kept` of every image's `full` placeholders (input_ids (B, L) -> (B, L')).

    `full` and `kept` are each one count for every image, or one count per image (images in reading
    order: row by row, left to right; LLaVA-NeXT's images have spans of their own). Returns the new
    input_ids and, when given, attention_mask and position_ids (renumbered so the positions stay
    contiguous). Rows left with different lengths are padded to the longest on `pad_side` ("left" or
    "right") with `pad_token_id`, attention mask 0 (a mask is built when none was given) and position 0.
    Input that already holds the kept counts is returned unchanged ({}); any other count raises ValueError.
    """
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side={pad_side!r}; valid choices are 'left' and 'right'")
    per_image = [int(kept)] * n_images if isinstance(kept, int) else [int(count) for count in kept]
    full_per_image = [int(full)] * n_images if isinstance(full, int) else [int(count) for count in full]
    if len(per_image) != n_images or len(full_per_image) != n_images or not all(
            0 <= count <= most for count, most in zip(per_image, full_per_image)):
        raise ValueError(f"kept={per_image}: need one count in [0, full] for each of the {n_images} image(s) "
                         f"(full={full_per_image})")
    is_image = input_ids == image_token_id                                        # (B, L)
    total = int(is_image.sum())
    if total == sum(per_image):
        return {}
    reduced = f"{kept} per image" if isinstance(kept, int) else f"{sum(per_image)} in all ({per_image})"
    per_row = is_image.sum(1)
    if total != sum(full_per_image) or isinstance(full, int) and bool((per_row % full != 0).any()):
        raise ValueError(f"input_ids hold {total} image tokens (id {image_token_id}) for {n_images} image(s); "
                         f"expected {full} per image (as the processor inserts) or {reduced} (already reduced); "
                         f"image tokens per row: {per_row.tolist()}")
    batch, length = input_ids.shape
    order = is_image.reshape(-1).cumsum(0).view(batch, length) - 1                 # placeholder index, reading order
    spans = torch.tensor(full_per_image, device=input_ids.device)                  # (n_images,)
    ends = spans.cumsum(0)
    image = torch.searchsorted(ends, order.clamp(min=0), right=True).clamp(max=n_images - 1)   # (B, L)
    offset = order - (ends - spans)[image]                                         # within its image
    drop = is_image & (offset >= torch.tensor(per_image, device=input_ids.device)[image])      # (B, L)
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


def images_per_row(placeholders_per_row: list[int], counts: list[int]) -> list[int]:
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


def layouts_per_row(layouts: list, images_in_rows: list[int]) -> list[list]:
    """Each batch row's share of a per-image list (LLaVA-NeXT's AnyRes layouts, Qwen2-VL's spans), given every
    image's entry (reading order) and each row's image count."""
    ends = list(itertools.accumulate(images_in_rows))
    return [layouts[end - images:end] for images, end in zip(images_in_rows, ends)]


def pad_token_id(model, image_token_id: int) -> int:
    """The id that re-pads collapsed rows: the text pad token, else the generation pad token, else 0."""
    for candidate in (getattr(model.config.get_text_config(), "pad_token_id", None),
                      getattr(getattr(model, "generation_config", None), "pad_token_id", None), 0):
        if isinstance(candidate, int) and candidate != image_token_id:
            return candidate
    return 0 if image_token_id != 0 else 1


def collapsing_generate(collapse: Callable[[dict, object], dict], generate):
    """`model.generate` that runs on the collapsed prompt and returns the caller's prompt in front.

    `collapse(kwargs, inner_model)` returns the call's keyword arguments with the placeholders collapsed
    (input_ids included), padded on the left as generation needs.
    """

    def generate_collapsed(model, inputs=None, *args, **kwargs):
        input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
        pixel_values = kwargs.get("pixel_values")
        if input_ids is None or pixel_values is None or inputs_are_embeds(input_ids):
            return generate(model, input_ids, *args, **kwargs)
        with torch.no_grad():                                     # adaptive: the images are encoded here
            collapsed = collapse({**kwargs, "input_ids": input_ids}, model.model)
        short_ids = collapsed.pop("input_ids")
        output = generate(model, short_ids, *args, **collapsed)
        return restore_prompt(output, input_ids, short_ids.shape[1])

    return generate_collapsed


def instructing_generate(generate, remember: Callable[[dict | None], None]):
    """`model.generate` that calls `remember(kwargs)` with the call's keyword arguments (its prompt ids as
    `input_ids`) before it runs and `remember(None)` once it is done: transformers encodes the images
    before the first forward call, so a projector step that reads each image's instruction learns the
    prompts from here."""

    def run(model, inputs=None, *args, **kwargs):
        input_ids = kwargs.get("input_ids") if inputs is None else inputs
        if input_ids is not None and not inputs_are_embeds(input_ids):
            remember({**kwargs, "input_ids": input_ids})
        try:
            return generate(model, inputs, *args, **kwargs)
        finally:
            remember(None)

    return run


def inputs_are_embeds(inputs) -> bool:
    return isinstance(inputs, torch.Tensor) and inputs.dim() == 3


def restore_prompt(output, input_ids: torch.Tensor, short_length: int):
    """Replace the collapsed prompt at the front of the generated sequences by the original one."""
    def restore(sequences: torch.Tensor) -> torch.Tensor:
        return torch.cat([input_ids.to(sequences.device), sequences[:, short_length:]], dim=1)

    if isinstance(output, torch.Tensor):
        return restore(output)
    output = copy.copy(output)
    output.sequences = restore(output.sequences)
    return output

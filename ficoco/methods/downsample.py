"""Image downsampling (methods.md §8.13): fewer patches at the CLIP input, no token reduction.

The image is padded to a square and resized to side patch·g, where g is the largest integer with
g² ≤ B (LLaVA-1.5: g = 13 / 11 / 8 → 182 / 154 / 112 px for B = 192 / 128 / 64). CLIP runs with
its position embeddings interpolated to the g×g grid (the adapter does that) and the LLM receives
the g² patch features; its placeholders are collapsed to g² per image.

The resize acts on the pixel values the processor produced (already normalised, and padded to a
square by LLaVA-1.5's preprocessing), with antialiased bicubic interpolation — the filter PIL's
bicubic resize applies. Because the normalisation is a per-channel affine map, resizing before or
after it gives the same values; what differs from resizing the original picture straight to
patch·g px is only the intermediate resampling to the processor's size. Pixel values that already
have side patch·g (a processor configured for it, with g² placeholders) pass through unchanged.
Filter / correlate / compress are empty: no attention is read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ficoco.budget import downsample_side
from ficoco.contract import Needs, VisionInputStep
from ficoco.methods.base import Method
from ficoco.methods.shared import patches_for, unreduced_llm_plan


@dataclass(frozen=True)
class SquareResize:
    """(B, C, H, W) normalised pixel values -> (B, C, side, side): centred pad to a square, then resize.

    The pad value 0 is the normalised CLIP mean, the background LLaVA-1.5 pads with (up to its
    rounding to an 8-bit colour).
    """

    side: int

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        if height != width:
            extra = abs(height - width)
            before, after = extra // 2, extra - extra // 2
            pad = (before, after, 0, 0) if height > width else (0, 0, before, after)
            pixels = torch.nn.functional.pad(pixels, pad, value=0.0)
        if pixels.shape[-1] == self.side:
            return pixels
        resized = torch.nn.functional.interpolate(pixels.float(), size=(self.side, self.side), mode="bicubic",
                                                  align_corners=False, antialias=True)
        return resized.to(pixels.dtype)


def schedule(dims, budget, params) -> dict:
    side = dims.grid_side if budget is None else downsample_side(patches_for(dims, budget))
    patches = side * side
    delivered = patches + (dims.visual_tokens - dims.num_patches)       # "full" also delivers CLS
    return unreduced_llm_plan(dims, {
        "vision": {"layers": [], "image_side": side * dims.patch_size, "grid_hw": [side, side], "patches": patches},
        "vision_counts": [[1 + patches, 1 + patches]] * dims.vision_layers_run,
        "delivered": delivered,
    })


def build(plan: dict) -> tuple:
    if plan.budget is None:
        return ()
    side = plan.vision.image_side
    return (VisionInputStep(image_side=side, prepare=SquareResize(side)),)


METHOD = Method(
    name="downsample",
    summary="image downsampling: pad to square, resize to patch·g px (g² <= B patches; 14·g on LLaVA-1.5), "
            "interpolated position embeddings",
    phase="vision",
    acts_on=("vision",),
    needs=Needs(square_grid=True),
    needs_attention="none",
    stages={
        "filter": "none: the resized image yields g x g patches, g = floor(sqrt(B))",
        "correlate": "none",
        "compress": "none (the resize averages neighbouring pixels before CLIP)",
    },
    params={},
    schedule=schedule,
    build=build,
)

"""Spatial pooling (methods.md §8.12): adaptive average pooling of the feature grid to h×w = B.

filter    every patch belongs to one cell of the h×w output grid (the factor pair of B closest to
          square that fits the grid: 192 -> 12×16, 128 -> 8×16, 64 -> 8×8)
correlate each cell is the K = 1 target of its members
compress  the cell mean; cells in raster order (CLS is not delivered)
"""
from __future__ import annotations

from dataclasses import dataclass

from ficoco.budget import pooling_grid
from ficoco.contract import ImageTokens, StepShape, VisionOutputScores, VisionTokens
from ficoco.methods.base import Method
from ficoco.methods.shared import TOWER_NEEDS, feature_plan, output_build
from ficoco.paradigm.compress import pool_grid


@dataclass(frozen=True)
class PoolingReduce:
    """Average-pool the (H, W) patch grid to (h, w)."""

    grid_hw: tuple[int, int]
    out_hw: tuple[int, int]

    def __call__(self, layer: int, tokens: VisionTokens, scores: VisionOutputScores) -> ImageTokens:
        return ImageTokens(hidden=pool_grid(tokens.hidden[:, 1:], self.grid_hw, self.out_hw), positions=None)

    def overhead(self, dims, shape: StepShape) -> int:
        return 0                                                    # the cell means are pooling, no product


def schedule(dims, budget, params) -> dict:
    if budget is None:
        return feature_plan(dims, None, "vision_output")
    grid = (dims.grid_side, dims.grid_side)
    try:
        out = pooling_grid(budget, grid)
    except ValueError as error:
        raise ValueError(f"pooling: {error}") from None
    return feature_plan(dims, budget, "vision_output", grid_hw=list(grid), out_hw=list(out))


METHOD = Method(
    name="pooling",
    summary="Spatial pooling: average-pool the 24×24 feature grid to h×w = B, closest to square (after CLIP)",
    phase="vision",
    acts_on=("vision",),
    needs=TOWER_NEEDS,
    needs_attention="none",
    stages={"filter": "every patch belongs to one cell of the h×w grid (h·w = B, closest to square)",
            "correlate": "each cell is the K = 1 target of its members",
            "compress": "cell mean, cells in raster order"},
    params={},
    schedule=schedule,
    build=output_build(lambda plan: PoolingReduce(grid_hw=tuple(plan.post_vision.details["grid_hw"]),
                                                  out_hw=tuple(plan.post_vision.details["out_hw"]))),
)

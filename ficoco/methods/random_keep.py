"""Random (methods.md §8.10): keep B patches drawn uniformly without replacement, per image.

filter    B of the feature layer's patches drawn uniformly without replacement, in positional order
correlate K = 0
compress  delete the rest (CLS is not delivered)

Seeding. The spec seeds every sample with hash(global_seed, sample_id); the adapter never sees
sample ids, so the per-image id is the **content of the image**: the draw of an image is seeded
with `sample_seed(seed, sha256 of its pixel values)`. The same image with the same `seed` always
keeps the same patches, whatever batch it is in and at whatever position (so a batch equals its
rows run alone), and two identical images in a dataset keep the same patches. The digest covers
the pixel tensor's shape, dtype and bytes, so a different preprocessing or dtype is a different draw.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ficoco.contract import ImageTokens, StepShape, VisionOutputScores, VisionTokens
from ficoco.methods.base import Method, Param, non_negative_int
from ficoco.methods.shared import TOWER_NEEDS, check_patch_count, feature_plan, keep_patches, output_build
from ficoco.paradigm.filter import random_positions, sample_seed


@dataclass(frozen=True)
class RandomReduce:
    """Keep `keep` patches per image, drawn with a generator seeded from (seed, the image's digest)."""

    keep: int
    seed: int

    def __call__(self, layer: int, tokens: VisionTokens, scores: VisionOutputScores) -> ImageTokens:
        n = tokens.positions.shape[1]
        draws = [random_positions(n, self.keep, torch.Generator().manual_seed(sample_seed(self.seed, digest)))
                 for digest in scores.image_digests()]                        # each (1, keep), on the CPU
        return keep_patches(tokens, torch.cat(draws).to(tokens.hidden.device))

    def overhead(self, dims, shape: StepShape) -> int:
        return 0                                                    # digests, random draws, a gather: no product


def schedule(dims, budget, params) -> dict:
    if budget is not None:
        check_patch_count("random", dims, budget, "budget (patches kept)")
    return feature_plan(dims, budget, "vision_output", kept=budget, seed=params["seed"],
                        seeding="sample_seed(seed, sha256 of the image's pixel values)")


METHOD = Method(
    name="random",
    summary="Random: keep B patches drawn uniformly per image, seeded by (seed, image content) (after CLIP)",
    phase="vision",
    acts_on=("vision",),
    needs=TOWER_NEEDS,
    needs_attention="none",
    stages={"filter": "B patches drawn uniformly without replacement (seed = sample_seed(seed, image digest))",
            "correlate": "K = 0",
            "compress": "delete the other patches; kept patches in positional order"},
    params={"seed": Param(0, "global seed; each image's draw is seeded by (seed, sha256 of its pixel values)",
                          non_negative_int)},
    schedule=schedule,
    build=output_build(lambda plan: RandomReduce(keep=plan.post_vision.tokens_out, seed=plan.params["seed"])),
)

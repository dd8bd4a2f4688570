"""CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967): the projected visual tokens whose conditional
diversity, given the instruction, is largest; before the LLM.

filter    relevance r of each token to the instruction from CLIP: the mean negative cosine of its image
          embedding with the instruction's text embeddings, min–max normalised over the image
          (`instruction_relevance`, the authors' sign and normalisation); conditional kernel
          L = diag(r)·S·diag(r), S the cosine similarity of the projected tokens; greedy MAP inference
          of the DPP with kernel L picks B tokens (`dpp_greedy_map`)
correlate K = 0
compress  delete the rest; kept tokens in positional order

The image and text embeddings come from the CLIP checkpoint the vision tower came from (its text
tower is a companion of the model: `Method.needs_text_tower`, ficoco/models/companion.py); the
adapter hands them to the step as `InstructionScores`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ficoco.contract import ImageTokens, InstructionScores, ProjectorStep, StepShape
from ficoco.methods.base import Method
from ficoco.methods.shared import cosine_macs, feature_plan
from ficoco.paradigm.compress import gather_tokens
from ficoco.paradigm.filter import conditional_kernel, dpp_greedy_map, instruction_relevance


def dpp_macs(tokens: int, keep: int) -> int:
    """`dpp_greedy_map` picking `keep` of `tokens`: pick i projects every item's row on the i factors
    before it (i·N multiply-adds); the rest is element-wise."""
    return tokens * keep * (keep - 1) // 2


@dataclass(frozen=True)
class CDPrunerReduce:
    """Projector site: keep the `keep` projected tokens of every image the conditional DPP chooses."""

    keep: int

    def __call__(self, layer: int, tokens: ImageTokens, scores: InstructionScores) -> ImageTokens:
        relevance = torch.stack([instruction_relevance(cosines) for cosines in scores.instruction_cosines()])  # (B, N)
        kept = dpp_greedy_map(conditional_kernel(tokens.hidden, relevance), self.keep)         # (B, keep)
        return ImageTokens(hidden=gather_tokens(tokens.hidden, kept), positions=tokens.positions.gather(1, kept))

    def overhead(self, dims, shape: StepShape) -> int:
        """The N×N similarity of the projected tokens and the greedy picks; the CLIP embeddings and their
        cosines are the companion's (`StepShape.companion_macs`)."""
        return cosine_macs(shape.tokens, shape.tokens, dims.llm_hidden) + dpp_macs(shape.tokens, self.keep) \
            + shape.companion_macs


def schedule(dims, budget, params) -> dict:
    if budget is None:
        return feature_plan(dims, None, "projector")
    return {**feature_plan(dims, budget, "projector", kept=budget), "projector_tokens": dims.visual_tokens}


def build(plan) -> tuple:
    post = plan.post_vision
    if post is None:
        return ()
    reduce = CDPrunerReduce(keep=post.tokens_out)
    return (ProjectorStep(reduce=reduce, tokens_out=post.tokens_out, overhead=reduce.overhead, reads_instruction=True),)


METHOD = Method(
    name="cdpruner",
    summary="CDPruner: greedy MAP of a DPP over the projected tokens, its kernel conditioned on the instruction's "
            "CLIP relevance, before the LLM",
    phase="projector",
    acts_on=("projector",),
    needs_attention="none (CLIP image and text embeddings of the vision tower's checkpoint)",
    stages={"filter": "relevance r = min–max of the mean negative CLIP cosine to the instruction; kernel "
                      "L = diag(r)·S·diag(r) on the projected tokens' cosines; greedy DPP MAP keeps B",
            "correlate": "K = 0",
            "compress": "delete the rest; kept tokens in positional order"},
    params={},
    schedule=schedule,
    build=build,
    needs_text_tower=True,
)

"""DivPrune (methods.md §8.9): a max–min diverse subset of the projected visual tokens.

filter    distance = 1 − cosine between the projected tokens of one image; greedy max–min diversity:
          first the token whose nearest other token is farthest, then repeatedly the token farthest
          from the chosen set, until B are chosen (ties to the lower position)
correlate K = 0
compress  delete the rest; kept tokens in positional order

`positions` (logged in the plan):
- "contiguous" (default): a `ProjectorStep`; the LLM gets B image tokens at contiguous positions.
- "original" (the official code): an `LLMLayerStep` at decoder layer 0, whose input at the image
  span is exactly the projected tokens; kept tokens keep their original RoPE positions (with gaps)
  and the prompt after the image keeps its original positions. All 576 tokens are projected and
  embedded (`visual_delivered` = 576); every LLM layer processes B of them.
"""
from __future__ import annotations

from dataclasses import dataclass

from ficoco.contract import ImageTokens, LLMKept, LLMLayerStep, LLMScores, LLMTokens, ProjectorStep, StepShape
from ficoco.methods.base import Method, Param, one_of
from ficoco.methods.shared import staged_llm_plan
from ficoco.methods.shared import cosine_macs, feature_plan
from ficoco.paradigm.compress import gather_tokens
from ficoco.paradigm.filter import divprune_select

POSITIONS = ("contiguous", "original")


def divprune_macs(dims, tokens: int, keep: int) -> int:
    """`divprune_select` on `tokens` projected tokens (LLM width): the N×N cosine matrix, none when
    nothing is kept (it returns before); the greedy picks only read that matrix."""
    return 0 if keep == 0 else cosine_macs(tokens, tokens, dims.llm_hidden)


@dataclass(frozen=True)
class DivPruneReduce:
    """Projector site: keep the `keep` most diverse projected tokens of every image."""

    keep: int

    def __call__(self, layer: int, tokens: ImageTokens, scores: None) -> ImageTokens:
        kept = divprune_select(tokens.hidden, self.keep)                          # (B, keep) into the tokens
        return ImageTokens(hidden=gather_tokens(tokens.hidden, kept), positions=tokens.positions.gather(1, kept))

    def overhead(self, dims, shape: StepShape) -> int:
        return divprune_macs(dims, shape.tokens, self.keep)


@dataclass(frozen=True)
class DivPruneLLMInputReduce:
    """LLM layer 0 (original positions): the same selection on the image span of the LLM input."""

    keep: int

    def __call__(self, layer: int, tokens: LLMTokens, scores: LLMScores) -> LLMKept:
        kept = divprune_select(gather_tokens(tokens.hidden, tokens.visual), self.keep)  # into the image span
        return LLMKept(hidden=tokens.hidden, visual=tokens.visual.gather(1, kept))

    def overhead(self, dims, shape: StepShape) -> int:
        return divprune_macs(dims, shape.tokens, self.keep)                  # shape.tokens: the N visual tokens


def schedule(dims, budget, params) -> dict:
    if budget is None:
        return feature_plan(dims, None, "projector")
    if params["positions"] == "contiguous":                 # the projector runs on every image token first
        return {**feature_plan(dims, budget, "projector", kept=budget, positions=params["positions"]),
                "projector_tokens": dims.visual_tokens}
    return {**staged_llm_plan(dims, {0: budget}),
            "post_vision": {"site": "llm_input", "layer": 0, "tokens_out": budget, "kept": budget,
                            "positions": "original"}}


def build(plan: dict) -> tuple:
    post = plan.post_vision
    if post is None:
        return ()
    if post.details["positions"] == "contiguous":
        reduce = DivPruneReduce(keep=post.tokens_out)
        return (ProjectorStep(reduce=reduce, tokens_out=post.tokens_out, overhead=reduce.overhead),)
    reduce = DivPruneLLMInputReduce(keep=post.tokens_out)
    return (LLMLayerStep(layers=(0,), reduce=reduce, tokens_out={0: post.tokens_out}, overhead=reduce.overhead,
                         needs_instruction=False),)


METHOD = Method(
    name="divprune",
    summary="DivPrune: greedy max–min diverse subset (1 − cosine) of the projected visual tokens, before the LLM",
    phase="projector",
    acts_on=("projector",),
    needs_attention="none",
    stages={"filter": "greedy max–min diversity under 1 − cosine of the projected tokens; B are kept",
            "correlate": "K = 0",
            "compress": "delete the rest; kept tokens in positional order"},
    params={"positions": Param("contiguous", "RoPE positions of the kept tokens: 'contiguous' (a shorter image "
                                             "span) or 'original' (the official code: original ids with gaps)",
                               one_of(POSITIONS))},
    schedule=schedule,
    build=build,
)

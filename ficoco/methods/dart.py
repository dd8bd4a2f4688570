"""DART (methods.md §8.8): duplication-aware pruning at the input of LLM layer K, during prefill.

filter    pivots: the n_pivots image tokens and the n_pivots text tokens with the largest L1 norm
          of layer K−1's keys (after RoPE, as that layer's KV cache holds them); each pivot in turn
          (image pivots, then text pivots, each by descending norm) takes its quota of the not yet
          taken image tokens least cosine-similar to it, measured on the layer-K input passed
          through the LLM's final norm; retained = image pivots ∪ taken (`paradigm.filter.dart_select`)
correlate K = 0 (pure pruning)
compress  delete the rest from the sequence and the KV cache of layers ≥ K; kept tokens keep their
          original RoPE positions

Text tokens are the prompt tokens after the image (the instruction), as in the official code; a
prompt without any has image pivots only. Budget: the FastV token equivalence
k(B) = ⌊(L·B − 576·K)/(L − K)⌋ (166 / 98 / 29 on LLaVA-1.5-7B with K = 2); quotas ⌊(k − 4)/8⌋
with the first pivots taking the remainder, so exactly k tokens are retained.
"""
from __future__ import annotations

from dataclasses import dataclass

from ficoco.contract import LLMKept, LLMScores, LLMTokens, StepShape
from ficoco.methods.base import Method, Param, positive_int
from ficoco.methods.shared import LLM_NEEDS, cosine_macs, llm_key_macs, one_shot_schedule, one_shot_step
from ficoco.paradigm.attention import key_l1_norm
from ficoco.paradigm.compress import gather_tokens
from ficoco.paradigm.filter import dart_select


@dataclass(frozen=True)
class DartReduce:
    """Keep `keep` image tokens chosen by DART's pivot duplication rule."""

    keep: int
    n_pivots: int

    def __call__(self, layer: int, tokens: LLMTokens, scores: LLMScores) -> LLMKept:
        key_norm = key_l1_norm(scores.keys())                                  # (B, L) layer K−1's keys
        visual, text = tokens.visual, tokens.instruction
        normed_visual = scores.final_norm(gather_tokens(tokens.hidden, visual))     # (B, N, D)
        normed_text = scores.final_norm(gather_tokens(tokens.hidden, text))         # (B, M, D)
        chosen = dart_select(normed_visual, normed_text, key_norm.gather(1, visual), key_norm.gather(1, text),
                             self.keep, self.n_pivots)                              # (B, k) into the visual axis
        return LLMKept(hidden=tokens.hidden, visual=visual.gather(1, chosen))

    def overhead(self, dims, shape: StepShape) -> int:
        pivots = min(self.n_pivots, shape.kept) + min(self.n_pivots, shape.instruction)   # image + text pivots
        keys = llm_key_macs(dims, shape)                                        # layer K−1's keys of the sequence
        return keys + cosine_macs(pivots, shape.tokens, dims.llm_hidden)        # (P×D)·(D×N) pivot similarities


schedule = one_shot_schedule("dart")


def build(plan: dict) -> tuple:
    # DART also works without text tokens (image pivots only), so a prompt ending at the image is reduced too
    return one_shot_step(plan, lambda keep: DartReduce(keep=keep, n_pivots=plan.params["n_pivots"]),
                         needs_instruction=False)


METHOD = Method(
    name="dart",
    summary="DART: at the input of LLM layer 2, keep the image pivots (largest key L1 norm of layer 1) and the "
            "image tokens least similar to each image/text pivot; k(B) as FastV",
    phase="llm",
    acts_on=("llm",),
    needs=LLM_NEEDS,
    needs_attention="no attention probabilities: layer K−1's keys (L1 norm) and the layer-K input hidden states",
    stages={
        "filter": "pivots = top image and text tokens by layer K−1's key L1 norm; each pivot takes the image tokens "
                  "least cosine-similar to it (final-norm hidden states); retained = image pivots + taken",
        "correlate": "K = 0 (pure pruning)",
        "compress": "delete the other image tokens from the sequence and the KV cache of layers >= K (kept tokens "
                    "keep their RoPE positions)",
    },
    params={
        "layer": Param(2, "K: image tokens are dropped at the input of LLM layer K (0-based); pivots come from "
                          "layer K−1's keys", positive_int),
        "n_pivots": Param(4, "pivots of each kind (image tokens and text tokens)", positive_int),
    },
    schedule=schedule,
    build=build,
)

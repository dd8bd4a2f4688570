"""FiCoCo-L (methods.md §4): filter -> correlate -> compress at the input of LLM decoder layers.

At each layer of the window s..s+w−1, during prefill, on the layer's own causal attention:
filter   s_i = β·(attention visual token i receives from the other visual tokens)
               − (1−β)·(attention it receives from the instruction tokens); highest = sources
correlate C_ij = γ·A[max(i,j), min(i,j)] + (1−γ)·(1/M)Σ_k A[k,i]·A[k,j]; ε-quantile targets
compress self-preserving merge into the residual stream, then the sources leave the sequence
         (and the KV cache of this and later layers); kept tokens keep their RoPE positions.
Placement "attention" (the released code's, a parameter): the same steps between the attention and
the MLP of each reducing layer, on the probabilities its attention computed; the sources leave the
MLP of that layer and every later layer (docs/methods.md, "FiCoCo-L placement").
"""
from __future__ import annotations

from ficoco.methods.base import Method, Param, non_negative_int, positive_int
from ficoco.methods.shared import LANGUAGE_PARAMS, LLM_NEEDS, language_step, llm_plan, vision_layer_counts


def schedule(dims, budget, params) -> dict:
    delivered = dims.visual_tokens
    return {"vision": None, "vision_counts": vision_layer_counts(dims, {}), "delivered": delivered,
            **llm_plan("ficoco-l", dims, delivered, budget, params["start"], params["window"], params["placement"])}


def build(plan: dict) -> tuple:
    step = language_step(plan.llm, plan.params) if plan.llm else None
    return () if step is None else (step,)


STAGES = {
    "filter": "β·(attention received from other visual tokens) − (1−β)·(attention from the instruction); "
              "highest = sources",
    "correlate": "γ·direct causal attention + (1−γ)·indirect attention through the instruction; ε-quantile targets",
    "compress": "self-preserving weighted merge into the residual stream, then drop the sources from the "
                "sequence and KV cache (kept tokens keep their RoPE positions)",
}

METHOD = Method(
    name="ficoco-l",
    summary="FiCoCo-L: filter-correlate-compress at the input of LLM layers 4..7 during prefill",
    phase="llm",
    acts_on=("llm",),
    needs=LLM_NEEDS,
    needs_attention="causal attention rows of the visual and instruction tokens, visual columns, at each reducing "
                    "LLM layer (computed from the layer's own q/k; the layer keeps SDPA; with placement='attention' "
                    "the probabilities the layer's own attention computed, which then runs explicitly)",
    stages=STAGES,
    params={**LANGUAGE_PARAMS,
            "start": Param(4, "first reducing LLM decoder layer s (0-based)", non_negative_int),
            "window": Param(4, "number of consecutive reducing LLM layers w", positive_int)},
    schedule=schedule,
    build=build,
)

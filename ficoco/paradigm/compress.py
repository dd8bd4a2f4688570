"""Compress: fold the sources into the targets (or into new tokens), then keep only the targets.

Arithmetic runs in float32 and the result is cast back to the input dtype, so bf16/fp16 models
lose no precision to accumulation. A target that receives no weight comes back bit-identical.

Shapes: B = batch, N = tokens, S = sources, T = targets, D = width.
Index tensors are int64 positions into the token axis.
"""
from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The tokens x[b, index[b]] of every sample, in the order of index.

    x: (B, N, D); index: (B, K) -> (B, K, D).
    """
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def self_preserving_merge(x_targets: torch.Tensor, x_sources: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """FiCoCo's merge x_j ← (x_j + Σ_i α_ij x_i) / (1 + Σ_i α_ij) (methods.md §3 step 8).

    x_targets: (B, T, D); x_sources: (B, S, D); weights α: (B, S, T) -> (B, T, D) in x_targets'
    dtype. The target keeps weight 1, so it is never swamped by its sources; every source
    contributes its pre-merge value.
    """
    weights = weights.float()
    incoming = weights.transpose(1, 2) @ x_sources.float()  # (B, T, D): Σ_i α_ij x_i
    incoming_weight = weights.sum(dim=1).unsqueeze(-1)  # (B, T, 1): Σ_i α_ij
    merged = (x_targets.float() + incoming) / (1.0 + incoming_weight)
    return merged.to(x_targets.dtype)

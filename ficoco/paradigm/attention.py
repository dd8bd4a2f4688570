"""Token metrics the filters and correlations read: head-averaged attention probabilities, key
summaries, cosine similarity, and the key bias of proportional attention.

Everything is computed in float32 and per sample (a batch never mixes images).
Shapes: B = batch, H = query heads, H_kv = key heads (H_kv divides H for grouped-query attention),
Nq / Nk = query / key tokens, d = head dim.
"""
from __future__ import annotations

import torch


def on_host(x: torch.Tensor) -> bool:
    """Whether `x` lives on the CPU, where a step may read its values (a data-dependent branch, `nonzero`, a
    check with the offending values in its message) at no cost. On an accelerator a step keeps to device-only
    code: a read waits for all the work queued before it."""
    return x.device.type == "cpu"


def require(condition: torch.Tensor, message: str, error: type[Exception] = ValueError) -> None:
    """Raise `error(message)` unless the 0-d boolean `condition` holds: on the CPU at once; on an accelerator as
    a device-side assertion, which reads nothing on the host (the failure surfaces at the next synchronisation)."""
    if on_host(condition):
        if not bool(condition):
            raise error(message)
    else:
        torch._assert_async(condition, message)


def _float32(x: torch.Tensor) -> torch.Tensor:
    """x as float32; x itself when it already is (skips a dispatch that would return it anyway)."""
    return x if x.dtype == torch.float32 else x.float()


def _repeat_kv_heads(k: torch.Tensor, n_query_heads: int) -> torch.Tensor:
    """(B, H_kv, Nk, d) -> (B, H, Nk, d): every key head serves H / H_kv query heads (GQA)."""
    n_kv_heads = k.shape[1]
    if n_query_heads % n_kv_heads:
        raise ValueError(
            f"key heads ({n_kv_heads}) must divide query heads ({n_query_heads}) for grouped-query attention"
        )
    if n_kv_heads == n_query_heads:
        return k  # no grouping: repeat_interleave(1) would only copy
    return k.repeat_interleave(n_query_heads // n_kv_heads, dim=1)


HEAD_REDUCTIONS = ("mean", "max")     # how per-head probabilities become one map (`reduce_heads`)


def reduce_heads(probs: torch.Tensor, heads: str) -> torch.Tensor:
    """(B, H, Nq, Nk) -> (B, Nq, Nk): the mean over heads (every method but FitPrune) or the maximum
    (FitPrune's "head-max" attention map)."""
    if heads == "mean":
        return probs.mean(dim=1)
    if heads == "max":
        return probs.amax(dim=1)
    raise ValueError(f"heads={heads!r}; valid choices are {list(HEAD_REDUCTIONS)}")


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float,
                    additive_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention probabilities per head, in float32 from the q·k products on (spec methods.md §0: A in
    float32, whatever the model's dtype): the one home of every explicit attention that yields scores.

    q: (B, H, Nq, d); k: (B, H_kv, Nk, d) with H_kv dividing H (repeated for GQA);
    scale: logit scale, usually 1/sqrt(d); additive_mask: broadcastable to (B, H, Nq, Nk),
    0 where allowed and a large negative number (or -inf) where masked.
    Returns (B, H, Nq, Nk); row = query, column = key, every row sums to 1 except rows whose keys
    are all masked with -inf, which are all zero (a padding query attends to nothing).
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, H, N, d); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    k = _repeat_kv_heads(k, q.shape[1])
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)  # (B, H, Nq, Nk), a fresh tensor
    if additive_mask is None:
        return logits.softmax(dim=-1)   # no mask: no row is all -inf
    mask = additive_mask.float()
    if torch.broadcast_shapes(logits.shape, mask.shape) == logits.shape:
        logits = logits.add_(mask)
    else:
        logits = logits + mask
    probs = logits.softmax(dim=-1)  # (B, H, Nq, Nk)
    if logits.shape[-1]:
        # softmax over an all -inf row is NaN; such a query sees no key, so it gives no attention.
        # A row is all -inf exactly when its maximum is -inf (a NaN maximum compares False).
        fully_masked = logits.amax(dim=-1, keepdim=True) == float("-inf")  # (B, H, Nq, 1)
        probs = probs.masked_fill(fully_masked, 0.0)  # not in place: softmax's backward reads its output
    return probs


def head_mean_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    additive_mask: torch.Tensor | None = None,
    heads: str = "mean",
) -> torch.Tensor:
    """`attention_probs` averaged over heads (`heads="max"`: their maximum): (B, Nq, Nk) float32."""
    return reduce_heads(attention_probs(q, k, scale, additive_mask), heads)  # (B, Nq, Nk)


def head_mean_keys(k: torch.Tensor) -> torch.Tensor:
    """Keys averaged over heads, the similarity metric of ToMe and VisionZip.

    k: (B, H, N, d) -> (B, N, d) float32. Cosine-based correlations normalise it themselves.
    """
    return k.float().mean(dim=1)


def key_l1_norm(k: torch.Tensor) -> torch.Tensor:
    """L1 norm of every token's key over all heads and dims (DART's pivot score).

    k: (B, H, N, d) -> (B, N) float32.
    """
    return k.float().abs().sum(dim=(1, 3))


def pairwise_cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of x with every row of y, in float32.

    x: (B, n, D), y: (B, m, D) -> (B, n, m). A zero vector has cosine 0 with everything.
    """
    x_unit = torch.nn.functional.normalize(x.float(), dim=-1)  # (B, n, D)
    y_unit = torch.nn.functional.normalize(y.float(), dim=-1)  # (B, m, D)
    return x_unit @ y_unit.transpose(-1, -2)  # (B, n, m)


def proportional_attention_bias(sizes: torch.Tensor) -> torch.Tensor:
    """ToMe's proportional attention: log(size of the key) added to every attention logit.

    sizes: (B, N) tokens merged into each key (1 for an unmerged token) -> (B, 1, 1, N) float32,
    an additive mask that broadcasts over heads and queries (usable with SDPA's float mask).
    """
    return sizes.float().log()[:, None, None, :]

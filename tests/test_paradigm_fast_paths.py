"""The cheap code paths of the FiCoCo step against the plain definitions they replace.

- `correlate._row_quantile` (a partial top-k) must be bit-identical to torch.quantile's linear
  interpolation, ties, tiny rows, ±inf and NaN included;
- `adaptive_quantile_weights` must give bit-identical α to the sort-based formulation;
- the CPU merge sums only the nonzero α, each target adding its sources in ascending order;
- `gather_tokens` / `take` (row copies) must equal the element-wise gathers;
- on an accelerator, FiCoCo-V's, FiCoCo-L's and FastV's steps read no device value on the host (meta tensors).
"""
from __future__ import annotations

import pytest
import torch

from ficoco.paradigm import compress, correlate

QUANTILES = [0.998, 0.999, 0.9975, 0.99, 0.9, 0.75, 0.5, 0.123456, 0.0, 1.0]


def _rows(kind: str, batch: int, n_rows: int, n: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "continuous":
        return torch.rand(batch, n_rows, n, generator=generator)
    if kind == "ties":  # a few distinct values: long runs of equal entries around every rank
        return torch.randint(0, 4, (batch, n_rows, n), generator=generator).float() / 3
    if kind == "attention":  # softmax rows, as FiCoCo's C = A[S, T]
        return (torch.randn(batch, n_rows, n, generator=generator) * 4).softmax(-1)
    if kind == "rounded":  # signed values with ties
        return torch.randn(batch, n_rows, n, generator=generator).round(decimals=1)
    values = torch.randn(batch, n_rows, n, generator=generator)  # "special": ±inf and NaN entries
    draw = torch.rand(values.shape, generator=generator)
    values[draw < 0.01] = float("nan")
    values[(draw > 0.5) & (draw < 0.52)] = float("inf")
    values[draw > 0.98] = float("-inf")
    return values


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality that also accepts NaN in the same places."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@pytest.mark.parametrize("kind", ["continuous", "ties", "attention", "rounded", "special"])
def test_row_quantile_is_bit_identical_to_torch_quantile(kind):
    generator = torch.Generator().manual_seed(len(kind))
    sizes = list(range(1, 12)) + [17, 50, 400, 405, 406, 500, 501, 502, 529, 576, 577, 1000]
    for n in sizes:
        rows = _rows(kind, 2, 6, n, generator)
        for q in QUANTILES:
            want = torch.quantile(rows, q, dim=-1, keepdim=True)
            got = correlate._row_quantile(rows, q)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert _same(got, want), (kind, n, q)


def test_row_quantile_rejects_bad_input():
    with pytest.raises(ValueError, match="q must be in"):
        correlate._row_quantile(torch.zeros(1, 3), 1.5)
    with pytest.raises(ValueError, match="empty row"):
        correlate._row_quantile(torch.zeros(2, 0), 0.5)


def _adaptive_by_sort(corr: torch.Tensor, eps: float) -> torch.Tensor:
    """adaptive_quantile_weights as first written: a full torch.quantile, then α over J_i."""
    corr = corr.float()
    chosen = corr >= torch.quantile(corr, eps, dim=-1, keepdim=True)
    chosen_corr = torch.where(chosen, corr, torch.zeros_like(corr))
    row_sum = chosen_corr.sum(dim=-1, keepdim=True)
    underflow = row_sum == 0
    uniform = chosen.float() / chosen.sum(dim=-1, keepdim=True).clamp(min=1)
    return torch.where(underflow, uniform, chosen_corr / row_sum.masked_fill(underflow, 1.0))


@pytest.mark.parametrize("kind", ["continuous", "ties", "attention", "rounded"])
@pytest.mark.parametrize("eps", [0.998, 0.9, 0.5])
def test_adaptive_weights_equal_the_sort_based_definition(kind, eps):
    generator = torch.Generator().manual_seed(17)
    for n_targets in [1, 2, 3, 7, 405, 501, 577]:
        corr = _rows(kind, 2, 9, n_targets, generator).abs()
        corr[0, 0] = 0.0  # a zero row: J_i is the whole row and α falls back to uniform
        assert _same(correlate.adaptive_quantile_weights(corr, eps), _adaptive_by_sort(corr, eps)), (n_targets,)


def test_adaptive_weights_of_a_nan_row_are_zero_as_before():
    corr = torch.rand(1, 3, 600, generator=torch.Generator().manual_seed(3))
    corr[0, 1, 10] = float("nan")
    got = correlate.adaptive_quantile_weights(corr, 0.998)
    assert _same(got, _adaptive_by_sort(corr, 0.998))
    assert torch.all(got[0, 1] == 0)


def _merge_in_source_order(x_targets, x_sources, weights):
    """The merge with Σ_i α_ij x_i accumulated in float32, one source at a time, in ascending i."""
    batch, n_sources, n_targets = weights.shape
    incoming = torch.zeros(batch, n_targets, x_sources.shape[-1])
    for b in range(batch):
        for i in range(n_sources):
            for j in range(n_targets):
                if weights[b, i, j] != 0:
                    incoming[b, j] = incoming[b, j] + weights[b, i, j] * x_sources[b, i]
    return (x_targets + incoming) / (1.0 + weights.sum(dim=1).unsqueeze(-1))


def test_sparse_merge_sums_each_targets_sources_in_ascending_order():
    generator = torch.Generator().manual_seed(5)
    batch, n_sources, n_targets, width = 3, 40, 25, 16
    corr = torch.rand(batch, n_sources, n_targets, generator=generator)
    corr[:, :, 3] += 2.0  # target 3 is the best of every source: many sources into one target
    weights = correlate.adaptive_quantile_weights(corr, 0.9)  # 3 targets per source
    weights[1] = 0.0  # a sample where nothing merges
    x_targets = torch.randn(batch, n_targets, width, generator=generator)
    x_sources = torch.randn(batch, n_sources, width, generator=generator)
    got = compress.self_preserving_merge(x_targets, x_sources, weights)
    assert torch.equal(got, _merge_in_source_order(x_targets, x_sources, weights))
    assert torch.equal(got[1], x_targets[1])  # untouched targets come back bit-identical
    dense = (x_targets + weights.transpose(1, 2) @ x_sources) / (1.0 + weights.sum(dim=1).unsqueeze(-1))
    torch.testing.assert_close(got, dense, atol=1e-6, rtol=1e-6)  # the dense product, up to summation order


def test_sparse_merge_with_no_sources_returns_the_targets():
    x_targets = torch.randn(2, 4, 3)
    got = compress.self_preserving_merge(x_targets, torch.zeros(2, 0, 3), torch.zeros(2, 0, 4))
    assert torch.equal(got, x_targets)


@pytest.mark.parametrize("batch", [1, 3])
def test_gather_tokens_and_take_equal_elementwise_gathers(batch):
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 11, 5, generator=generator)
    attn = torch.rand(batch, 12, 12, generator=generator)
    for count in [0, 1, 4, 11]:
        index = torch.stack([torch.randperm(11, generator=generator)[:count] for _ in range(batch)])
        want = x.gather(1, index.unsqueeze(-1).expand(-1, -1, 5))
        assert torch.equal(compress.gather_tokens(x, index), want)
        assert torch.equal(compress.gather_tokens(x[:, 1:], index.clamp(max=9)),
                           x[:, 1:].gather(1, index.clamp(max=9).unsqueeze(-1).expand(-1, -1, 5)))
        cols = torch.stack([torch.randperm(12, generator=generator)[:7] for _ in range(batch)])
        want = attn.gather(1, index.unsqueeze(-1).expand(-1, -1, 12)).gather(2, cols.unsqueeze(1).expand(-1, count, -1))
        assert torch.equal(correlate.take(attn, index, cols), want)


# ------------------------------------------------------------------------------------------------
# On an accelerator a step must not read device values on the host (each read waits for the device):
# on meta tensors, which hold no values, any such read raises, and every branch takes its non-CPU path.
# tests/test_host_reads.py checks every method's whole prefill the same way.

class _MetaVisionScores:
    def __init__(self, tokens: int):
        self.tokens = tokens

    def probs(self):
        return torch.empty(2, self.tokens, self.tokens, device="meta")

    def keys(self):
        return torch.empty(2, 4, self.tokens, 8, device="meta")


class _MetaLLMScores:
    def rows(self, queries, keys=None, heads="mean"):
        return torch.empty(2, queries.shape[1], keys.shape[1], device="meta")


@pytest.mark.parametrize("k", [None, 0, 2])
def test_the_ficoco_steps_read_no_device_value_on_the_host(k):
    from ficoco.contract import LLMTokens, VisionTokens
    from ficoco.methods.shared import FicocoLanguageReduce, FicocoVisionReduce, LastQueryTopK

    for semantic, prefix in (("cls", 1), ("key-mean", 1), ("key-mean", 0)):    # prefix 0: Qwen's merge groups
        step = FicocoVisionReduce(discards={0: 4}, grid_hw=(4, 4), lam=0.35, coef=2.0, penalty_window=2, eps=0.998,
                                  k=k, semantic=semantic)
        tokens = VisionTokens(hidden=torch.empty(2, prefix + 16, 8, device="meta"),
                              positions=torch.empty(2, 16, dtype=torch.long, device="meta"),
                              key_bias=torch.empty(2, prefix + 16, device="meta"), prefix=prefix)
        assert step(0, tokens, _MetaVisionScores(prefix + 16)).hidden.shape == (2, prefix + 12, 8)
    prompt = LLMTokens(hidden=torch.empty(2, 30, 8, device="meta"),
                       visual=torch.empty(2, 10, dtype=torch.long, device="meta"),
                       instruction=torch.empty(2, 5, dtype=torch.long, device="meta"))
    kept = FicocoLanguageReduce(discards={3: 4}, beta=0.6, gamma=0.6, eps=0.998, k=k)(3, prompt, _MetaLLMScores())
    assert kept.visual.shape == (2, 6)
    assert LastQueryTopK(keep={2: 5})(2, prompt, _MetaLLMScores()).visual.shape == (2, 5)

"""Correlate and compress stages against slow float64 Python-loop references (methods.md §3-4)."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from helpers_tiny import reference_quantile

from ficoco.paradigm import attention, compress, correlate, filter as flt


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _random_attention(batch, n, seed=0, causal=False):
    logits = _rand(batch, n, n, seed=seed) * 2
    if causal:
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1)


def _disjoint_split(batch, n, n_sources, seed):
    """Random sources/targets per sample, both sorted ascending."""
    generator = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n, generator=generator) for _ in range(batch)]
    sources = torch.stack([p[:n_sources].sort().values for p in perms])
    targets = torch.stack([p[n_sources:].sort().values for p in perms])
    return sources, targets




def _adaptive_reference(corr, eps):
    """(chosen sets, α) per sample and source, from the float64 loop quantile."""
    chosen, alpha = [], torch.zeros(corr.shape, dtype=torch.float64)
    for b in range(corr.shape[0]):
        for i in range(corr.shape[1]):
            row = [float(v) for v in corr[b, i]]
            threshold = reference_quantile(row, eps)
            members = [j for j, v in enumerate(row) if v >= threshold]
            total = sum(row[j] for j in members)
            for j in members:
                alpha[b, i, j] = row[j] / total if total > 0 else 1.0 / len(members)
            chosen.append(members)
    return chosen, alpha


# ------------------------------------------------------------------------------------------------
# Correlate

def test_take_matches_loop():
    attn = _rand(2, 6, 7, seed=1)
    rows = torch.tensor([[5, 0, 2], [1, 1, 4]])
    cols = torch.tensor([[6, 3], [0, 2]])
    got = correlate.take(attn, rows, cols)
    for b in range(2):
        for r in range(3):
            for c in range(2):
                assert got[b, r, c].item() == attn[b, rows[b, r], cols[b, c]].item()


def test_ficoco_l_correlation_matches_loop():
    batch, n, m, gamma = 2, 9, 4, 0.6
    causal = _random_attention(batch, n + m, seed=2, causal=True)
    attn_vv, attn_qv = causal[:, :n, :n], causal[:, n:, :n]
    sources, targets = _disjoint_split(batch, n, 3, seed=3)
    got = correlate.ficoco_l_correlation(attn_vv, attn_qv, sources, targets, gamma)
    assert got.shape == (batch, 3, n - 3)
    for b in range(batch):
        for si, i in enumerate(sources[b].tolist()):
            for ti, j in enumerate(targets[b].tolist()):
                direct = float(attn_vv[b, max(i, j), min(i, j)])
                indirect = sum(float(attn_qv[b, k, i]) * float(attn_qv[b, k, j]) for k in range(m)) / m
                assert got[b, si, ti].item() == pytest.approx(gamma * direct + (1 - gamma) * indirect, abs=1e-7)
                assert direct > 0  # the visible direction was read, not the masked one


@pytest.mark.parametrize("eps,n_targets", [(0.998, 600), (0.998, 400), (0.9, 17), (0.5, 13), (0.75, 10), (0.0, 5)])
def test_adaptive_quantile_weights_match_loop_quantile(eps, n_targets):
    corr = _rand(2, 5, n_targets, seed=n_targets).softmax(-1)
    got = correlate.adaptive_quantile_weights(corr, eps)
    chosen, want = _adaptive_reference(corr.double(), eps)
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 5))


@pytest.mark.parametrize("eps,n_targets", [(0.998, 50), (0.998, 400), (0.998, 577), (0.998, 1000), (0.9, 17), (0.75, 10)])
def test_adaptive_k_is_one_plus_floor_on_tie_free_rows(eps, n_targets):
    product = (1 - Fraction(str(eps))) * (n_targets - 1)
    assert product.denominator != 1, "pick a case away from the float-rounding boundary"
    expected = 1 + math.floor(product)
    corr = _rand(3, 4, n_targets, seed=7 * n_targets)  # continuous values: no ties
    got = correlate.adaptive_quantile_weights(corr.abs(), eps)
    assert ((got > 0).sum(-1) == expected).all()


def test_adaptive_weights_fall_back_to_uniform_when_the_sum_is_zero():
    corr = torch.zeros(1, 2, 4)
    corr[0, 1] = torch.tensor([0.0, 0.2, 0.6, 0.2])
    got = correlate.adaptive_quantile_weights(corr, 0.998)
    assert got[0, 0].tolist() == [0.25, 0.25, 0.25, 0.25]  # J = all four (every entry ≥ τ = 0)
    assert got[0, 1].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_adaptive_weights_edge_cases_and_errors():
    assert correlate.adaptive_quantile_weights(torch.zeros(2, 0, 5), 0.998).shape == (2, 0, 5)
    with pytest.raises(ValueError, match="eps must be in \\[0, 1\\].*got 1.5"):
        correlate.adaptive_quantile_weights(torch.zeros(1, 1, 3), 1.5)
    with pytest.raises(ValueError, match="at least one target"):
        correlate.adaptive_quantile_weights(torch.zeros(1, 2, 0), 0.5)


@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_fixed_k_weights_match_loop_with_ties(k):
    corr = torch.randint(1, 4, (2, 4, 6), generator=torch.Generator().manual_seed(k)).float()
    got = correlate.fixed_k_weights(corr, k)
    for b in range(2):
        for i in range(4):
            row = corr[b, i].tolist()
            members = sorted(range(6), key=lambda j: (-row[j], j))[:k]
            total = sum(row[j] for j in members)
            want = [row[j] / total if j in members else 0.0 for j in range(6)]
            assert got[b, i].tolist() == pytest.approx(want, abs=1e-7)
    with pytest.raises(ValueError, match="k must be in \\[0, 6\\].*got 7"):
        correlate.fixed_k_weights(corr, 7)


# ------------------------------------------------------------------------------------------------
# Compress

def test_gather_tokens_matches_loop():
    x = _rand(2, 5, 3, seed=4)
    index = torch.tensor([[4, 0], [2, 2]])
    got = compress.gather_tokens(x, index)
    for b in range(2):
        for k in range(2):
            assert torch.equal(got[b, k], x[b, index[b, k]])


def _merge_reference(x_targets, x_sources, weights):
    batch, n_targets, width = x_targets.shape
    out = torch.zeros(batch, n_targets, width, dtype=torch.float64)
    for b in range(batch):
        for j in range(n_targets):
            total = 1.0 + sum(float(weights[b, i, j]) for i in range(x_sources.shape[1]))
            for d in range(width):
                value = float(x_targets[b, j, d]) + sum(
                    float(weights[b, i, j]) * float(x_sources[b, i, d]) for i in range(x_sources.shape[1])
                )
                out[b, j, d] = value / total
    return out


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_self_preserving_merge_matches_loop(dtype, atol):
    x_targets, x_sources = _rand(2, 6, 4, seed=5).to(dtype), _rand(2, 3, 4, seed=6).to(dtype)
    weights = correlate.adaptive_quantile_weights(_rand(2, 3, 6, seed=7).softmax(-1), 0.6)
    got = compress.self_preserving_merge(x_targets, x_sources, weights)
    assert got.dtype == dtype and got.shape == (2, 6, 4)
    torch.testing.assert_close(got.double(), _merge_reference(x_targets, x_sources, weights), atol=atol, rtol=0)
    untouched = weights.sum(1) == 0  # (B, T): targets nobody merges into come back bit-identical
    assert untouched.any()
    assert torch.equal(got[untouched], x_targets[untouched])


# ------------------------------------------------------------------------------------------------
# One FiCoCo-V layer, composed from the stages, against a single brute-force loop

def _ficoco_v_layer_reference(attn, x, positions, grid, n_discard, lam, eps):
    """The whole of methods.md §3 steps 2-8 for one sample, in float64 loops."""
    n = attn.shape[0] - 1
    a = attn.double()
    scores = []
    for i in range(n):
        received = sum(float(a[1 + j, 1 + i]) for j in range(n) if j != i) / (n - 1)
        scores.append(lam * received - (1 - lam) * float(a[0, 1 + i]))
    height, width = grid
    for top in range(0, height, 2):
        for left in range(0, width, 2):
            members = [i for i in range(n) if top <= positions[i] // width < top + 2 and left <= positions[i] % width < left + 2]
            if members:
                best = min(members, key=lambda i: (-scores[i], positions[i]))
                scores[best] *= 2.0
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    sources, targets = sorted(order[:n_discard]), sorted(order[n_discard:])
    merged = {j: [x[1 + j].double().clone(), 1.0] for j in targets}
    for i in sources:
        row = [float(a[1 + i, 1 + j]) for j in targets]
        threshold = reference_quantile(row, eps)
        members = [t for t, v in enumerate(row) if v >= threshold]
        total = sum(row[t] for t in members)
        for t in members:
            alpha = row[t] / total
            merged[targets[t]][0] += alpha * x[1 + i].double()
            merged[targets[t]][1] += alpha
    kept = [x[0].double()] + [merged[j][0] / merged[j][1] for j in targets]
    return torch.stack(kept), [positions[j] for j in targets]


def test_ficoco_v_layer_composition_matches_brute_force():
    batch, heads, grid, dim, n_discard = 2, 2, (5, 5), 3, 7
    generator = torch.Generator().manual_seed(9)
    positions = torch.stack([torch.randperm(25, generator=generator)[:18].sort().values for _ in range(batch)])
    n = positions.shape[1]
    q, k = _rand(batch, heads, 1 + n, 4, seed=10), _rand(batch, heads, 1 + n, 4, seed=11)
    x = _rand(batch, 1 + n, dim, seed=12)

    attn = attention.head_mean_probs(q, k, 0.5)  # (B, 1+N, 1+N)
    scores = flt.local_penalty(flt.ficoco_v_scores(attn, 0.35), positions, grid)
    sources, targets = flt.split_by_score(scores, n_discard)
    corr = correlate.take(attn, sources + 1, targets + 1)  # CLS shifts patch positions by one
    weights = correlate.adaptive_quantile_weights(corr, 0.9)
    patches = x[:, 1:]
    merged = compress.self_preserving_merge(
        compress.gather_tokens(patches, targets), compress.gather_tokens(patches, sources), weights
    )
    out = torch.cat([x[:, :1], merged], dim=1)
    kept_positions = positions.gather(1, targets)

    for b in range(batch):
        want_x, want_positions = _ficoco_v_layer_reference(
            attn[b], x[b], positions[b].tolist(), grid, n_discard, 0.35, 0.9
        )
        assert kept_positions[b].tolist() == want_positions
        torch.testing.assert_close(out[b].double(), want_x, atol=1e-6, rtol=0)

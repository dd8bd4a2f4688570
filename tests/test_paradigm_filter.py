"""Filter stage and head-mean attention against slow float64 Python-loop references (methods.md §3-4)."""
from __future__ import annotations

import math

import pytest
import torch

from ficoco.paradigm import attention, filter as flt


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _random_attention(batch, n, seed=0, causal=False):
    """Row-stochastic (B, n, n) float32; lower-triangular rows when causal."""
    logits = _rand(batch, n, n, seed=seed) * 2
    if causal:
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1)


def _ranking(row):
    """Brute-force order: higher score first, ties to the lower position."""
    return sorted(range(len(row)), key=lambda i: (-row[i], i))


# ------------------------------------------------------------------------------------------------
# attention.head_mean_probs

def _head_mean_reference(q, k, scale, mask):
    batch, heads, nq, _ = q.shape
    group = heads // k.shape[1]
    nk = k.shape[2]
    out = [[[0.0] * nk for _ in range(nq)] for _ in range(batch)]
    for b in range(batch):
        for h in range(heads):
            for i in range(nq):
                logits = []
                for j in range(nk):
                    dot = sum(float(q[b, h, i, t]) * float(k[b, h // group, j, t]) for t in range(q.shape[-1]))
                    logits.append(dot * scale + (float(mask[b, 0, i, j]) if mask is not None else 0.0))
                top = max(logits)
                if top == -math.inf:
                    continue  # a query that sees no key gives no attention
                exps = [math.exp(v - top) for v in logits]
                total = sum(exps)
                for j in range(nk):
                    out[b][i][j] += exps[j] / total / heads
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kv_heads", [3, 1])
def test_head_mean_probs_matches_loop_with_mask_and_gqa(kv_heads):
    batch, heads, nq, nk, dim = 2, 3, 4, 5, 6
    q = _rand(batch, heads, nq, dim, seed=1).to(torch.bfloat16)
    k = _rand(batch, kv_heads, nk, dim, seed=2).to(torch.bfloat16)
    mask = torch.zeros(batch, 1, nq, nk)
    mask[0, 0, 1, 3] = float("-inf")
    mask[1, 0, 2, :2] = torch.finfo(torch.float32).min
    mask[1, 0, 3, :] = float("-inf")  # a padding query: masked everywhere
    got = attention.head_mean_probs(q, k, 0.37, mask)
    assert got.dtype == torch.float32 and got.shape == (batch, nq, nk)
    want = _head_mean_reference(q.double(), k.double(), 0.37, mask)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert torch.all(got[1, 3] == 0)
    torch.testing.assert_close(got[0, :3].sum(-1), torch.ones(3))


def test_head_mean_probs_rejects_incompatible_heads():
    with pytest.raises(ValueError, match="key heads \\(2\\) must divide query heads \\(3\\)"):
        attention.head_mean_probs(torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 2, 4), 1.0)


def test_key_metrics_match_loop():
    k = _rand(2, 3, 4, 5, seed=3)
    for b in range(2):
        for n in range(4):
            l1 = sum(abs(float(k[b, h, n, t])) for h in range(3) for t in range(5))
            assert attention.key_l1_norm(k)[b, n].item() == pytest.approx(l1, rel=1e-5)
            for t in range(5):
                mean = sum(float(k[b, h, n, t]) for h in range(3)) / 3
                assert attention.head_mean_keys(k)[b, n, t].item() == pytest.approx(mean, abs=1e-6)
    x, y = _rand(2, 3, 4, seed=4), _rand(2, 5, 4, seed=5)
    x[0, 1] = 0.0  # a zero vector has cosine 0 with everything
    got = attention.pairwise_cosine(x, y)
    for b in range(2):
        for i in range(3):
            for j in range(5):
                xi, yj = x[b, i].double().tolist(), y[b, j].double().tolist()
                norm = math.sqrt(sum(v * v for v in xi)) * math.sqrt(sum(v * v for v in yj))
                want = 0.0 if norm == 0 else sum(a * c for a, c in zip(xi, yj)) / norm
                assert got[b, i, j].item() == pytest.approx(want, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# FiCoCo scores

def _received_reference(attn):
    batch, n, _ = attn.shape
    return torch.tensor(
        [[sum(float(attn[b, j, i]) for j in range(n) if j != i) / (n - 1) for i in range(n)] for b in range(batch)],
        dtype=torch.float64,
    )


def test_received_attention_matches_loop():
    attn = _random_attention(3, 7, seed=6)
    torch.testing.assert_close(flt.received_attention(attn).double(), _received_reference(attn), atol=1e-6, rtol=0)
    assert torch.equal(flt.received_attention(torch.ones(2, 1, 1)), torch.zeros(2, 1))


def test_ficoco_v_scores_match_loop():
    batch, n, lam = 2, 9, 0.35
    attn = _random_attention(batch, 1 + n, seed=7)
    got = flt.ficoco_v_scores(attn, lam)
    assert got.shape == (batch, n)
    for b in range(batch):
        for i in range(n):
            received = sum(float(attn[b, 1 + j, 1 + i]) for j in range(n) if j != i) / (n - 1)
            want = lam * received - (1 - lam) * float(attn[b, 0, 1 + i])
            assert got[b, i].item() == pytest.approx(want, abs=1e-6)


def test_ficoco_l_scores_keep_causal_zeros_in_the_mean():
    batch, n, m, beta = 2, 6, 3, 0.6
    causal = _random_attention(batch, n + m, seed=8, causal=True)
    attn_vv, attn_qv = causal[:, :n, :n], causal[:, n:, :n]
    got = flt.ficoco_l_scores(attn_vv, attn_qv, beta)
    for b in range(batch):
        for i in range(n):
            # j < i entries are zero under the causal mask and still count in the N-1 divisor
            visual = sum(float(attn_vv[b, j, i]) for j in range(n) if j != i) / (n - 1)
            instruction = sum(float(attn_qv[b, k, i]) for k in range(m)) / m
            assert got[b, i].item() == pytest.approx(beta * visual - (1 - beta) * instruction, abs=1e-6)
    # the last visual token receives nothing from other visual tokens: only the instruction term
    assert got[0, -1].item() == pytest.approx(-(1 - beta) * attn_qv[0, :, -1].mean().item(), abs=1e-7)
    with pytest.raises(ValueError, match="M = 0"):
        flt.ficoco_l_scores(attn_vv, attn_qv[:, :0], beta)


# ------------------------------------------------------------------------------------------------
# Local penalty

def _penalty_reference(scores, positions, height, width, window, coef):
    out = scores.double().clone()
    for b in range(scores.shape[0]):
        for top in range(0, height, window):
            for left in range(0, width, window):
                members = [
                    n for n in range(scores.shape[1])
                    if top <= int(positions[b, n]) // width < top + window
                    and left <= int(positions[b, n]) % width < left + window
                ]
                if members:
                    best = min(members, key=lambda n: (-float(scores[b, n]), int(positions[b, n])))
                    out[b, best] *= coef
    return out


@pytest.mark.parametrize("height,width,window", [(24, 24, 2), (5, 7, 2), (7, 5, 3), (3, 3, 4)])
def test_local_penalty_with_holes_and_odd_grids(height, width, window):
    batch, cells = 3, height * width
    generator = torch.Generator().manual_seed(height * 100 + width)
    # every sample keeps its own subset of the grid (holes = discarded earlier), in raster order
    n_present = max(1, (2 * cells) // 3)
    positions = torch.stack([torch.randperm(cells, generator=generator)[:n_present].sort().values for _ in range(batch)])
    scores = torch.randn(batch, n_present, generator=generator)
    got = flt.local_penalty(scores, positions, (height, width), window=window, coef=2.0)
    want = _penalty_reference(scores, positions, height, width, window, 2.0)
    torch.testing.assert_close(got.double(), want, atol=0, rtol=0)
    # exactly one penalised token per non-empty window
    assert int((got != scores).sum()) == sum(
        len({(int(p) // width // window, int(p) % width // window) for p in positions[b]}) for b in range(batch)
    )


def test_local_penalty_ties_go_to_the_lower_position_and_negatives_grow():
    # one 2x2 window holding positions 0, 1, 4, 5 of a 4x4 grid; the max -0.5 appears twice
    positions = torch.tensor([[0, 1, 4, 5, 10]])
    scores = torch.tensor([[-0.5, -0.75, -0.5, -3.0, 1.0]])
    got = flt.local_penalty(scores, positions, (4, 4))
    assert got.tolist() == [[-1.0, -0.75, -0.5, -3.0, 2.0]]


def test_local_penalty_rejects_positions_off_the_grid():
    with pytest.raises(ValueError, match="grid_positions must lie in \\[0, 16\\).*max 16"):
        flt.local_penalty(torch.zeros(1, 2), torch.tensor([[0, 16]]), (4, 4))


# ------------------------------------------------------------------------------------------------
# Selection

def _tied_scores(batch, n, seed):
    """Integer-valued scores in a small range, so ties are common."""
    return torch.randint(0, 4, (batch, n), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("n_discard", [0, 1, 5, 12])
def test_split_by_score_matches_brute_force_with_ties(n_discard):
    scores = _tied_scores(3, 12, seed=n_discard)
    sources, targets = flt.split_by_score(scores, n_discard)
    assert sources.dtype == torch.int64 and sources.shape == (3, n_discard) and targets.shape == (3, 12 - n_discard)
    for b in range(3):
        order = _ranking(scores[b].tolist())
        assert sources[b].tolist() == sorted(order[:n_discard])
        assert targets[b].tolist() == sorted(order[n_discard:])


def test_top_k_positions_matches_brute_force_with_ties():
    scores = _tied_scores(4, 20, seed=11)
    got = flt.top_k_positions(scores, 7)
    for b in range(4):
        assert got[b].tolist() == sorted(_ranking(scores[b].tolist())[:7])
    assert flt.argmax_lowest(torch.tensor([[1.0, 3.0, 3.0]])).tolist() == [1]


def test_selection_rejects_bad_counts():
    with pytest.raises(ValueError, match="n_discard must be in \\[0, 4\\].*got 5"):
        flt.split_by_score(torch.zeros(1, 4), 5)
    with pytest.raises(ValueError, match="k must be in \\[0, 4\\].*got -1"):
        flt.top_k_positions(torch.zeros(1, 4), -1)


def test_complement_positions():
    positions = torch.tensor([[4, 0, 2], [1, 2, 3]])
    assert flt.complement_positions(positions, 6).tolist() == [[1, 3, 5], [0, 4, 5]]
    with pytest.raises(ValueError, match="distinct"):
        flt.complement_positions(torch.tensor([[1, 1]]), 4)

"""Baseline stages (methods.md §8) against brute-force float64 Python loops."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from helpers_tiny import reference_quantile

from ficoco.budget import spread
from ficoco.paradigm import attention, compress, correlate, filter as flt


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _vec(t):
    return [float(v) for v in t]


def _cos(u, v):
    nu, nv = math.sqrt(sum(a * a for a in u)), math.sqrt(sum(a * a for a in v))
    return 0.0 if nu == 0 or nv == 0 else sum(a * b for a, b in zip(u, v)) / (nu * nv)


def _best(indices, key):
    """Brute-force argmax with ties to the lower index."""
    return min(indices, key=lambda i: (-key(i), i))




# ------------------------------------------------------------------------------------------------
# ToMe: bipartite matching + size-weighted merge

def _tome_reference(x, sizes, metric, r):
    """One ToMe step for one sample: returns (tokens, sizes) in original order, float64."""
    n = len(metric)
    a_set, b_set = list(range(0, n, 2)), list(range(1, n, 2))
    score = {a: -math.inf if a == 0 else max(_cos(metric[a], metric[b]) for b in b_set) for a in a_set}
    partner = {a: _best(b_set, lambda b: _cos(metric[a], metric[b])) for a in a_set}
    sources = sorted(a_set, key=lambda a: (-score[a], a))[:r]
    total = {i: [sizes[i] * v for v in x[i]] for i in range(n)}
    mass = dict(enumerate(sizes))
    for a in sources:
        b = partner[a]
        total[b] = [t + sizes[a] * v for t, v in zip(total[b], x[a])]
        mass[b] += sizes[a]
    kept = [i for i in range(n) if i not in sources]
    return [[t / mass[i] for t in total[i]] for i in kept], [mass[i] for i in kept], kept


@pytest.mark.parametrize("n,r", [(13, 4), (12, 5), (9, 1)])
def test_tome_step_matches_brute_force(n, r):
    batch = 2
    metric = _rand(batch, n, 5, seed=n)
    x = _rand(batch, n, 3, seed=n + 1)
    sizes = torch.randint(1, 4, (batch, n), generator=torch.Generator().manual_seed(n)).float()

    scores, partners = flt.bipartite_max_similarity(metric)
    sources = flt.top_k_positions(scores, r)
    x_kept, sizes_kept, kept = compress.size_weighted_merge(x, sizes, sources, partners.gather(1, sources))

    assert x_kept.shape == (batch, n - r, 3)
    for b in range(batch):
        want_x, want_sizes, want_kept = _tome_reference(
            x[b].double().tolist(), sizes[b].tolist(), metric[b].double().tolist(), r
        )
        assert kept[b].tolist() == want_kept
        assert sizes_kept[b].tolist() == want_sizes
        torch.testing.assert_close(x_kept[b].double(), torch.tensor(want_x, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.isneginf(scores[:, 0]).all() and torch.isneginf(scores[:, 1::2]).all()
    bias = attention.proportional_attention_bias(sizes_kept)
    assert bias.shape == (batch, 1, 1, n - r)
    torch.testing.assert_close(bias[:, 0, 0].exp(), sizes_kept)


def test_size_weighted_merge_rejects_a_source_as_destination():
    with pytest.raises(ValueError, match="destinations must not be sources"):
        compress.size_weighted_merge(torch.zeros(1, 4, 2), torch.ones(1, 4), torch.tensor([[0, 1]]), torch.tensor([[1, 2]]))


# ------------------------------------------------------------------------------------------------
# DivPrune

def _divprune_reference(x, k):
    n = len(x)
    distance = [[1.0 - _cos(x[i], x[j]) for j in range(n)] for i in range(n)]
    first = _best(range(n), lambda i: min(distance[i][j] for j in range(n) if j != i))
    chosen = [first] if k else []
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(_best(rest, lambda i: min(distance[i][c] for c in chosen)))
    return sorted(chosen)


@pytest.mark.parametrize("k", [0, 1, 6, 20])
def test_divprune_matches_greedy_loop(k):
    x = _rand(2, 20, 4, seed=30 + k)
    got = flt.divprune_select(x, k)
    assert got.shape == (2, k)
    for b in range(2):
        assert got[b].tolist() == _divprune_reference(x[b].double().tolist(), k)


# ------------------------------------------------------------------------------------------------
# DART

def _dart_reference(hidden_image, hidden_text, norm_image, norm_text, k, n_pivots=4):
    image_pivots = sorted(range(len(norm_image)), key=lambda i: (-norm_image[i], i))[: min(n_pivots, k)]
    text_pivots = sorted(range(len(norm_text)), key=lambda i: (-norm_text[i], i))[: min(n_pivots, len(norm_text))]
    pivots = [hidden_image[i] for i in image_pivots] + [hidden_text[t] for t in text_pivots]
    total_quota = k - len(image_pivots)
    base, extra = divmod(total_quota, len(pivots))
    retained = set(image_pivots)
    for p, pivot in enumerate(pivots):
        quota = base + (1 if p < extra else 0)
        for _ in range(quota):
            rest = [i for i in range(len(hidden_image)) if i not in retained]
            retained.add(_best(rest, lambda i: -_cos(pivot, hidden_image[i])))
    return sorted(retained)


@pytest.mark.parametrize("k,n_text", [(29, 10), (13, 3), (4, 6), (40, 9)])
def test_dart_matches_loop_and_quotas(k, n_text):
    hidden_image, hidden_text = _rand(2, 48, 6, seed=40 + k), _rand(2, n_text, 6, seed=41 + k)
    keys_image, keys_text = _rand(2, 3, 48, 5, seed=42 + k), _rand(2, 3, n_text, 5, seed=43 + k)
    norm_image, norm_text = attention.key_l1_norm(keys_image), attention.key_l1_norm(keys_text)
    got = flt.dart_select(hidden_image, hidden_text, norm_image, norm_text, k)
    assert got.shape == (2, k)
    for b in range(2):
        want = _dart_reference(
            hidden_image[b].double().tolist(), hidden_text[b].double().tolist(),
            norm_image[b].tolist(), norm_text[b].tolist(), k,
        )
        assert got[b].tolist() == want


def test_dart_quota_rule_for_the_fastv_keeps():
    # §8.8: ⌊(k − 4)/8⌋ per pivot, the first pivots take the remainder
    for keep in (166, 98, 29):
        quotas = spread(keep - 4, 8)
        assert min(quotas) == (keep - 4) // 8 and sum(quotas) == keep - 4
        assert quotas[: (keep - 4) % 8] == [(keep - 4) // 8 + 1] * ((keep - 4) % 8)


# ------------------------------------------------------------------------------------------------
# Random, strided and evenly spaced positions

def test_random_positions_reproducible_from_a_seed():
    seed = flt.sample_seed(1234, "question-17")
    first = flt.random_positions(576, 64, torch.Generator().manual_seed(seed), batch=2)
    again = flt.random_positions(576, 64, torch.Generator().manual_seed(seed), batch=2)
    other = flt.random_positions(576, 64, torch.Generator().manual_seed(flt.sample_seed(1234, "question-18")), batch=2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    for row in first.tolist():
        assert row == sorted(set(row)) and len(row) == 64 and 0 <= row[0] and row[-1] < 576
    assert flt.sample_seed(1234, "a") != flt.sample_seed(1235, "a")


def test_sample_seed_is_stable_across_processes():
    # another interpreter with its own string-hash salt must derive the same seed
    code = "from ficoco.paradigm.filter import sample_seed; print(sample_seed(7, 'id-3'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == str(flt.sample_seed(7, "id-3"))


@pytest.mark.parametrize("n,count", [(10, 3), (502, 30), (528, 143), (7, 7), (5, 0)])
def test_strided_and_evenly_spaced_positions(n, count):
    step = n // count if count else 0
    assert flt.strided_positions(n, count).tolist() == [i * step for i in range(count)]
    spaced = flt.evenly_spaced_positions(n, count).tolist()
    assert spaced == [math.floor(i * n / count) for i in range(count)]
    assert spaced == sorted(set(spaced)) and all(0 <= p < n for p in spaced)


def test_iqr_outlier_mask_matches_loop():
    scores = _rand(3, 40, seed=50).exp()
    got = flt.iqr_outlier_mask(scores)
    for b in range(3):
        row = scores[b].double().tolist()
        q1, q3 = reference_quantile(row, 0.25), reference_quantile(row, 0.75)
        expected = [v > q3 + 1.5 * (q3 - q1) for v in row]
        if not any(expected):                     # no outlier: the top-1 is kept (row 1 of this draw)
            top = max(range(len(row)), key=lambda i: (row[i], -i))
            expected = [i == top for i in range(len(row))]
        assert got[b].tolist() == expected
    assert bool(got.any(dim=1).all())


# ------------------------------------------------------------------------------------------------
# SparseVLM raters and density-peak clusters

def test_raters_and_rater_scores_match_loop():
    visual, text = _rand(2, 7, 4, seed=60), _rand(2, 5, 4, seed=61)
    attn_tv = _rand(2, 5, 7, seed=62).softmax(-1)
    raters = flt.rater_mask(visual, text)
    scores = flt.rater_scores(attn_tv, raters)
    for b in range(2):
        v, t = visual[b].double().tolist(), text[b].double().tolist()
        relevance = [0.0] * 5
        for vi in v:
            logits = [sum(a * c for a, c in zip(vi, tj)) for tj in t]
            top = max(logits)
            exps = [math.exp(l - top) for l in logits]
            for j in range(5):
                relevance[j] += exps[j] / sum(exps) / len(v)
        mean = sum(relevance) / 5
        want = [rel > mean for rel in relevance]
        assert raters[b].tolist() == want
        chosen = [j for j in range(5) if want[j]]
        for i in range(7):
            expected = sum(float(attn_tv[b, j, i]) for j in chosen) / len(chosen)
            assert scores[b, i].item() == pytest.approx(expected, abs=1e-6)
    # one text token: nothing is above the mean, so it rates on its own
    assert flt.rater_mask(visual, text[:, :1]).all()


def _dpc_reference(x, n_clusters, k):
    n, width = len(x), len(x[0])
    dist = [[math.sqrt(sum((a - c) ** 2 for a, c in zip(x[i], x[j]))) / math.sqrt(width) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(d * d for d in sorted(dist[i][j] for j in range(n) if j != i)[:k]) / k) for i in range(n)]
    delta = []
    for i in range(n):
        denser = [dist[i][j] for j in range(n) if density[j] > density[i]]
        delta.append(min(denser) if denser else max(dist[i]))
    centres = sorted(sorted(range(n), key=lambda i: (-(density[i] * delta[i]), i))[:n_clusters])
    assignment = [min(range(n_clusters), key=lambda c: (dist[i][centres[c]], c)) for i in range(n)]
    for c, centre in enumerate(centres):
        assignment[centre] = c
    return assignment


def test_dpc_knn_clusters_match_loop():
    x = _rand(2, 25, 3, seed=70)
    got = correlate.dpc_knn_clusters(x, n_clusters=4, k=5)
    for b in range(2):
        assert got[b].tolist() == _dpc_reference(x[b].double().tolist(), 4, 5)
    jittered = correlate.dpc_knn_clusters(x, 4, 5, generator=torch.Generator().manual_seed(0))
    again = correlate.dpc_knn_clusters(x, 4, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(jittered, again)
    with pytest.raises(ValueError, match="n_clusters must be in \\[1, 25\\].*got 26"):
        correlate.dpc_knn_clusters(x, 26, 5)


# ------------------------------------------------------------------------------------------------
# Cosine correlations

def test_cosine_argmax_and_knn_match_loop_with_ties():
    metric = _rand(2, 12, 4, seed=80)
    metric[:, 7] = metric[:, 3]  # an identical copy: exact cosine ties
    queries = torch.tensor([[0, 5, 11], [3, 7, 1]])
    got_knn = correlate.knn_positions(metric, queries, 4)
    got_arg = correlate.cosine_argmax(metric[:, :5], metric[:, 5:])
    for b in range(2):
        m = metric[b].double().tolist()
        for qi, q in enumerate(queries[b].tolist()):
            others = [j for j in range(12) if j != q]
            want = sorted(others, key=lambda j: (-_cos(m[q], m[j]), j))[:4]
            assert got_knn[b, qi].tolist() == want
        for i in range(5):
            assert got_arg[b, i].item() == _best(range(7), lambda j: _cos(m[i], m[5 + j]))
    assert got_knn[1, 0, 0].item() == 7 and got_knn[1, 1, 0].item() == 3  # the copy is the nearest
    with pytest.raises(ValueError, match="k must be in \\[0, 11\\].*got 12"):
        correlate.knn_positions(metric, queries, 12)


# ------------------------------------------------------------------------------------------------
# EViT, VisionZip, PruMerge, pooling compositions

def test_evit_stage_matches_loop():
    n, keep = 15, 6
    x, cls_attn = _rand(2, n, 3, seed=90), _rand(2, n, seed=91).softmax(-1)
    kept = flt.top_k_positions(cls_attn, keep - 1)
    sources = flt.complement_positions(kept, n)
    fused = compress.fused_token(compress.gather_tokens(x, sources), cls_attn.gather(1, sources))
    out = torch.cat([compress.gather_tokens(x, kept), fused], dim=1)
    assert out.shape == (2, keep, 3)
    for b in range(2):
        a = cls_attn[b].tolist()
        top = sorted(sorted(range(n), key=lambda i: (-a[i], i))[: keep - 1])
        want_fused = [sum(a[i] * float(x[b, i, d]) for i in range(n) if i not in top) for d in range(3)]
        assert kept[b].tolist() == top
        assert out[b, -1].tolist() == pytest.approx(want_fused, abs=1e-6)


def test_visionzip_composition_matches_loop():
    n_patches, dominant, contextual = 30, 8, 5  # dominant includes CLS
    batch = 2
    hidden = _rand(batch, 1 + n_patches, 4, seed=100)
    keys = _rand(batch, 1 + n_patches, 6, seed=101)
    cls_scores = _rand(batch, n_patches, seed=102)

    dominant_patches = flt.top_k_positions(cls_scores, dominant - 1)  # (B, D-1) patch positions
    remaining = flt.complement_positions(dominant_patches, n_patches)  # (B, R)
    anchor_index = flt.strided_positions(remaining.shape[1], contextual).expand(batch, -1)  # (B, C) into R
    member_index = flt.complement_positions(anchor_index, remaining.shape[1])  # (B, R-C) into R
    anchors, members = remaining.gather(1, anchor_index) + 1, remaining.gather(1, member_index) + 1  # token axis
    assignment = correlate.cosine_argmax(compress.gather_tokens(keys, members), compress.gather_tokens(keys, anchors))
    context = compress.contextual_tokens(compress.gather_tokens(hidden, anchors), compress.gather_tokens(hidden, members), assignment)
    out = torch.cat([hidden[:, :1], compress.gather_tokens(hidden, dominant_patches + 1), context], dim=1)
    assert out.shape == (batch, dominant + contextual, 4)

    for b in range(batch):
        s = cls_scores[b].tolist()
        top = sorted(sorted(range(n_patches), key=lambda i: (-s[i], i))[: dominant - 1])
        rest = [i for i in range(n_patches) if i not in top]
        step = len(rest) // contextual
        anchor_patches = [rest[i * step] for i in range(contextual)]
        k = keys[b].double().tolist()
        groups = {a: [] for a in anchor_patches}
        for p in rest:
            if p not in anchor_patches:
                groups[_best(anchor_patches, lambda a: _cos(k[1 + p], k[1 + a]))].append(p)
        h = hidden[b].double()
        want = [h[0]] + [h[1 + p] for p in top]
        want += [h[1 + a] + (sum(h[1 + p] for p in groups[a]) / len(groups[a]) if groups[a] else 0) for a in anchor_patches]
        torch.testing.assert_close(out[b].double(), torch.stack(want), atol=1e-6, rtol=0)


def test_prumerge_merge_matches_loop():
    n, keep, k = 14, 4, 5
    x, keys = _rand(2, n, 3, seed=110), _rand(2, n, 6, seed=111)
    cls_attn = _rand(2, n, seed=112).softmax(-1)
    kept = flt.top_k_positions(cls_attn, keep)
    neighbours = correlate.knn_positions(keys, kept, k)
    got = compress.prumerge_merge(x, cls_attn, kept, neighbours)
    assert got.shape == (2, keep + 1, 3)
    for b in range(2):
        a, kk, xb = cls_attn[b].tolist(), keys[b].double().tolist(), x[b].double()
        for slot, i in enumerate(kept[b].tolist()):
            nearest = sorted((j for j in range(n) if j != i), key=lambda j: (-_cos(kk[i], kk[j]), j))[:k]
            want = xb[i] + sum(a[j] * xb[j] for j in nearest)
            torch.testing.assert_close(got[b, slot].double(), want, atol=1e-6, rtol=0)
        extra = sum(a[j] * xb[j] for j in range(n) if j not in kept[b].tolist())
        torch.testing.assert_close(got[b, -1].double(), extra, atol=1e-6, rtol=0)


@pytest.mark.parametrize("grid,out", [((24, 24), (12, 16)), ((24, 24), (8, 8)), ((5, 7), (2, 3))])
def test_pool_grid_matches_cell_means(grid, out):
    (height, width), (h, w) = grid, out
    x = _rand(2, height * width, 3, seed=height + h).to(torch.bfloat16)
    got = compress.pool_grid(x, grid, out)
    assert got.shape == (2, h * w, 3) and got.dtype == torch.bfloat16
    xd = x.double()
    for b in range(2):
        for i in range(h):
            rows = range(math.floor(i * height / h), math.ceil((i + 1) * height / h))
            for j in range(w):
                cols = range(math.floor(j * width / w), math.ceil((j + 1) * width / w))
                cell = [xd[b, r * width + c] for r in rows for c in cols]
                torch.testing.assert_close(got[b, i * w + j].double(), sum(cell) / len(cell), atol=2e-2, rtol=0)


def test_group_means_with_an_empty_group():
    x = _rand(1, 5, 2, seed=120)
    means, counts = compress.group_means(x, torch.tensor([[0, 2, 0, 2, 2]]), 3)
    assert counts.tolist() == [[2.0, 0.0, 3.0]]
    torch.testing.assert_close(means[0, 0], (x[0, 0] + x[0, 2]) / 2)
    assert means[0, 1].tolist() == [0.0, 0.0]
    torch.testing.assert_close(means[0, 2], (x[0, 1] + x[0, 3] + x[0, 4]) / 3)

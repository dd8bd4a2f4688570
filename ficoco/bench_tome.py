"""`ficoco bench-tome`: our ToMe step against the authors' merge, on the same inputs, at LLaVA-1.5's size.

The authors' merge (`facebookresearch/ToMe`, `tome/merge.py`: `bipartite_soft_matching` then
`merge_wavg`) is re-implemented below from that code's description, as the reference to time
against: L2-normalised metric, A = even / B = odd tokens, each A-token's best B, CLS protected, the
r best edges merged by a size-weighted sum, output `[unmerged A ; B]`. Before timing, both merges
run once on the same inputs and must produce the same tokens in the same order (our step in the
authors' order, `order: authors`), so the two timed computations are the same computation.

Inputs: CLIP ViT-L/14-336's shape, 577 tokens of width 1024, 16 heads of 64; keys and tokens are
random (speed does not depend on the values), sizes all one (the first merging layer) or random
whole sizes (a later layer). Timing: both merges once per round, rounds interleaved, warm-up rounds
untimed, the median over rounds; one thread by default, wall clock.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

TOKENS, WIDTH, HEADS, HEAD_DIM = 577, 1024, 16, 64


def authors_merge(x: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor, r: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' ToMe step with a class token: x (B, N, D), metric (B, N, d), sizes (B, N, 1) ->
    (merged x (B, N−r, D), merged sizes (B, N−r, 1)), in the order `[unmerged A ; B]`."""
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)          # (B, Na, Nb)
        scores[:, 0, :] = float("-inf")                                 # CLS never merges
        best, partner = scores.max(dim=-1)                              # (B, Na) each
        edges = best.argsort(dim=-1, descending=True).unsqueeze(-1)     # (B, Na, 1)
        unmerged = edges[:, r:].sort(dim=1).values                      # A-tokens kept, CLS first
        sources = edges[:, :r]
        destinations = partner.unsqueeze(-1).gather(1, sources)

    def merge(values: torch.Tensor) -> torch.Tensor:
        a, b = values[:, ::2], values[:, 1::2]
        width = values.shape[-1]
        kept = a.gather(1, unmerged.expand(-1, -1, width))
        moved = a.gather(1, sources.expand(-1, -1, width))
        b = b.scatter_reduce(1, destinations.expand(-1, -1, width), moved, reduce="sum")
        return torch.cat([kept, b], dim=1)

    merged = merge(x * sizes)
    merged_sizes = merge(sizes)
    return merged / merged_sizes, merged_sizes


def our_step(r: int):
    """Our ToMe step (ficoco/methods/tome.py, authors' order) as a function of (x, keys, sizes)."""
    from ficoco.contract import VisionTokens
    from ficoco.methods.tome import TomeReduce
    from ficoco.paradigm.attention import proportional_attention_bias

    reduce = TomeReduce(merges={0: r, 1: 0}, authors=True)               # layer 0 is not the last: authors' order

    class Keys:
        def __init__(self, keys):
            self._keys = keys

        def keys(self):
            return self._keys

    def step(x: torch.Tensor, keys: torch.Tensor, sizes: torch.Tensor) -> VisionTokens:
        positions = torch.arange(x.shape[1] - 1).expand(x.shape[0], -1)
        bias = proportional_attention_bias(sizes[..., 0])[:, 0, 0, :]
        return reduce(0, VisionTokens(hidden=x, positions=positions, key_bias=bias), Keys(keys))

    return step


def inputs(seed: int, later_layer: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, TOKENS, WIDTH, generator=generator)
    keys = torch.randn(1, HEADS, TOKENS, HEAD_DIM, generator=generator)
    sizes = (torch.randint(1, 4, (1, TOKENS, 1), generator=generator).float() if later_layer
             else torch.ones(1, TOKENS, 1))
    return x, keys, sizes


def check_same(x, keys, sizes, r: int) -> None:
    """Both merges give the same tokens in the same order, or the timing compares different work."""
    ours = our_step(r)(x, keys, sizes)
    theirs, their_sizes = authors_merge(x, keys.mean(dim=1), sizes, r)
    torch.testing.assert_close(ours.hidden, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.key_bias.exp().round(), their_sizes[..., 0])


def run(merges: list[int], rounds: int, warmup: int, threads: int, seed: int = 0) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for later_layer in (False, True):
        x, keys, sizes = inputs(seed, later_layer)
        for r in merges:
            check_same(x, keys, sizes, r)
            ours, theirs = our_step(r), (lambda: authors_merge(x, keys.mean(dim=1), sizes, r))
            times = {"ours": [], "authors": []}
            for index in range(warmup + rounds):
                for name, call in (("ours", lambda: ours(x, keys, sizes)), ("authors", theirs)):
                    start = time.perf_counter()
                    call()
                    if index >= warmup:
                        times[name].append(time.perf_counter() - start)
            ours_ms, authors_ms = (1e3 * statistics.median(times[name]) for name in ("ours", "authors"))
            rows.append({"sizes": "random (later layer)" if later_layer else "all one (first layer)", "r": r,
                         "ours_ms": ours_ms, "authors_ms": authors_ms, "ratio": ours_ms / authors_ms})
    return rows


def format_table(rows: list[dict], rounds: int, threads: int) -> str:
    lines = [f"ToMe step, {TOKENS} tokens x {WIDTH}, keys {HEADS} x {HEAD_DIM}; torch {torch.__version__}, "
             f"{threads} thread(s); median of {rounds} interleaved rounds; same output checked first", "",
             "| sizes | r | ours ms | authors' merge ms | ours / authors |", "|---|---|---|---|---|"]
    lines += [f"| {row['sizes']} | {row['r']} | {row['ours_ms']:.2f} | {row['authors_ms']:.2f} | {row['ratio']:.2f} |"
              for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ficoco bench-tome", description=__doc__.split("\n\n")[0])
    parser.add_argument("--merges", nargs="+", type=int, default=[6, 16, 17],
                        help="r, tokens merged by the step (LLaVA-1.5 schedules: 6 / 11-12 / 16-17)")
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds (median reported); >= 5")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.rounds < 5:
        parser.error(f"--rounds must be >= 5 for a stable median; got {args.rounds}")
    bad = [r for r in args.merges if not 1 <= r <= (TOKENS - 1) // 2]
    if bad:
        parser.error(f"--merges {bad}: each r must be in [1, {(TOKENS - 1) // 2}] (CLS is protected)")
    print(format_table(run(args.merges, args.rounds, args.warmup, args.threads), args.rounds, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())

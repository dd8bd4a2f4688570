"""Bootstrap confidence intervals from the per-sample scores, paired across methods.

For each (model, benchmark) the samples are resampled with replacement `replicates` times, seeded
from (seed, model, benchmark), and every job of that model and benchmark is scored on the *same*
resamples (the same sample ids with the same multiplicities). A difference between two jobs is then
computed replicate by replicate, so its interval is a paired one: the sample-to-sample variation the
two methods share cancels.

A job's replicate is its headline recomputed on the resample: the mean per-sample score x 100 over
the resampled samples that have a score (failed samples are left out, as the headline leaves them
out). That is the headline only when the benchmark's headline *is* the mean per-sample score, which
is checked per job against metrics.json: a job whose headline differs (POPE's F1 over categories,
MME's acc + acc+, MMBench's circular score, LLaVA-W's ratio) gets no interval, with the reason, never
an interval of another statistic.

Intervals are percentile intervals at `LEVEL`.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

REPLICATES = 1000
LEVEL = 0.95
SEED = 0
JOB = ["model", "method", "budget", "benchmark"]
#: How far a job's headline may be from its per-sample mean before the two are called different.
HEADLINE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Bootstrap:
    """Replicates of every job's headline, and the jobs that have none.

    replicates: index (model, method, budget, benchmark), columns 0 .. replicates-1.
    skipped: model, method, budget, benchmark, reason.
    """
    replicates: pd.DataFrame
    skipped: pd.DataFrame
    level: float = LEVEL

    def job(self, model: str, method: str, budget: str, benchmark: str) -> np.ndarray | None:
        key = (model, method, budget, benchmark)
        return self.replicates.loc[key].to_numpy() if key in self.replicates.index else None

    def average(self, model: str, method: str, budget: str, benchmarks) -> np.ndarray | None:
        """Replicates of the mean over `benchmarks` of the job's headlines; None when one has none."""
        rows = [self.job(model, method, budget, benchmark) for benchmark in benchmarks]
        if not rows or any(row is None for row in rows):
            return None
        return np.mean(rows, axis=0)

    def interval(self, replicates: np.ndarray | None) -> tuple[float, float]:
        return percentile_interval(replicates, self.level)


def percentile_interval(replicates: np.ndarray | None, level: float = LEVEL) -> tuple[float, float]:
    """(low, high) percentile interval of the replicates; NaNs when there are none."""
    if replicates is None or len(replicates) == 0 or np.isnan(replicates).all():
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.nanpercentile(replicates, [tail, 100.0 - tail])
    return float(low), float(high)


def resample_counts(model: str, benchmark: str, samples: int, replicates: int, seed: int) -> np.ndarray:
    """(replicates, samples) multiplicities of a with-replacement resample of `samples` items; the
    same for every job of (model, benchmark) and every report rendered with the same seed."""
    stream = np.random.default_rng([seed, zlib.crc32(f"{model}\0{benchmark}".encode())])
    return stream.multinomial(samples, np.full(samples, 1.0 / samples), size=replicates).astype(np.int32)


def bootstrap(samples: pd.DataFrame, headline: pd.DataFrame, replicates: int = REPLICATES,
              seed: int = SEED, level: float = LEVEL) -> Bootstrap:
    """Paired bootstrap replicates of every job's headline (see the module docstring).

    samples: the summary's per-sample table (model, method, budget, benchmark, id, score);
    headline: one row per job with its headline `value` (tables.headline_scores).
    """
    if replicates < 1:
        raise ValueError(f"bootstrap replicates {replicates}: must be a positive integer")
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level {level}: must be between 0 and 1 (e.g. 0.95)")
    values = {tuple(key): value for key, value in zip(headline[JOB].astype(str).itertuples(index=False),
                                                      headline["value"])}
    rows, skipped = {}, []
    jobs_with_samples = set()
    for (model, benchmark), group in samples.groupby(["model", "benchmark"], sort=True, observed=True):
        ids = np.sort(group["id"].astype(str).unique())
        counts = resample_counts(str(model), str(benchmark), len(ids), replicates, seed)
        for (method, budget), job in group.groupby(["method", "budget"], sort=True, observed=True):
            key = (str(model), str(method), str(budget), str(benchmark))
            jobs_with_samples.add(key)
            scores = job.set_index(job["id"].astype(str))["score"].astype(float).reindex(ids).to_numpy()
            scored = ~np.isnan(scores)
            reason = headline_mismatch(values.get(key), scores[scored])
            if reason:
                skipped.append({**dict(zip(JOB, key)), "reason": reason})
                continue
            weights = counts[:, scored]
            totals = weights.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                rows[key] = 100.0 * (weights @ scores[scored]) / np.where(totals > 0, totals, np.nan)
    for key in values:
        if key not in jobs_with_samples:
            skipped.append({**dict(zip(JOB, key)), "reason": "no per-sample scores (no shard predictions beside "
                                                             "its metrics.json)"})
    index = pd.MultiIndex.from_tuples(list(rows), names=JOB) if rows else pd.MultiIndex.from_tuples([], names=JOB)
    frame = pd.DataFrame(np.array(list(rows.values())).reshape(len(rows), replicates), index=index)
    return Bootstrap(replicates=frame, skipped=pd.DataFrame(skipped, columns=[*JOB, "reason"]), level=level)


def headline_mismatch(value, scores: np.ndarray) -> str | None:
    """Why the job's replicates would not be its headline (None when they would)."""
    if value is None or pd.isna(value):
        return "no headline score"
    if len(scores) == 0:
        return "no sample has a score"
    mean = 100.0 * float(np.mean(scores))
    if abs(mean - float(value)) > HEADLINE_TOLERANCE * max(1.0, abs(float(value))):
        return (f"the headline {float(value):.4g} is not the mean per-sample score {mean:.4g} (the benchmark's "
                "headline is another statistic)")
    return None


def paired_difference(first: np.ndarray | None, second: np.ndarray | None,
                      level: float = LEVEL) -> tuple[float, float]:
    """Interval of first - second, replicate by replicate (both from the same resamples)."""
    if first is None or second is None:
        return float("nan"), float("nan")
    return percentile_interval(first - second, level)


def ratio_percent(value: np.ndarray | None, base: np.ndarray | None) -> np.ndarray | None:
    """100 x value / base, replicate by replicate (Avg% against vanilla, paired)."""
    if value is None or base is None:
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * value / np.where(base != 0, base, np.nan)

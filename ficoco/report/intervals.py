"""Bootstrap confidence intervals from the per-sample records, paired across methods.

For each (model, benchmark) the samples are resampled with replacement, seeded from (seed, model,
benchmark), and every job of that model and benchmark is scored on the *same* resamples (the same
sample ids with the same multiplicities). A difference between two jobs is then computed replicate by
replicate, so its interval is a paired one: the sample-to-sample variation the two methods share
cancels.

A job's replicate is its headline recomputed on the resample, in one of two ways, each checked
against the job's metrics.json on the full sample first (a job that fails both checks gets no
interval, with the reason, never the interval of another statistic):
- **mean**: when the headline is the mean per-sample score x 100 over the samples that have a score
  (most benchmarks), vectorised over all `replicates` resamples;
- **benchmark**: otherwise (POPE's F1 over categories, MME's acc + acc+, MMBench's circular score,
  LLaVA-W's ratio), the benchmark's own `aggregate` on the
  resampled records, for the first `benchmark_replicates` resamples (it runs in Python, once per
  resample). The resamples are the first rows of the same stream, so these jobs stay paired with
  every other job: a comparison uses the resamples both sides have.

Where a benchmark judges samples together (`Benchmark.group_of`: an MMBench question's circular
variants, an MME image's questions), the resampled unit is the group, drawn whole: a resample of single
variants would judge a question on some of its variants and bias its circular score upward.

Intervals are percentile intervals at `LEVEL`.
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tqdm import tqdm

REPLICATES = 1000
BENCHMARK_REPLICATES = 200
LEVEL = 0.95
SEED = 0
JOB = ["model", "method", "budget", "benchmark"]
#: How far a recomputed headline may be from metrics.json's before the two are called different.
HEADLINE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Bootstrap:
    """Replicates of every job's headline (job key -> array; a benchmark-path job has fewer), the jobs
    that have none (`skipped`: model, method, budget, benchmark, reason) and how each job's were made."""
    replicates: dict[tuple[str, str, str, str], np.ndarray]
    skipped: pd.DataFrame
    level: float = LEVEL
    paths: dict[tuple[str, str, str, str], str] = field(default_factory=dict)

    def job(self, model: str, method: str, budget: str, benchmark: str) -> np.ndarray | None:
        return self.replicates.get((str(model), str(method), str(budget), str(benchmark)))

    def average(self, model: str, method: str, budget: str, benchmarks) -> np.ndarray | None:
        """Replicates of the mean over `benchmarks` of the job's headlines (on the resamples every one
        of them has); None when one has none."""
        rows = [self.job(model, method, budget, benchmark) for benchmark in benchmarks]
        if not rows or any(row is None for row in rows):
            return None
        return np.mean(shared_prefix(*rows), axis=0)

    def interval(self, replicates: np.ndarray | None) -> tuple[float, float]:
        return percentile_interval(replicates, self.level)

    def most_replicates(self) -> int:
        return max((len(values) for values in self.replicates.values()), default=0)


def shared_prefix(*arrays: np.ndarray) -> list[np.ndarray]:
    """The arrays cut to the resamples all of them have (replicate i is the same resample in each)."""
    common = min(len(array) for array in arrays)
    return [array[:common] for array in arrays]


def percentile_interval(replicates: np.ndarray | None, level: float = LEVEL) -> tuple[float, float]:
    """(low, high) percentile interval of the replicates; NaNs when there are none."""
    if replicates is None or len(replicates) == 0 or np.isnan(replicates).all():
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.nanpercentile(replicates, [tail, 100.0 - tail])
    return float(low), float(high)


def resample_counts(model: str, benchmark: str, samples: int, replicates: int, seed: int) -> np.ndarray:
    """(replicates, samples) multiplicities of a with-replacement resample of `samples` items; the
    same for every job of (model, benchmark) and every report rendered with the same seed (the first
    k rows do not depend on how many rows are drawn)."""
    stream = np.random.default_rng([seed, zlib.crc32(f"{model}\0{benchmark}".encode())])
    return stream.multinomial(samples, np.full(samples, 1.0 / samples), size=replicates).astype(np.int32)


def bootstrap(samples: pd.DataFrame, headline: pd.DataFrame, replicates: int = REPLICATES,
              seed: int = SEED, level: float = LEVEL, benchmark_replicates: int = BENCHMARK_REPLICATES
              ) -> Bootstrap:
    """Paired bootstrap replicates of every job's headline (see the module docstring).

    samples: the summary's per-sample table (model, method, budget, benchmark, id, score, error,
    scoring); headline: one row per job with its headline `value` and `benchmark_module`
    (tables.headline_scores).
    """
    if replicates < 1:
        raise ValueError(f"bootstrap replicates {replicates}: must be a positive integer")
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level {level}: must be between 0 and 1 (e.g. 0.95)")
    jobs = headline.assign(**{column: headline[column].astype(str) for column in JOB}).set_index(JOB)
    modules = jobs["benchmark_module"] if "benchmark_module" in jobs else pd.Series(None, index=jobs.index)
    rows, paths, skipped = {}, {}, {}
    groups = samples.groupby(["model", "benchmark"], sort=True, observed=True)
    for (model, benchmark), group in tqdm(groups, desc="bootstrap", unit="benchmark", disable=None):
        ids = np.sort(group["id"].astype(str).unique())
        module = next((m for m in modules[modules.index.get_level_values("benchmark") == str(benchmark)]
                       if isinstance(m, str)), None)
        units = resampling_units(module, ids)
        counts = resample_counts(str(model), str(benchmark), int(units.max()) + 1, replicates, seed)[:, units]
        for (method, budget), job in group.groupby(["method", "budget"], sort=True, observed=True):
            key = (str(model), str(method), str(budget), str(benchmark))
            value = jobs["value"].get(key)
            aligned = job.drop_duplicates(subset="id").set_index("id", drop=False).reindex(ids)   # one row per id
            replicated, reason = mean_replicates(value, aligned, counts)
            paths[key] = "mean"
            if replicated is None:
                paths[key] = "benchmark"
                replicated, why_not = benchmark_replicates_of(value, modules.get(key), aligned,
                                                              counts[:min(benchmark_replicates, replicates)])
                reason = f"{reason}; {why_not}"
            if replicated is None:
                skipped[key] = reason
                del paths[key]
            else:
                rows[key] = replicated
    for key in map(tuple, jobs.index):
        if key not in rows and key not in skipped:
            skipped[key] = "no per-sample records (no shard predictions beside its metrics.json)"
    skipped_frame = pd.DataFrame([{**dict(zip(JOB, key)), "reason": reason} for key, reason in skipped.items()],
                                 columns=[*JOB, "reason"])
    return Bootstrap(replicates=rows, skipped=skipped_frame, level=level, paths=paths)


def mean_replicates(value, aligned: pd.DataFrame, counts: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """The mean path: 100 x the resampled mean of the per-sample scores, if that is the headline."""
    scores = aligned["score"].astype(float).to_numpy()
    scored = ~np.isnan(scores)
    reason = headline_mismatch(value, 100.0 * float(np.mean(scores[scored])) if scored.any() else None, "mean "
                               "per-sample score")
    if reason:
        return None, reason
    weights = counts[:, scored]
    totals = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * (weights @ scores[scored]) / np.where(totals > 0, totals, np.nan), None


def benchmark_replicates_of(value, module, aligned: pd.DataFrame, counts: np.ndarray
                            ) -> tuple[np.ndarray | None, str | None]:
    """The benchmark path: the benchmark's own aggregate on each resample, if it gives the headline."""
    from ficoco import benchmarks

    if module is None or pd.isna(module):
        return None, "its metrics.json names no benchmark module to recompute it with (rerun its score job)"
    if "scoring" not in aligned or aligned["scoring"].isna().all():
        return None, "its records carry no scoring (rerun its evaluate job) to recompute the headline with"
    present = aligned["id"].notna().to_numpy()
    records = [sample_record(row) for row in aligned[present].itertuples(index=False)]
    bench = benchmarks.get(str(module))
    full = bench.aggregate(records).get("score")
    reason = headline_mismatch(value, full, f"{module}'s aggregate of the records")
    if reason:
        return None, reason
    multiplicities = counts[:, present]
    replicated = np.array([
        number_or_nan(bench.aggregate([record for record, times in zip(records, row) for _ in range(times)])
                      .get("score"))
        for row in multiplicities])
    return replicated, None


def resampling_units(module, ids: np.ndarray) -> np.ndarray:
    """For each sample id (sorted), the index of the unit the bootstrap draws: its group where the benchmark
    `module` judges samples together (`Benchmark.group_of`), else the sample alone."""
    from ficoco import benchmarks

    bench = benchmarks.get(module) if isinstance(module, str) and module in benchmarks.names() else None
    group_of = getattr(bench, "group_of", lambda sample_id: None)
    units: dict = {}
    return np.array([units.setdefault(("group", key) if (key := group_of(sample_id)) is not None
                                      else ("sample", sample_id), len(units)) for sample_id in ids], dtype=np.int64)


def sample_record(row) -> dict:
    """A journal-like record of one sample, as the benchmark's aggregate reads it."""
    score = None if pd.isna(row.score) else float(row.score)
    scoring = json.loads(row.scoring) if isinstance(row.scoring, str) else {"score": score}
    return {"id": str(row.id), "score": score, "scoring": scoring,
            "error": None if pd.isna(row.error) else str(row.error)}


def number_or_nan(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def headline_mismatch(value, recomputed, what: str) -> str | None:
    """Why replicates of `what` would not be the job's headline (None when they would)."""
    if value is None or pd.isna(value):
        return "no headline score"
    if recomputed is None or (isinstance(recomputed, float) and math.isnan(recomputed)):
        return f"no {what} to compare with the headline"
    if abs(float(recomputed) - float(value)) > HEADLINE_TOLERANCE * max(1.0, abs(float(value))):
        return f"the headline {float(value):.4g} is not the {what} ({float(recomputed):.4g})"
    return None


def paired_difference(first: np.ndarray | None, second: np.ndarray | None,
                      level: float = LEVEL) -> tuple[float, float]:
    """Interval of first - second, replicate by replicate (both from the same resamples)."""
    if first is None or second is None:
        return float("nan"), float("nan")
    first, second = shared_prefix(first, second)
    return percentile_interval(first - second, level)


def ratio_percent(value: np.ndarray | None, base: np.ndarray | None) -> np.ndarray | None:
    """100 x value / base, replicate by replicate (Avg% against vanilla, paired)."""
    if value is None or base is None:
        return None
    value, base = shared_prefix(value, base)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * value / np.where(base != 0, base, np.nan)

# The grid, from the validated config. All logic lives in ficoco.config; this file only wires it.
import json
import os
import re
import sys
from pathlib import Path

from ficoco.budget_labels import LABEL_PATTERN
from ficoco.config import (ConfigError, calibrated_methods, check_fetched_copies, grid_names, job_grid,
                           load_registries, method_overrides)

# The Snakefile read the config files strictly and validated them with the --config overrides
# (ficoco.config.load_config); the validated config, defaults filled in, replaces Snakemake's reading.
config.clear()
config.update(VALIDATED_CONFIG)

MODELS, BENCHMARKS = load_registries(config, Path.cwd())
JOBS = job_grid(config, Path.cwd())
PY = sys.executable  # the environment Snakemake runs in; on Slurm the same path on the compute node

# W&B settings travel as environment variables, never as job parameters: changing them reruns nothing.
os.environ.setdefault("WANDB_PROJECT", config["wandb"]["project"])
if config["wandb"]["entity"]:
    os.environ.setdefault("WANDB_ENTITY", config["wandb"]["entity"])


def _names_regex(names):
    return "|".join(map(re.escape, names)) if names else "(?!)"


GRID_MODELS = grid_names(config, "models")          # of the top-level grid and every entry of `grids`
GRID_BENCHMARKS = grid_names(config, "benchmarks")
HUB_MODELS = [m for m in GRID_MODELS if MODELS[m]["source"] == "hub"]
TOY_MODELS = [m for m in GRID_MODELS if MODELS[m]["source"] == "toy"]
# the benchmarks to fetch or build: the evaluated ones and the calibration set of calibrated methods
CALIBRATED = calibrated_methods(config)
CALIBRATION_BENCHMARK = config["calibration"]["benchmark"] if CALIBRATED else None
PREPARED_BENCHMARKS = GRID_BENCHMARKS + ([CALIBRATION_BENCHMARK] if CALIBRATION_BENCHMARK else [])
HUB_BENCHMARKS = [b for b in PREPARED_BENCHMARKS if BENCHMARKS[b].get("source", "hub") == "hub"]
TOY_BENCHMARKS = [b for b in PREPARED_BENCHMARKS if BENCHMARKS[b].get("source", "hub") == "toy"]

# what each (model, method, budget label) runs: a TFLOPs label's solved token budget, else the label
RUN_BUDGETS = {(j.model, j.method, j.budget): j for j in JOBS}
RUN_DIR = "results/runs/{model}/{benchmark}/{method}/b{budget}"
RUNS = sorted({(j.model, j.benchmark, j.method, j.phase, j.budget, j.shards) for j in JOBS})
METRICS = [RUN_DIR.format(model=m, benchmark=b, method=me, budget=bu) + "/metrics.json" for m, b, me, _, bu, _ in RUNS]
MEASURED_METHODS = config["measure"]["methods"] or grid_names(config, "methods")
MEASURES = sorted({f"results/measure/{j.model}/{j.method}/b{j.budget}.json" for j in JOBS
                   if j.method in MEASURED_METHODS}) if config["measure"]["enabled"] else []
SUMMARY = "results/summary/results.csv"
MODEL_MANIFEST = "resources/models/{model}/manifest.json"     # written by fetch_model or build_toy_model
BENCHMARK_MANIFEST = "resources/benchmarks/{benchmark}/manifest.json"    # fetch_benchmark or build_toy_benchmark
REPORT_HTML = config["report"]["html"]
CALIBRATION = "results/calibration/{model}/{method}/b{budget}.json"     # rule calibrate (FitPrune's fit)

# a copy fetched at another pin than its registry entry names is never reused under the new pin
try:
    check_fetched_copies(MODELS, BENCHMARKS, {m: MODEL_MANIFEST.format(model=m) for m in HUB_MODELS},
                         {b: BENCHMARK_MANIFEST.format(benchmark=b) for b in HUB_BENCHMARKS})
except ConfigError as error:
    sys.stderr.write(f"{error}\n")
    sys.exit(1)


def phase_of(method):
    from ficoco import methods

    return methods.get(method).phase


def benchmark_options(benchmark):
    """The config's options for a benchmark; a subset draw is seeded from the config seed."""
    options = dict(config["benchmark_options"].get(benchmark, {}))
    if "subset_size" in options:
        options.setdefault("seed", config["seed"])
    return options


def run_budget(wildcards):
    return RUN_BUDGETS[wildcards.model, wildcards.method, wildcards.budget].run_budget


def job_json(wildcards):
    """The job keys `score` records in metrics.json, with what a TFLOPs label was solved into."""
    job = RUN_BUDGETS[wildcards.model, wildcards.method, wildcards.budget]
    return json.dumps({"model": job.model, "method": job.method, "phase": job.phase, "budget": job.budget,
                       "benchmark": wildcards.benchmark, "run_budget": job.run_budget,
                       "predicted_tflops": job.predicted_tflops, "limit": config["limit"]})


def calibration_input(wildcards):
    """The fitted calibration a job of a calibrated method reads (none for other methods)."""
    return CALIBRATION.format(**wildcards) if wildcards.method in CALIBRATED else []


def calibration_arg(wildcards, input):
    return f"--calibration {input.calibration}" if wildcards.method in CALIBRATED else ""


def overrides_json(wildcards):
    return json.dumps(method_overrides(config, MODELS, wildcards.model, wildcards.method, wildcards.budget),
                      sort_keys=True)


wildcard_constraints:
    budget=LABEL_PATTERN,
    shard=r"\d+",
    shards=r"\d+",

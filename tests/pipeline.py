"""Helpers for tests that run the real pipeline: a scratch copy of the workflow, a small toy config
(the untrained "small" toy model, a row limit), and Snakemake in a subprocess, as a user runs it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ficoco import methods as method_registry

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_PARTS = ("workflow", "config", "slurm", "report")

# The golden grid (tests/test_golden_pipeline.py; tests/test_slurm.py compares Slurm's results with it):
# one or two methods of every phase (vision, projector, LLM, both) and an adaptive (count per image) one
GOLDEN_METHODS = ["vanilla", "ficoco-v", "divprune", "cdpruner", "fastv", "ficoco-l", "ficoco-vl", "prumerge-adaptive",
                  "fitprune"]
GOLDEN_BUDGETS = [96, 72]            # of 144 visual tokens; the small toy model has 4 LLM layers
GOLDEN_LIMIT = 4


def copy_workflow(repo: Path) -> Path:
    """Snakefile, workflow/, config/, slurm/ and report/ copied into `repo` (created)."""
    repo.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "Snakefile", repo)
    for name in WORKFLOW_PARTS:
        shutil.copytree(REPO_ROOT / name, repo / name, ignore=shutil.ignore_patterns("*.html", "__pycache__"))
    return repo


def write_toy_config(repo: Path, name: str, *, methods, budgets, benchmarks=("toy-shapes-mini",), limit=4,
                     batch_size=4, measure_methods=None, project="ficoco-test") -> str:
    """config/<name>.yaml for a small, fast toy grid; returns its path relative to `repo`."""
    models = yaml.safe_load((repo / "config/models.yaml").read_text())
    models["toy-llava"].update(train=False, size="small")
    (repo / "config/test_models.yaml").write_text(yaml.safe_dump(models))
    config = {"models": ["toy-llava"], "methods": list(methods), "budgets": list(budgets),
              "benchmarks": list(benchmarks), "limit": limit, "batch_size": batch_size, "device": "cpu",
              "registries": {"models": "config/test_models.yaml"},
              "measure": {"enabled": bool(measure_methods), **({"methods": list(measure_methods)}
                                                              if measure_methods else {})},
              "wandb": {"project": project}}
    if any(method_registry.get(method).calibrated for method in methods):      # FitPrune fits on 4 training scenes
        config["calibration"] = {"benchmark": "toy-shapes-train", "rows": 4}
    (repo / f"config/{name}.yaml").write_text(yaml.safe_dump(config))
    return f"config/{name}.yaml"


def pipeline_env(**extra) -> dict:
    """The environment of a pipeline run: this interpreter's bin first, offline, W&B off unless given."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "WANDB_MODE": "disabled",
            **extra}


def snakemake(cwd: Path, *args, env: dict | None = None, timeout: int = 900, warm: bool = False
              ) -> subprocess.CompletedProcess:
    """Snakemake in a subprocess; `warm`: under `ficoco warm`, as `make demo` runs it."""
    command = [sys.executable, "-m", "snakemake", *args]
    if warm:
        command = [sys.executable, "-m", "ficoco.cli", "warm", "--", *command]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env or pipeline_env())


def planned_jobs(repo: Path, configfile: str) -> list[dict]:
    """`ficoco grid --json`: every evaluate job with its planned schedule, as a user would list them."""
    result = subprocess.run([sys.executable, "-m", "ficoco.cli", "grid", "--configfile", configfile, "--json"],
                            cwd=repo, capture_output=True, text=True, timeout=300, env=pipeline_env())
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def build_toy_world(root: Path, *, rows: int, seed: int) -> Path:
    """`root/bench` (`rows` test rows) and `root/model` (the untrained small toy model) built with `ficoco toy`,
    as a job reads them; returns `root`."""
    for args in (("build-benchmark", "--out", str(root / "bench"), "--rows", str(rows), "--seed", str(seed)),
                 ("build-model", "--out", str(root / "model"), "--no-train", "--size", "small", "--seed", str(seed))):
        subprocess.run([sys.executable, "-m", "ficoco.cli", "toy", *args], check=True, capture_output=True,
                       text=True, timeout=600)
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_golden(repo: Path) -> str:
    """The golden grid run through Snakemake (W&B offline) from an empty results folder, under `ficoco warm` as
    `make demo` runs it (tests/test_slurm.py runs part of it cold, through Slurm, and compares); returns its config."""
    copy_workflow(repo)
    config = write_toy_config(repo, "golden", methods=GOLDEN_METHODS, budgets=GOLDEN_BUDGETS, limit=GOLDEN_LIMIT,
                              measure_methods=["vanilla"])
    result = snakemake(repo, "--cores", "2", "--configfile", config, env=pipeline_env(WANDB_MODE="offline"),
                       warm=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return config

"""Reruns through real Snakemake recompute: 0 stale records after a parameter change or `-R`.

A tiny toy grid (vanilla, ficoco-v at budgets 36 and 72, on 8 rows) is run, then rerun once the ways
a user reruns jobs, one scenario per job:
- ficoco-v b36: finished; its parameters change ("Params have changed");
- ficoco-v b72: killed after its last batch was journaled (no predictions, no finished marker),
  then its parameters change: an unfinished journal with another fingerprint;
- vanilla: finished; `-R` on its predictions (`-R` is `--forcerun`), with a killed atomic write's
  temporary file beside them.
Every rerun job must set its old journal aside (kept, the reason in its log) and write predictions
from the new run only; vanilla's metrics must equal the first run's.
"""
import json
import os
from pathlib import Path

import pytest
import yaml

from ficoco import methods
from ficoco.dims import ModelDims
from ficoco.evaluate import score
from ficoco.journal import Journal, read_jsonl
from pipeline import copy_workflow
from test_workflow import job_counts, snakemake, write_tiny_config

RUNS = "results/runs/toy-llava/toy-shapes-mini"
JOBS = (("vanilla", "full"), ("ficoco-v", "36"), ("ficoco-v", "72"))
VANILLA, V36, V72 = JOBS


def shard_dir(repo: Path, job) -> Path:
    method, budget = job
    return repo / RUNS / method / f"b{budget}" / "shard0of1"


def predictions(repo: Path, job) -> Path:
    return shard_dir(repo, job) / "predictions.jsonl"


def job_log(repo: Path, job) -> str:
    method, budget = job
    return (repo / "logs/evaluate/toy-llava/toy-shapes-mini" / method / f"b{budget}" / "shard0of1.log").read_text()


def set_aside(repo: Path, job) -> list[Path]:
    return sorted((shard_dir(repo, job) / "set-aside").glob("*/journal.jsonl"))


def run_snakemake(repo: Path, env: dict, *extra: str):
    targets = [str(predictions(repo, job).relative_to(repo)) for job in JOBS]
    result = snakemake(repo, *targets, "--cores", "2", *extra, "--configfile", "config/test.yaml", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def set_ficoco_v_start(repo: Path, start: int) -> None:
    config = yaml.safe_load((repo / "config/test.yaml").read_text())
    config.update(budgets=[36, 72], method_params={"ficoco-v": {"start": start}})
    (repo / "config/test.yaml").write_text(yaml.safe_dump(config))


def planned_vision(repo: Path, budget: str, start: int) -> list[list[int]]:
    dims = ModelDims.from_config(json.loads((repo / "resources/models/toy-llava/config.json").read_text()))
    return methods.get("ficoco-v").plan(dims, int(budget), start=start).vision_counts


def vision_counts(records) -> list:
    return [record["counts"]["vision"] for record in records]


def metrics(repo: Path, job, tmp_path: Path) -> dict:
    job_keys = {"model": "toy-llava", "method": job[0], "phase": methods.get(job[0]).phase, "budget": job[1],
                "benchmark": "toy-shapes-mini"}
    return score([predictions(repo, job)], "toy-shapes", tmp_path / f"{job[0]}-{job[1]}.json", job_keys,
                 benchmark_manifest=repo / "resources/benchmarks/toy-shapes-mini/manifest.json")


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    repo = copy_workflow(tmp_path_factory.mktemp("rerun") / "repo")
    write_tiny_config(repo, ["toy-shapes-mini"])
    set_ficoco_v_start(repo, 2)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    run_snakemake(repo, env)
    return repo, env


def test_reruns_recompute_and_keep_the_old_journal(tiny_repo, tmp_path):
    repo, env = tiny_repo
    first = {job: read_jsonl(predictions(repo, job)) for job in JOBS}
    for job in (V36, V72):
        assert vision_counts(first[job]) == [planned_vision(repo, job[1], 2)] * 8
        assert planned_vision(repo, job[1], 1) != planned_vision(repo, job[1], 2)
    first_vanilla = metrics(repo, VANILLA, tmp_path / "first")
    vanilla_started = Journal(shard_dir(repo, VANILLA) / "journal.jsonl").load().header["started"]

    # ficoco-v b72 killed after its last batch: the journal holds every record but no finished marker
    journal = shard_dir(repo, V72) / "journal.jsonl"
    journal.write_text("".join(journal.read_text().splitlines(keepends=True)[:-1]))
    predictions(repo, V72).unlink()
    (shard_dir(repo, VANILLA) / ".predictions.jsonl.x1y2z3.tmp").write_text('{"id": "torn')

    set_ficoco_v_start(repo, 1)
    run_snakemake(repo, env, "-R", str(predictions(repo, VANILLA).relative_to(repo)))

    for job, slug in ((V36, "finished"), (V72, "fingerprint-changed")):
        new = read_jsonl(predictions(repo, job))
        assert [r["id"] for r in new] == [r["id"] for r in first[job]]
        assert vision_counts(new) == [planned_vision(repo, job[1], 1)] * 8, f"{job}: a stale record survived"
        contents = Journal(shard_dir(repo, job) / "journal.jsonl").load()
        assert contents.header["fingerprint"]["params"]["start"] == 1 and contents.finished is not None
        [kept] = set_aside(repo, job)                                    # the old journal, kept
        assert kept.parent.name.endswith(f"-{slug}")
        assert vision_counts(Journal(kept).read().values()) == [planned_vision(repo, job[1], 2)] * 8
        log = job_log(repo, job)
        assert "set aside" in log and "fingerprint differs in params" in log and "resuming" not in log, log
    assert "is finished" in job_log(repo, V36) and "is finished" not in job_log(repo, V72)

    [kept] = set_aside(repo, VANILLA)
    assert kept.parent.name.endswith("-finished") and Journal(kept).load().header["started"] == vanilla_started
    fresh = Journal(shard_dir(repo, VANILLA) / "journal.jsonl").load()
    assert fresh.header["started"] > vanilla_started and len(fresh.records) == 8 and fresh.finished is not None
    again = metrics(repo, VANILLA, tmp_path / "again")
    assert again["metrics"] == first_vanilla["metrics"] and again["cost_mean"] == first_vanilla["cost_mean"]
    assert [path for path in (repo / "results").rglob("*") if ".tmp" in path.name] == []


def test_forcing_a_metrics_file_reruns_only_its_score(tiny_repo):
    """`-R` on metrics.json recomputes nothing: name the predictions.jsonl files to rerun a benchmark."""
    repo, env = tiny_repo
    metrics_file = str((shard_dir(repo, VANILLA).parent / "metrics.json").relative_to(repo))
    result = snakemake(repo, metrics_file, "-n", "--cores", "2", "-R", metrics_file, "--configfile", "config/test.yaml",
                       env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert job_counts(result.stdout) == {"score": 1}

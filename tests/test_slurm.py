"""The Slurm profile on a real, one-node Slurm (tools/slurm-local.sh), as a cluster user runs it.

`snakemake --profile slurm --workflow-profile slurm/one-node`: the real profile, with the thin
one-node layer's keys replacing its GPU requests and its status command (slurm/one-node/config.yaml).
Three jobs of the golden toy grid (tests/pipeline.py) run through Slurm, killed once and resumed; the
tests check that every evaluate job went through sbatch, that the results equal the golden local
run's, that a failing job is retried as the profile says and reported, and that the killed snakemake
resumed without recomputing finished jobs.
Needs root (the Slurm daemons run as root) or a running one-node Slurm.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline import (GOLDEN_LIMIT, REPO_ROOT, copy_workflow, pipeline_env, planned_jobs, read_jsonl, snakemake,
                      write_toy_config)

SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")
FINISHED = re.compile(r"Finished jobid: (\d+) \(Rule: (\w+)\)")
PARTITION = "debug"
SLURM_ENV = {"FICOCO_SLURM_ACCOUNT": "ficoco-test", "FICOCO_GPU_PARTITION": PARTITION,
             "FICOCO_CPU_PARTITION": PARTITION, "FICOCO_LOCAL_PARTITION": PARTITION}
PROFILE = ("--profile", "slurm", "--workflow-profile", "slurm/one-node")

def slurm_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def one_node_slurm():
    """A running one-node Slurm: the one CI started, else started here (and stopped afterwards)."""
    if slurm_answers():
        yield
        return
    if os.geteuid() != 0:
        pytest.fail("no Slurm answers `sinfo` and this user is not root; start one with "
                    "`sudo tools/slurm-local.sh start` (README: try the Slurm profile on one machine)")
    script = str(REPO_ROOT / "tools/slurm-local.sh")
    started = subprocess.run([script, "start"], capture_output=True, text=True, timeout=600,
                             env={**os.environ, **SLURM_ENV})
    assert started.returncode == 0, started.stderr[-3000:]
    yield
    subprocess.run([script, "stop"], capture_output=True, timeout=120)


def submissions(output: str) -> list[tuple[str, str, str, str]]:
    """(snakemake job id, Slurm job id, rule, wildcards folder) of every sbatch submission reported."""
    found = []
    for snakemake_id, slurm_id, log in SUBMITTED.findall(output):
        parts = Path(log).parts
        rule_index = next(i for i, part in enumerate(parts) if part.startswith("rule_"))
        found.append((snakemake_id, slurm_id, parts[rule_index][len("rule_"):], parts[rule_index + 1]))
    return found


def wildcards_folder(job: dict) -> str:
    """The folder the Slurm plugin names an evaluate job's log by (its wildcards, joined by _)."""
    return "_".join(str(job[key]) for key in ("model", "benchmark", "method", "budget", "shard", "shards"))


def shard_path(repo: Path, folder: str) -> Path:
    model, benchmark, method, budget, shard, shards = folder.split("_")
    return repo / "results/runs" / model / benchmark / method / f"b{budget}" / f"shard{shard}of{shards}" / \
        "predictions.jsonl"


def run_until_one_evaluate_job_finished(repo: Path, config: str, env: dict) -> tuple[str, str]:
    """Start the grid through Slurm one job at a time, and kill snakemake (SIGKILL, as when the login
    session dies) as soon as it has registered one evaluate job as finished; then cancel its Slurm jobs
    still queued or running, as the README tells a user to (`scancel`). Returns the finished job's
    wildcards folder and snakemake's output.

    Not Ctrl-C: a SIGINT can go unanswered while snakemake runs a local job (CI, 2026-12-03: 30 of
    them over two minutes, and the run finished every job), which made the test depend on timing."""
    process = subprocess.Popen([sys.executable, "-m", "snakemake", *PROFILE, "--configfile", config, "--jobs", "1"],
                               cwd=repo, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 400
    finished_jobid = None
    while time.time() < deadline and finished_jobid is None and process.poll() is None:
        finished_jobid = next((match.group(1) for line in list(lines)
                               if (match := FINISHED.search(line)) and match.group(2) == "evaluate"), None)
        time.sleep(0.5)
    assert finished_jobid is not None, "".join(lines)[-3000:]
    process.kill()
    process.wait(timeout=120)
    reader.join(timeout=30)
    output = "".join(lines)
    assert "steps (100%) done" not in output, output[-3000:]          # it was killed before the end
    subprocess.run(["scancel", *(slurm_id for _, slurm_id, _, _ in submissions(output))], capture_output=True,
                   timeout=60)
    by_jobid = {snakemake_id: folder for snakemake_id, _, rule, folder in submissions(output) if rule == "evaluate"}
    for _ in range(60):                                     # the cancelled job leaves the queue
        if not subprocess.run(["squeue", "-h", "-t", "PENDING,RUNNING,COMPLETING"], capture_output=True,
                              text=True).stdout.strip():
            break
        time.sleep(1)
    return by_jobid[finished_jobid], output


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_node_slurm, golden_run):
    """A part of the golden grid, run through Slurm the way a user recovers from a killed run: started,
    killed once one evaluate job has finished (its other Slurm jobs cancelled), `snakemake --unlock`, then run
    again to the end. The local run is the golden grid's (same model, benchmark, row limit and batch size); the Slurm copy
    reuses its built toy model and benchmark."""
    local, _ = golden_run
    cluster = copy_workflow(tmp_path_factory.mktemp("slurm") / "cluster")
    config = write_toy_config(cluster, "slurm", methods=["vanilla", "ficoco-v", "fastv"], budgets=[72],
                              limit=GOLDEN_LIMIT)
    shutil.copytree(local / "resources", cluster / "resources")
    env = pipeline_env(**SLURM_ENV)
    finished, killed_output = run_until_one_evaluate_job_finished(cluster, config, env)
    finished_mtime = shard_path(cluster, finished).stat().st_mtime
    assert snakemake(cluster, "--unlock", "--configfile", config, env=env).returncode == 0
    result = snakemake(cluster, *PROFILE, "--configfile", config, env=env)
    assert result.returncode == 0, (killed_output[-2000:], result.stdout[-3000:], result.stderr[-3000:])
    return {"local": local, "cluster": cluster, "config": config, "env": env, "finished": finished,
            "finished_mtime": finished_mtime, "killed_output": killed_output,
            "resumed_output": result.stdout + result.stderr}


def test_the_one_node_layer_replaces_only_gpu_requests_and_threads(runs):
    """The merged profiles as Snakemake resolves them: the layer's keys win, the rest is the real profile."""
    result = snakemake(runs["cluster"], *PROFILE, "--configfile", runs["config"], "-n", "--forcerun", "evaluate",
                       env=runs["env"])
    assert result.returncode == 0, result.stderr[-2000:]
    evaluate = [line for line in result.stdout.splitlines() if "slurm_partition=" in line and "runtime=30" in line]
    assert evaluate and all("gpu=" not in line and "mem_mb=3000" in line for line in evaluate)
    real = yaml.safe_load((REPO_ROOT / "slurm/config.yaml").read_text())
    assert real["set-resources"]["evaluate"]["gpu"] == 1          # the cluster user's profile is untouched


def test_every_evaluate_job_went_through_sbatch_and_slurm_records_it(runs):
    planned = {wildcards_folder(job) for job in planned_jobs(runs["cluster"], runs["config"])}
    # the job that finished before the kill, then every job of the resumed run
    completed = [(job_id, folder) for _, job_id, rule, folder in submissions(runs["killed_output"])
                 if rule == "evaluate" and folder == runs["finished"]]
    completed += [(job_id, folder) for _, job_id, rule, folder in submissions(runs["resumed_output"])
                  if rule == "evaluate"]
    assert {folder for _, folder in completed} == planned and len(completed) == len(planned)
    ids = ",".join(job_id for job_id, _ in completed)
    queue = subprocess.run(["squeue", "-h", "-t", "all", "-j", ids, "-o", "%i|%T|%k"], capture_output=True,
                           text=True, timeout=30)
    assert queue.returncode == 0, queue.stderr
    records = dict(line.split("|", 1) for line in queue.stdout.split())
    for job_id, folder in completed:
        state, comment = records[job_id].split("|", 1)
        assert state == "COMPLETED" and comment.startswith("rule_evaluate"), (job_id, state, comment)
        assert (runs["cluster"] / "logs/slurm/rule_evaluate" / folder / f"{job_id}.log").exists()


def test_slurm_results_equal_the_local_run(runs):
    """The local (golden) run's jobs ran in warm children (`ficoco warm`), Slurm's in fresh processes: the same
    predictions, counts, costs and metrics."""
    stable = ("id", "prediction", "score", "counts", "cost", "generated_tokens", "error")
    for job in planned_jobs(runs["cluster"], runs["config"]):
        run = Path("results/runs") / job["model"] / job["benchmark"] / job["method"] / f"b{job['budget']}"
        shard = run / f"shard{job['shard']}of{job['shards']}" / "predictions.jsonl"
        log = Path("logs/evaluate") / job["model"] / job["benchmark"] / job["method"] / f"b{job['budget']}" / \
            f"shard{job['shard']}of{job['shards']}.log"
        assert (runs["local"] / log).read_text().startswith("ficoco warm: running in a warm child")
        assert "ficoco warm" not in (runs["cluster"] / log).read_text()
        local, cluster = read_jsonl(runs["local"] / shard), read_jsonl(runs["cluster"] / shard)
        assert [{key: r[key] for key in stable} for r in cluster] == [{key: r[key] for key in stable} for r in local]
        local_metrics = yaml.safe_load((runs["local"] / run / "metrics.json").read_text())
        cluster_metrics = yaml.safe_load((runs["cluster"] / run / "metrics.json").read_text())
        for key in ("metrics", "cost_mean", "samples", "failures"):
            assert cluster_metrics[key] == local_metrics[key], (run, key)


def test_a_failing_job_is_retried_as_the_profile_says_and_reported(runs):
    cluster = runs["cluster"]
    weights = next((cluster / "resources/models/toy-llava").glob("*.safetensors"))
    original = weights.read_bytes()
    weights.write_bytes(original[:100])                    # a truncated checkpoint: every attempt fails
    # Not the job that finished before the kill: the resume test checks that job's output is untouched.
    target = next(job for job in planned_jobs(cluster, runs["config"])
                  if job["method"] != "vanilla" and wildcards_folder(job) != runs["finished"])
    predictions = shard_path(cluster, wildcards_folder(target))
    kept = predictions.read_bytes()                        # Snakemake deletes a failed job's output
    try:
        result = snakemake(cluster, *PROFILE, "--configfile", runs["config"], "-R",
                           str(predictions.relative_to(cluster)), env=runs["env"])
    finally:
        weights.write_bytes(original)
        predictions.write_bytes(kept)                      # later tests read every shard
    output = result.stdout + result.stderr
    retries = yaml.safe_load((REPO_ROOT / "slurm/config.yaml").read_text())["retries"]
    attempts = [job_id for _, job_id, rule, folder in submissions(output)
                if rule == "evaluate" and folder == wildcards_folder(target)]
    assert result.returncode != 0
    assert len(attempts) == 1 + retries, output[-3000:]
    assert "Error in rule evaluate" in output, output[-3000:]


def test_killed_snakemake_resumes_without_recomputing_finished_jobs(runs):
    """After a kill, `scancel`, `--unlock` and a plain rerun, only the jobs that had not finished are submitted
    again, and the finished job's output is left as it was."""
    resubmitted = {folder for _, _, rule, folder in submissions(runs["resumed_output"]) if rule == "evaluate"}
    planned = {wildcards_folder(job) for job in planned_jobs(runs["cluster"], runs["config"])}
    assert runs["finished"] not in resubmitted
    assert resubmitted == planned - {runs["finished"]}
    assert shard_path(runs["cluster"], runs["finished"]).stat().st_mtime == runs["finished_mtime"]

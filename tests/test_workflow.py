"""The Snakemake DAG, driven as a user would: dry runs of the paper grid and real runs of a tiny toy grid."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ficoco import methods
from ficoco.config import grid_names, job_grid, load_and_validate, load_registries, method_overrides
from pipeline import copy_workflow


def snakemake(cwd, *args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> number of jobs."""
    counts = {}
    in_table = False
    for line in output.splitlines():
        if line.startswith("job ") and "count" in line:
            in_table = True
            continue
        if in_table:
            parts = line.split()
            if not parts or parts[0] == "total":
                break
            if len(parts) == 2 and parts[1].isdigit():
                counts[parts[0]] = int(parts[1])
    return counts


def job_blocks(output: str) -> list[tuple[str, str]]:
    """(rule name, printed block) for every job of a dry run."""
    starts = list(re.finditer(r"^(?:local)?rule (\w+):$", output, flags=re.MULTILINE))
    return [(match.group(1), output[match.end(): starts[i + 1].start() if i + 1 < len(starts) else len(output)])
            for i, match in enumerate(starts)]


@pytest.mark.parametrize("configfile", ["config/paper.yaml", "config/paper-tflops.yaml"])
def test_paper_dry_run_lists_every_job(repo_copy, configfile):
    result = snakemake(repo_copy, "-n", "-p", "--cores", "1", "--configfile", configfile)
    assert result.returncode == 0, result.stderr[-2000:]
    config = load_and_validate(repo_copy / configfile, root=repo_copy)
    grid = job_grid(config, repo_copy)
    counts = job_counts(result.stdout)
    assert counts["evaluate"] == len(grid)
    assert counts["score"] == len({(j.model, j.benchmark, j.method, j.budget) for j in grid})
    assert counts["fetch_model"] == len(grid_names(config, "models"))
    calibrated = {method for method in grid_names(config, "methods") if methods.get(method).calibrated}
    # the calibration set is fetched too, and each calibrated method is fitted once per model and budget
    assert counts["fetch_benchmark"] == len(grid_names(config, "benchmarks")) + bool(calibrated)
    assert counts.get("calibrate", 0) == len({(j.model, j.method, j.budget) for j in grid if j.method in calibrated})
    assert counts["measure"] == len({(j.model, j.method, j.budget) for j in grid})
    assert counts["aggregate"] == counts["report"] == 1
    # each evaluate job runs the budget the grid solved for its label (a TFLOPs target's token budget)
    ran = re.findall(r"--method (\S+) --phase \S+ --budget (\S+) --budget-label (\S+)", result.stdout)
    assert len(ran) == len(grid)
    assert sorted(ran) == sorted((j.method, j.run_budget, j.budget) for j in grid)


def test_the_paper_grid_holds_the_v4_llava_next_grid():
    """Issue 18: config/paper.yaml lists LLaVA-NeXT-7B's Table 2 jobs beside LLaVA-1.5's, with its own budgets."""
    jobs = job_grid(load_and_validate("config/paper.yaml"))
    next_jobs = [job for job in jobs if job.model == "llava-next-7b"]
    assert {(job.method, job.budget) for job in next_jobs} == {
        ("vanilla", "full"),
        *((method, budget) for method in ("ficoco-v", "ficoco-l", "pdrop", "sparsevlm") for budget in ("320", "160"))}
    assert {job.benchmark for job in next_jobs} == {"mmbench", "scienceqa_img", "scienceqa_full", "textvqa", "mmmu"}
    assert {job.budget for job in jobs if job.model == "llava-1.5-7b" and job.method == "ficoco-v"} == {"192", "128", "64"}


def test_the_paper_grid_holds_the_v4_qwen2_vl_grid_and_the_same_on_qwen2_5_vl():
    """Issue 19: Table 3's Qwen2-VL-7B jobs at 600 / 500 / 400 tokens for every image (labels n600 ...), and the
    same grid on Qwen2.5-VL-7B; SparseVLM with its keeps for each label."""
    config = load_and_validate("config/paper.yaml")
    jobs = job_grid(config)
    for model in ("qwen2-vl-7b", "qwen2.5-vl-7b"):
        qwen_jobs = [job for job in jobs if job.model == model]
        assert {(job.method, job.budget) for job in qwen_jobs} == {
            ("vanilla", "full"), *((method, f"n{tokens}") for method in ("ficoco-v", "ficoco-l", "sparsevlm")
                                   for tokens in (600, 500, 400))}
        assert {job.benchmark for job in qwen_jobs} == {"mmbench", "pope", "textvqa"}
        assert all(job.run_budget == job.budget for job in qwen_jobs)
        keeps = method_overrides(config, load_registries(config)[0], model, "sparsevlm", "n400")["keeps"]
        assert keeps == [636, 290, 163]
        assert method_overrides(config, load_registries(config)[0], model, "ficoco-v", "n600") == {
            "semantic": "key-mean"}                             # the paper's CLS-free term: Qwen's tower has no CLS


def test_slurm_profile_gives_gpus_to_gpu_jobs_only(repo_copy):
    env = {**os.environ, "FICOCO_SLURM_ACCOUNT": "acct42", "FICOCO_GPU_PARTITION": "gpupart",
           "FICOCO_CPU_PARTITION": "cpupart"}
    result = snakemake(repo_copy, "--profile", "slurm", "-n", "--configfile", "config/paper.yaml", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    blocks = job_blocks(result.stdout)
    seen = {rule for rule, _ in blocks}
    assert {"evaluate", "measure", "calibrate", "fetch_model", "fetch_benchmark", "score", "aggregate", "report"} <= seen
    for rule, block in blocks:
        resources = next((line for line in block.splitlines() if line.strip().startswith("resources:")), "")
        if rule in ("evaluate", "measure", "calibrate"):
            assert "gpu=1" in resources and "slurm_partition=gpupart" in resources, (rule, resources)
            assert "slurm_account=acct42" in resources and "mem_mb=64000" in resources, (rule, resources)
        else:
            assert "gpu=" not in resources, (rule, resources)
    evaluate = next(block for rule, block in blocks if rule == "evaluate")
    assert "runtime=240" in evaluate


def test_jobs_pin_torch_threads_to_their_snakemake_threads(repo_copy):
    """OMP_NUM_THREADS = the job's threads: 1 per evaluate job locally (two 2-thread torch jobs on 2
    cores spin-wait on each other), the profile's set-threads (8) where it applies."""
    local = snakemake(repo_copy, "-n", "-p", "--cores", "16", "--configfile", "config/config.yaml")
    profile = snakemake(repo_copy, "--profile", "slurm", "--executor", "local", "--cores", "16", "-n", "-p",
                        "--configfile", "config/config.yaml")
    for result, threads in ((local, 1), (profile, 8)):
        assert result.returncode == 0, result.stderr[-2000:]
        commands = [line for line in result.stdout.splitlines() if " -m ficoco.cli run " in line]
        assert commands and all(line.split("Shell command: ")[-1].startswith(f"OMP_NUM_THREADS={threads} ")
                                for line in commands), commands[:2]


# ---------------------------------------------------------------------------------------------
# a real, tiny toy grid: what reruns when the config changes


def write_tiny_config(repo: Path, benchmarks, project="ficoco-test"):
    models = yaml.safe_load((repo / "config/models.yaml").read_text())
    models["toy-llava"].update(train=False, size="small")
    (repo / "config/test_models.yaml").write_text(yaml.safe_dump(models))
    config = {"models": ["toy-llava"], "methods": ["vanilla", "ficoco-v"], "budgets": [36],
              "benchmarks": benchmarks, "limit": 8, "batch_size": 4, "device": "cpu",
              "registries": {"models": "config/test_models.yaml"}, "measure": {"enabled": False},
              "wandb": {"project": project}}
    (repo / "config/test.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def finished_tiny_run(tmp_path_factory):
    repo = copy_workflow(tmp_path_factory.mktemp("tiny") / "repo")
    write_tiny_config(repo, ["toy-shapes-mini"])
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = snakemake(repo, "--cores", "2", "--configfile", "config/test.yaml", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return repo, env


def dry_run_counts(repo, env, *extra):
    result = snakemake(repo, "-n", "--cores", "2", "--configfile", "config/test.yaml", *extra, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return job_counts(result.stdout), result.stdout


def test_tiny_run_produces_the_report_and_nothing_is_left_to_do(finished_tiny_run):
    repo, env = finished_tiny_run
    assert (repo / "report/report.html").stat().st_size > 1000
    counts, output = dry_run_counts(repo, env)
    assert counts == {} and "Nothing to be done" in output


def test_changing_wandb_settings_reruns_nothing(finished_tiny_run):
    repo, env = finished_tiny_run
    counts, _ = dry_run_counts(repo, {**env, "WANDB_MODE": "offline"}, "--config", "wandb={'project': 'renamed'}")
    assert counts == {}


def test_adding_a_benchmark_runs_only_its_new_jobs(finished_tiny_run):
    repo, env = finished_tiny_run
    counts, _ = dry_run_counts(repo, env, "--config", "benchmarks=['toy-shapes-mini','toy-shapes-mini2']")
    # the new benchmark: its build, vanilla + ficoco-v@36 evaluations and scores; then aggregate and report
    assert counts == {"build_toy_benchmark": 1, "evaluate": 2, "score": 2, "aggregate": 1, "report": 1, "all": 1}


def test_forcing_one_benchmark_reruns_only_its_jobs(finished_tiny_run):
    repo, env = finished_tiny_run
    targets = sorted(str(p.relative_to(repo))
                     for p in (repo / "results/runs").glob("*/toy-shapes-mini/*/*/shard*/predictions.jsonl"))
    assert len(targets) == 2
    counts, _ = dry_run_counts(repo, env, "-R", *targets)
    assert counts == {"evaluate": 2, "score": 2, "aggregate": 1, "report": 1, "all": 1}


def test_a_change_to_the_scoring_code_rescores_the_existing_predictions_only(finished_tiny_run):
    """The score rule's params carry the benchmark's scoring-code digest, which metrics.json records too: a
    change to that code (here: the digest Snakemake recorded made an older one) reruns the score jobs on the
    predictions already there, never the evaluations, and never keeps the stale metrics."""
    import base64
    import json

    from ficoco.benchmarks import scoring_code_digest

    repo, env = finished_tiny_run
    digest = scoring_code_digest("toy-shapes")
    metrics = sorted((repo / "results/runs").glob("*/toy-shapes-mini/*/*/metrics.json"))
    assert len(metrics) == 2 and all(json.loads(path.read_text())["scoring_code"] == digest for path in metrics)
    records = {}
    for path in metrics:
        name = base64.b64encode(str(path.relative_to(repo)).encode()).decode().replace("/", "@")
        record = repo / ".snakemake/metadata" / name
        records[record] = record.read_text()
        assert f"'{digest}'" in json.loads(records[record])["params"]
    try:
        for record, text in records.items():
            record.write_text(text.replace(f"'{digest}'", "'0000000000000000'"))
        counts, output = dry_run_counts(repo, env)
        assert counts == {"score": 2, "aggregate": 1, "report": 1, "all": 1}
        assert "reason: Params have changed since last execution" in output
    finally:
        for record, text in records.items():
            record.write_text(text)

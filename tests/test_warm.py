"""`ficoco warm -- COMMAND`: jobs forked from a warm interpreter end exactly as fresh processes would.

The golden grid (tests/test_golden_pipeline.py) runs under `ficoco warm`, and tests/test_slurm.py
compares its results with the same jobs run cold through Slurm: the whole pipeline's identity. Here,
one job at a time: the same predictions, exit statuses and messages; a client killed outright takes its job
with it and the rerun resumes the journal; a job that cannot run warm runs cold and says why.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ficoco.journal import read_jsonl
from pipeline import build_toy_world
from ficoco.warm import SOCKET_ENV, import_time_differences

ROWS = 48
BATCH = 2
WARM_CHILD = "ficoco warm: running in a warm child (pid "


def ficoco(*args: str) -> list[str]:
    return [sys.executable, "-m", "ficoco.cli", *args]


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory):
    return build_toy_world(tmp_path_factory.mktemp("toy-world"), rows=ROWS, seed=5)


def run_args(toy_world: Path, out: Path, method: str = "divprune", budget: str = "36") -> list[str]:
    return ["run", "--model", "toy-llava", "--model-dir", str(toy_world / "model"), "--benchmark", "toy-shapes",
            "--benchmark-dir", str(toy_world / "bench"), "--method", method, "--budget", budget, "--out", str(out),
            "--batch-size", str(BATCH), "--device", "cpu", "--no-progress"]


def shell_line(args: list[str], log: Path, threads: int = 1) -> str:
    """One job as a Snakemake rule runs it: OMP_NUM_THREADS set, its output redirected to its log."""
    quoted = " ".join(f"'{part}'" for part in ficoco(*args))
    return f"OMP_NUM_THREADS={threads} {quoted} > '{log}' 2>&1"


def warm(*lines: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`ficoco warm -- bash -c LINES` (the lines run one after the other; the last one's status is bash's)."""
    return subprocess.run(ficoco("warm", "--", "bash", "-c", "\n".join(lines)), capture_output=True, text=True,
                          timeout=600, env=env or tracked_env(), **kwargs)


def tracked_env(**extra) -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


def comparable(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "latency_s"} for record in records]


def warm_child(log: Path) -> int | None:
    for line in log.read_text().splitlines():
        if line.startswith(WARM_CHILD):
            return int(line[len(WARM_CHILD):].split(")")[0])
    return None


def test_warm_jobs_equal_cold_ones_and_take_their_threads_from_the_job(toy_world, tmp_path):
    jobs = [("divprune", "36", 1), ("vanilla", "full", 2)]
    warm_result = warm(*(shell_line(run_args(toy_world, tmp_path / f"warm-{m}" / "predictions.jsonl", m, b),
                                    tmp_path / f"warm-{m}.log", threads) for m, b, threads in jobs))
    assert warm_result.returncode == 0, warm_result.stderr[-3000:]
    assert "ficoco warm: ready in" in warm_result.stderr
    for method, budget, threads in jobs:
        cold_log = tmp_path / f"cold-{method}.log"
        cold = subprocess.run(["bash", "-c", shell_line(run_args(toy_world, tmp_path / f"cold-{method}" /
                                                                 "predictions.jsonl", method, budget),
                                                        cold_log, threads)], env=tracked_env(), timeout=600)
        assert cold.returncode == 0, cold_log.read_text()[-3000:]
        warm_log = tmp_path / f"warm-{method}.log"
        assert warm_child(warm_log) is not None, warm_log.read_text()[:2000]
        assert warm_child(cold_log) is None and "ficoco warm" not in cold_log.read_text()
        assert f"torch threads {threads}," in warm_log.read_text()     # the job's OMP_NUM_THREADS, not the server's
        warm_records = read_jsonl(tmp_path / f"warm-{method}" / "predictions.jsonl")
        assert len(warm_records) == ROWS
        assert comparable(warm_records) == comparable(read_jsonl(tmp_path / f"cold-{method}" / "predictions.jsonl"))
        # W&B finished the warm run as it does a fresh one (its exit handlers ran): one complete offline run
        runs = list((tmp_path / f"warm-{method}" / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1 and runs[0].stat().st_size > 0


@pytest.mark.parametrize("args, status, message", [
    (["run", "--method", "ficoco-v"], 2, "the following arguments are required"),
    (["measure", "--model-config", "no/such/config.json", "--method", "nope", "--out", "x.json"], 2,
     "unknown method 'nope'"),
    (["calibrate", "--model-dir", "no/such/model", "--benchmark-dir", "no/such/bench", "--benchmark-module",
      "toy-shapes", "--method", "fitprune", "--budget", "36", "--rows", "2", "--out", "x.json"], 1, "Traceback"),
])
def test_a_failing_job_fails_warm_as_it_fails_cold(tmp_path, args, status, message):
    warm_log, cold_log = tmp_path / "warm.log", tmp_path / "cold.log"
    result = warm(f"cd '{tmp_path}'", shell_line(args, warm_log), "echo status=$?")
    subprocess.run(["bash", "-c", f"cd '{tmp_path}'; " + shell_line(args, cold_log) + "; echo status=$?"],
                   capture_output=True, text=True, timeout=300, env=tracked_env())
    assert result.returncode == 0 and f"status={status}" in result.stdout, (result.stdout, warm_log.read_text())
    assert warm_child(warm_log) is not None
    cold_text = cold_log.read_text()
    assert message in cold_text and message in warm_log.read_text()
    # the same last line (the error), from the same code
    assert warm_log.read_text().strip().splitlines()[-1] == cold_text.strip().splitlines()[-1]


def test_a_client_killed_outright_takes_its_job_and_the_rerun_resumes_it(toy_world, tmp_path):
    out = tmp_path / "killed" / "predictions.jsonl"
    journal, log, pid_file = out.parent / "journal.jsonl", tmp_path / "killed.log", tmp_path / "client.pid"
    # the client runs in the background of COMMAND, which waits until the test has killed it
    launcher = subprocess.Popen(ficoco("warm", "--", "bash", "-c",
                                       f"{shell_line(run_args(toy_world, out), log)} & echo $! > '{pid_file}'; wait"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tracked_env())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not journal.exists() or journal.read_text().count('"row"') < 2 * BATCH):
        time.sleep(0.02)
    child = warm_child(log)
    assert child is not None, log.read_text()[-2000:]
    # bash's `$!` is the exec'd `ficoco run` client (bash execs a lone redirected command) or its subshell
    client = int(pid_file.read_text())
    os.kill(client, signal.SIGKILL)
    launcher.communicate(timeout=120)
    assert ended(child), "the warm child outlived its client"
    recorded = journal.read_text().count('"row"')
    assert 0 < recorded < ROWS and not out.exists()

    rerun_log = tmp_path / "rerun.log"
    rerun = warm(shell_line(run_args(toy_world, out), rerun_log))
    assert rerun.returncode == 0, rerun_log.read_text()[-3000:]
    assert warm_child(rerun_log) is not None and f"resuming {journal}" in rerun_log.read_text()
    clean = tmp_path / "clean" / "predictions.jsonl"
    subprocess.run(ficoco(*run_args(toy_world, clean)), check=True, capture_output=True, timeout=600,
                   env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    assert comparable(read_jsonl(out)) == comparable(read_jsonl(clean))


def ended(pid: int, timeout: float = 30) -> bool:
    """Whether process `pid` has ended within `timeout` s: gone, or a zombie that nobody has reaped yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                         if line.startswith("State"))
        except FileNotFoundError:
            return True
        if "Z" in state:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_to_the_client_ends_the_job_and_the_client_by_sigterm(toy_world, tmp_path):
    out, log = tmp_path / "terminated" / "predictions.jsonl", tmp_path / "terminated.log"
    launcher = subprocess.Popen(ficoco("warm", "--", "bash", "-c", shell_line(run_args(toy_world, out), log)
                                       + "; echo status=$?"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tracked_env())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not log.exists() or warm_child(log) is None):
        time.sleep(0.02)
    child = warm_child(log)
    assert child is not None
    client = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _is_client(int(p), out))
    os.kill(client, signal.SIGTERM)
    stdout, _ = launcher.communicate(timeout=120)
    assert f"status={128 + signal.SIGTERM}" in stdout        # as bash reports a job killed by SIGTERM
    assert ended(child)
    assert not out.exists()


def _is_client(pid: int, out: Path) -> bool:
    """The `ficoco run --out OUT` client process (not bash, not the warm child, which has the server's argv)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"ficoco.cli" in argv and str(out).encode() in argv


def test_without_a_server_a_job_runs_cold_and_says_why(toy_world, tmp_path):
    out, log = tmp_path / "cold" / "predictions.jsonl", tmp_path / "cold.log"
    env = {**os.environ, "WANDB_MODE": "disabled", SOCKET_ENV: str(tmp_path / "no-such-socket")}
    result = subprocess.run(["bash", "-c", shell_line(run_args(toy_world, out, "vanilla", "full"), log)], env=env,
                            timeout=600)
    assert result.returncode == 0, log.read_text()[-2000:]
    text = log.read_text()
    assert text.startswith(f"ficoco warm: running cold: no warm interpreter at {tmp_path / 'no-such-socket'}")
    assert warm_child(log) is None and len(read_jsonl(out)) == ROWS


def test_a_job_inside_a_slurm_allocation_runs_cold_there(tmp_path):
    log = tmp_path / "slurm.log"
    result = warm(f"SLURM_JOB_ID=42 {shell_line(['run', '--method', 'vanilla'], log)}; echo status=$?")
    assert "status=2" in result.stdout                      # then argparse's error, in this process
    assert log.read_text().startswith("ficoco warm: running cold: inside Slurm job 42\n")
    assert warm_child(log) is None


def test_a_job_whose_import_time_environment_differs_runs_cold(toy_world, tmp_path):
    out, log = tmp_path / "other-home" / "predictions.jsonl", tmp_path / "other-home.log"
    line = f"HF_HOME='{tmp_path / 'hf'}' " + shell_line(run_args(toy_world, out, "vanilla", "full"), log)
    result = warm(line, env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 0, log.read_text()[-2000:]
    assert log.read_text().startswith("ficoco warm: running cold: HF_HOME differ(s) from the warm interpreter's")
    assert warm_child(log) is None and len(read_jsonl(out)) == ROWS


def test_import_time_differences_name_only_what_imports_read():
    server = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": "/a",
              "PATH": "/bin", "KMP_AFFINITY": "none"}
    # the offline defaults the delegated commands set themselves; thread counts (the child sets them), W&B
    # and PATH (read later) are not compared
    job = {"HF_HOME": "/a", "PATH": "/usr/bin", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_PROJECT": "p",
           "KMP_AFFINITY": "none"}
    assert import_time_differences(job, server) == []
    assert import_time_differences({**job, "HF_HOME": "/b", "TORCH_HOME": "/t"}, server) == ["HF_HOME", "TORCH_HOME"]
    assert import_time_differences({**job, "HF_HUB_OFFLINE": "0"}, server) == ["HF_HUB_OFFLINE"]
    assert import_time_differences({k: v for k, v in job.items() if k != "KMP_AFFINITY"}, server) == ["KMP_AFFINITY"]


def test_a_job_whose_thread_counts_disagree_runs_cold(tmp_path):
    log = tmp_path / "threads.log"
    result = warm(f"MKL_NUM_THREADS=2 {shell_line(['run', '--method', 'vanilla'], log)}; echo status=$?")
    assert "status=2" in result.stdout                      # then argparse's error, as cold
    assert log.read_text().startswith("ficoco warm: running cold: thread counts OMP_NUM_THREADS=1, "
                                      "MKL_NUM_THREADS=2: one positive integer for all of them runs warm")


def test_the_launcher_passes_the_command_status_cleans_up_and_refuses_a_missing_command(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    run = subprocess.run(ficoco("warm", "--", "bash", "-c", f'test -S "${SOCKET_ENV}" && exit 7'),
                         capture_output=True, timeout=300, env=env)
    assert run.returncode == 7                              # COMMAND saw the socket, and its status came back
    assert list(scratch.iterdir()) == []                    # the socket's folder is gone
    missing = subprocess.run(ficoco("warm", "--", "no-such-command-here"), capture_output=True, text=True, timeout=300)
    assert missing.returncode == 127 and "no-such-command-here: command not found" in missing.stderr
    empty = subprocess.run(ficoco("warm"), capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "give the command to run" in empty.stderr

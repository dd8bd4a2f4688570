"""A real evaluate subprocess, SIGKILLed mid-run and rerun, ends exactly like an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ficoco.evaluate import score
from ficoco.journal import read_jsonl

ROWS = 64
BATCH = 4


def ficoco_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "ficoco.cli", *args], capture_output=True, text=True,
                          timeout=600, check=True, **kwargs)


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-world")
    ficoco_cli("toy", "build-benchmark", "--out", str(root / "bench"), "--rows", str(ROWS), "--seed", "3")
    ficoco_cli("toy", "build-model", "--out", str(root / "model"), "--no-train", "--size", "small", "--seed", "3")
    return root


def run_command(toy_world, out, *extra):
    return [sys.executable, "-m", "ficoco.cli", "run", "--model", "toy-llava", "--model-dir", str(toy_world / "model"),
            "--benchmark", "toy-shapes", "--benchmark-dir", str(toy_world / "bench"), "--method", "vanilla",
            "--budget", "full", "--out", str(out), "--batch-size", str(BATCH), "--device", "cpu", "--no-progress",
            *extra]


def journal_lines(path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def comparable(record):
    """Everything but wall-clock time."""
    return {k: v for k, v in record.items() if k != "latency_s"}


def test_sigkill_then_rerun_equals_an_uninterrupted_run(toy_world, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    killed_out = tmp_path / "killed" / "predictions.jsonl"
    journal = killed_out.parent / "journal.jsonl"

    process = subprocess.Popen(run_command(toy_world, killed_out), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while journal_lines(journal) < 2 * BATCH and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    recorded_at_kill = journal_lines(journal)
    assert 0 < recorded_at_kill < ROWS, f"the kill must land mid-run (journal had {recorded_at_kill} of {ROWS})"
    assert not killed_out.exists(), "no complete-looking output may exist after a kill"

    subprocess.run(run_command(toy_world, killed_out), env=env, check=True, capture_output=True, timeout=600)
    resumed = read_jsonl(killed_out)
    assert [r["row"] for r in resumed] == list(range(ROWS))
    assert journal_lines(journal) == ROWS, "every sample journaled exactly once"

    clean_out = tmp_path / "clean" / "predictions.jsonl"
    subprocess.run(run_command(toy_world, clean_out), env=env, check=True, capture_output=True, timeout=600)
    clean = read_jsonl(clean_out)
    assert [comparable(r) for r in resumed] == [comparable(r) for r in clean]

    job = {"model": "toy-llava", "method": "vanilla", "phase": "none", "budget": "full", "benchmark": "toy-shapes"}
    resumed_metrics = score([killed_out], "toy-shapes", tmp_path / "m1.json", job)
    clean_metrics = score([clean_out], "toy-shapes", tmp_path / "m2.json", job)
    assert resumed_metrics["metrics"] == clean_metrics["metrics"]
    assert resumed_metrics["samples"] == clean_metrics["samples"] == ROWS
    assert resumed_metrics["cost_mean"] == clean_metrics["cost_mean"]


def test_metrics_merge_shards_like_one_run(toy_world, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    outs = []
    for shard in range(3):
        out = tmp_path / f"shard{shard}of3" / "predictions.jsonl"
        subprocess.run(run_command(toy_world, out, "--shard", str(shard), "--shards", "3", "--limit", "24"),
                       env=env, check=True, capture_output=True, timeout=600)
        outs.append(out)
    whole = tmp_path / "whole" / "predictions.jsonl"
    subprocess.run(run_command(toy_world, whole, "--limit", "24"), env=env, check=True, capture_output=True,
                   timeout=600)
    job = {"model": "toy-llava", "method": "vanilla", "phase": "none", "budget": "full", "benchmark": "toy-shapes"}
    merged = score(outs, "toy-shapes", tmp_path / "merged.json", job)
    single = score([whole], "toy-shapes", tmp_path / "single.json", job)
    assert merged["samples"] == single["samples"] == 24
    assert merged["metrics"] == single["metrics"]
    assert json.loads((tmp_path / "merged.json").read_text())["job"] == job

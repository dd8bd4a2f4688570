"""A real evaluate subprocess, SIGKILLed mid-run and rerun, ends exactly like an uninterrupted run; the
journal is resumed only by a job with the same fingerprint, and never once finished."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ficoco import evaluate
from ficoco.evaluate import score
from ficoco.fingerprint import Fingerprint
from ficoco.invariants import InvariantViolation
from ficoco.journal import Journal, read_jsonl
from ficoco.tracking import run_folders
from pipeline import build_toy_world

ROWS = 64
BATCH = 4


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory):
    return build_toy_world(tmp_path_factory.mktemp("toy-world"), rows=ROWS, seed=3)


def run_command(toy_world, out, *extra):
    return [sys.executable, "-m", "ficoco.cli", "run", "--model", "toy-llava", "--model-dir", str(toy_world / "model"),
            "--benchmark", "toy-shapes", "--benchmark-dir", str(toy_world / "bench"), "--method", "vanilla",
            "--budget", "full", "--out", str(out), "--batch-size", str(BATCH), "--device", "cpu", "--no-progress",
            *extra]


def journal_lines(path) -> int:
    """Sample records in the journal (complete lines that are not the header or the finished marker)."""
    try:
        lines = path.read_text().split("\n")[:-1]
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if '"journal": ' not in line)


def comparable(record):
    """Everything but wall-clock time."""
    return {k: v for k, v in record.items() if k != "latency_s"}


def test_sigkill_then_rerun_equals_an_uninterrupted_run(toy_world, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    tracked = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}   # the killed run is tracked
    killed_out = tmp_path / "killed" / "predictions.jsonl"
    journal = killed_out.parent / "journal.jsonl"

    process = subprocess.Popen(run_command(toy_world, killed_out), env=tracked,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while journal_lines(journal) < 2 * BATCH and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    recorded_at_kill = journal_lines(journal)
    assert 0 < recorded_at_kill < ROWS, f"the kill must land mid-run (journal had {recorded_at_kill} of {ROWS})"
    assert not killed_out.exists(), "no complete-looking output may exist after a kill"

    rerun = subprocess.run(run_command(toy_world, killed_out), env=tracked, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming {journal}: {recorded_at_kill} samples recorded" in rerun.stderr, rerun.stderr[-2000:]
    resumed = read_jsonl(killed_out)
    assert [r["row"] for r in resumed] == list(range(ROWS))
    assert journal_lines(journal) == ROWS, "every sample journaled exactly once"
    contents = Journal(journal).load()
    assert contents.finished is not None and not (journal.parent / "set-aside").exists()
    # one W&B run continued, not a second partial one: every attempt's folder carries the journal's run id
    folders = sorted((journal.parent / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and folders == run_folders(journal.parent, contents.header["run_id"])
    assert [path for path in journal.parent.rglob("*") if path.name.endswith(".tmp")] == []

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


# ---------------------------------------------------------------------------------------------
# which journal a job resumes (in-process: no model needed)

FINGERPRINT = Fingerprint(
    model_id="ficoco/toy-llava", model_revision="r1", model_resolved_revision="r1", benchmark_id="ficoco/toy-shapes",
    benchmark_checksum="c" * 64, benchmark_rows=64, benchmark_subset=None, benchmark_module="toy-shapes",
    benchmark_options={}, method="ficoco-v", budget="36", params={"start": 2, "lam": 0.35}, template="USER: {prompt}",
    dtype="float32", image_preprocessing="none", batch_size=4, device="cpu", shard=0, shards=1, limit=None,
    text_tower=None, ficoco="0.1.0", torch="2.13.0", transformers="5.24.0")
JOB = {"model": "toy-llava", "method": "ficoco-v", "phase": "vision", "budget": "36", "benchmark": "toy-shapes",
       "shard": 0, "shards": 1}


def started_journal(tmp_path, fingerprint=FINGERPRINT, records=3, finished=False):
    journal = Journal(tmp_path / "shard0of1" / "journal.jsonl")
    header = evaluate._open_journal(journal, fingerprint, JOB)
    journal.append({"id": str(i), "row": i} for i in range(records))
    if finished:
        journal.finish(records=records)
    return journal, header


def test_a_new_journal_starts_with_the_fingerprint(tmp_path, capsys):
    journal, header = started_journal(tmp_path, records=0)
    contents = journal.load()
    assert contents.header["fingerprint"] == FINGERPRINT.as_dict() == header["fingerprint"]
    assert contents.header["fingerprint_sha256"] == FINGERPRINT.digest() and len(header["run_id"]) == 20
    assert "new journal" in capsys.readouterr().err


def test_an_unfinished_journal_with_the_same_fingerprint_is_resumed(tmp_path, capsys):
    journal, header = started_journal(tmp_path)
    assert evaluate._open_journal(journal, FINGERPRINT, JOB) == Journal(journal.path).load().header == {
        **header, "journal": "header", "format": 1}
    assert sorted(journal.read()) == ["0", "1", "2"]
    assert "resuming" in capsys.readouterr().err and not (journal.path.parent / "set-aside").exists()


def test_another_fingerprint_sets_the_journal_aside_with_its_wandb_run(tmp_path, capsys):
    journal, header = started_journal(tmp_path)
    folder = journal.path.parent / "wandb" / f"offline-run-20260101_000000-{header['run_id']}"
    folder.mkdir(parents=True)
    other = dataclasses.replace(FINGERPRINT, params={"start": 4, "lam": 0.35}, batch_size=8)
    new_header = evaluate._open_journal(journal, other, JOB)
    assert new_header["run_id"] != header["run_id"] and journal.read() == {}
    [aside] = (journal.path.parent / "set-aside").iterdir()
    assert aside.name.endswith("-fingerprint-changed")
    assert sorted(Journal(aside / "journal.jsonl").read()) == ["0", "1", "2"]          # kept, not deleted
    assert (aside / "wandb" / folder.name).is_dir() and not folder.exists()
    assert "its fingerprint differs in batch_size, params" in capsys.readouterr().err


def test_a_finished_journal_is_never_resumed(tmp_path, capsys):
    journal, header = started_journal(tmp_path, finished=True)
    new_header = evaluate._open_journal(journal, FINGERPRINT, JOB)      # the same job, rerun (-R, --forcerun)
    assert journal.read() == {} and new_header["started"] > header["started"]
    [aside] = (journal.path.parent / "set-aside").iterdir()
    assert aside.name.endswith("-finished")
    err = capsys.readouterr().err
    assert "it is finished" in err and "fingerprint differs" not in err


def test_a_journal_without_fingerprint_is_set_aside(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append([{"id": "a", "row": 0}])                      # written before fingerprints existed
    evaluate._open_journal(journal, FINGERPRINT, JOB)
    [aside] = (tmp_path / "set-aside").iterdir()
    assert aside.name.endswith("-unfingerprinted") and journal.read() == {}


def test_a_torn_header_alone_is_replaced(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.path.write_text('{"journal": "header", "fingerpr')    # killed while writing the header
    evaluate._open_journal(journal, FINGERPRINT, JOB)
    assert journal.load().header["fingerprint_sha256"] == FINGERPRINT.digest()
    assert not (tmp_path / "set-aside").exists()


# ---------------------------------------------------------------------------------------------
# `ficoco run`: the phase from the method; an invariant violation is one line


def cli_args(*extra):
    return ["--model", "m", "--model-dir", "md", "--benchmark", "b", "--benchmark-dir", "bd", "--method", "ficoco-v",
            "--budget", "36", "--out", "o/predictions.jsonl", *extra]


def test_run_takes_the_phase_from_the_method(monkeypatch):
    seen = {}
    monkeypatch.setattr(evaluate, "evaluate_shard", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setenv("WANDB_SERVICE", "3-1-unix-/tmp/a-parent's-service")
    assert evaluate.main(cli_args()) == 0
    assert seen["job"]["phase"] == "vision"
    assert "WANDB_SERVICE" not in os.environ           # a job never shares the W&B service of its parent
    with pytest.raises(SystemExit):
        evaluate.main(cli_args("--phase", "llm"))


def test_an_invariant_violation_fails_the_job_with_one_line(monkeypatch, capsys):
    def broken(**kwargs):
        raise InvariantViolation("ficoco-v: sample 7: LLM layer 2 visual tokens: expected 36, found 144")

    monkeypatch.setattr(evaluate, "evaluate_shard", broken)
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    assert evaluate.main(cli_args()) == 1
    lines = capsys.readouterr().err.splitlines()
    job_lines = [line for line in lines if not line.startswith("ficoco doctor: ")]   # the environment comes first
    assert job_lines == ["ficoco run: invariant violated: ficoco-v: sample 7: LLM layer 2 visual tokens: "
                         "expected 36, found 144"]


@pytest.mark.parametrize("option, value, message", [
    ("--template", "USER: <image>\n{prompt}", "--template 'USER: <image>\\n{prompt}' is not JSON"),
    ("--template", '{"a": 1}', "must be a JSON string"),
    ("--overrides", "start=2", "--overrides 'start=2' is not JSON"),
    ("--options", "[1]", "--options '[1]' must be a JSON object"),
])
def test_json_options_that_are_not_json_are_refused_before_anything_runs(monkeypatch, capsys, option, value, message):
    monkeypatch.setattr(evaluate, "evaluate_shard", lambda **kwargs: pytest.fail("the job must not start"))
    with pytest.raises(SystemExit) as refused:
        evaluate.main(cli_args(option, value))
    assert refused.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("tokens, eos, expected", [
    ([5, 7, 2, 0, 0], 2, 3),                        # EOS then padding (pad 0): the EOS counts, the padding not
    ([5, 7, 2, 2, 2], 2, 3),                        # the pad id is the EOS id (LLaVA-1.5 without a pad token)
    ([5, 151643, 151643, 151643], [151645, 151643], 2),   # Qwen2-VL: its pad 151643 is one of its EOS ids
    ([5, 7, 9, 11], 2, 4),                          # no EOS: every step generated
    ([5, 0, 7, 2], 2, 4),                           # a generated token that happens to be the pad id (0) counts
    ([5, 7], None, 2),
])
def test_generated_tokens_end_at_the_first_eos_whatever_the_pad_id(tokens, eos, expected):
    """G (new tokens, EOS included) decides the decode cost (G - 1 steps). Counting the tokens that are not the
    pad id (the rule before 2026-12-05) misses the EOS where the pad id is an EOS id, and a generated token that
    happens to be the pad id."""
    import torch

    from ficoco.evaluate import generated_length

    assert generated_length(torch.tensor(tokens), eos) == expected

"""A real evaluate subprocess, SIGKILLed mid-run and rerun, ends exactly like an uninterrupted run; the
journal is resumed only by a job with the same fingerprint, and never once finished."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ficoco import evaluate
from ficoco.budget import InfeasibleBudget
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
    manifest = toy_world / "bench" / "manifest.json"
    resumed_metrics = score([killed_out], "toy-shapes", tmp_path / "m1.json", job, benchmark_manifest=manifest)
    clean_metrics = score([clean_out], "toy-shapes", tmp_path / "m2.json", job, benchmark_manifest=manifest)
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
    manifest = toy_world / "bench" / "manifest.json"
    merged = score(outs, "toy-shapes", tmp_path / "merged.json", job, benchmark_manifest=manifest)
    single = score([whole], "toy-shapes", tmp_path / "single.json", job, benchmark_manifest=manifest)
    assert merged["samples"] == single["samples"] == 24
    assert merged["metrics"] == single["metrics"]
    assert json.loads((tmp_path / "merged.json").read_text())["job"] == job


def toy_bench(tmp_path):
    """A 4-row toy benchmark: (its manifest, its rows)."""
    from ficoco.benchmarks.fetch import load_local
    from ficoco.toy.cli import build_benchmark

    build_benchmark(tmp_path / "bench", seed=3, rows=4)
    return tmp_path / "bench" / "manifest.json", load_local(tmp_path / "bench")[0]


def write_shard(path, dataset, predictions: dict[int, str]):
    """One shard of records predicting `predictions[row]`, each scored 0 (by older scoring code, say)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": str(dataset[row]["id"]), "row": row, "prediction": text,
                                        "answers": dataset[row]["answers"], "score": 0.0, "scoring": {"score": 0.0},
                                        "counts": None, "cost": None, "error": None}) + "\n"
                            for row, text in predictions.items()))
    return path


def test_the_score_job_scores_every_prediction_again_with_todays_code(tmp_path, capsys):
    """The records were scored 0 by older scoring code; the score job recomputes each score from the prediction
    and the benchmark row, and writes the records as scored now (what the report reads) before metrics.json."""
    from ficoco.benchmarks import toy

    manifest, dataset = toy_bench(tmp_path)
    predictions = {row: f"{dataset[row]['answers'][0]}." if row < 3 else "no such word" for row in range(4)}
    shard = write_shard(tmp_path / "run" / "shard0of1" / "predictions.jsonl", dataset, predictions)
    job = {"model": "toy-llava", "method": "vanilla", "phase": "none", "budget": "full", "benchmark": "toy-shapes"}
    summary = score([shard], "toy-shapes", tmp_path / "run" / "metrics.json", job, benchmark_manifest=manifest)
    expected = [toy.score_sample(predictions[row], dataset[row])["score"] for row in range(4)]
    assert expected == [1.0, 1.0, 1.0, 0.0] and summary["metrics"]["score"] == 75.0
    scored = read_jsonl(tmp_path / "run" / "scored.jsonl")
    assert [record["score"] for record in scored] == expected and summary["predictions"] == ["scored.jsonl"]
    assert summary["shards"] == ["shard0of1/predictions.jsonl"]
    assert "3 of 4 samples score differently from when they were predicted" in capsys.readouterr().err


def test_the_score_job_refuses_predictions_of_other_data(tmp_path):
    manifest, dataset = toy_bench(tmp_path)
    shard = write_shard(tmp_path / "run" / "shard0of1" / "predictions.jsonl", dataset, {0: "red"})
    shard.write_text(json.dumps({**json.loads(shard.read_text()), "id": "refetched-away"}) + "\n")
    with pytest.raises(ValueError, match="record 'refetched-away' was made on row 0, which holds sample"):
        score([shard], "toy-shapes", tmp_path / "run" / "metrics.json", {}, benchmark_manifest=manifest)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_judged_samples_must_come_from_todays_judge_code(tmp_path, monkeypatch):
    """A GPT judge runs only in evaluate jobs: the score job cannot judge again, so samples judged by other code
    are refused, naming the rerun; samples judged by today's code are aggregated as they are."""
    from ficoco import benchmarks
    from ficoco.evaluate import rescore

    bench = benchmarks.get("mmvet")
    today = benchmarks.scoring_code_digest("mmvet")
    records = [{"id": "a", "row": 0, "prediction": "x", "score": 0.5, "error": None,
                "scoring": {"score": 0.5, "scoring_code": today}},
               {"id": "b", "row": 1, "prediction": "", "score": None, "error": "bad row: missing_image",
                "scoring": {"score": None}}]
    assert rescore(bench, records, rows=[], current_code=today) == (records, 0)
    stale = [{**records[0], "scoring": {"score": 0.5, "scoring_code": "0" * 16}}, records[1]]
    with pytest.raises(ValueError, match=r"1 of 2 samples \(e.g. 'a'\) were judged by other scoring code .* rerun"):
        rescore(bench, stale, rows=[], current_code=today)
    unlabelled = [{**records[0], "scoring": {"score": 0.5}}]
    with pytest.raises(ValueError, match="judged by other scoring code"):
        rescore(bench, unlabelled, rows=[], current_code=today)


# ---------------------------------------------------------------------------------------------
# which journal a job resumes (in-process: no model needed)

FINGERPRINT = Fingerprint(
    model_id="ficoco/toy-llava", model_revision="r1", model_resolved_revision="r1", benchmark_id="ficoco/toy-shapes",
    benchmark_checksum="c" * 64, benchmark_rows=64, benchmark_subset=None, benchmark_module="toy-shapes",
    benchmark_options={}, method="ficoco-v", budget="36", params={"start": 2, "lam": 0.35}, template="USER: {prompt}",
    dtype="float32", image_preprocessing="none", batch_size=4, device="cpu", shard=0, shards=1, limit=None,
    text_tower=None, ficoco="0.1.0", torch="2.13.0", transformers="5.24.0", code="0123456789abcdef")
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


def test_a_journal_written_by_other_code_is_set_aside(tmp_path, capsys):
    """A job killed, then rerun after a code change (a method fixed), recomputes every row: the old code's records
    never mix into the new predictions."""
    journal, _ = started_journal(tmp_path)
    evaluate._open_journal(journal, dataclasses.replace(FINGERPRINT, code="fedcba9876543210"), JOB)
    assert journal.read() == {}
    [aside] = (journal.path.parent / "set-aside").iterdir()
    assert sorted(Journal(aside / "journal.jsonl").read()) == ["0", "1", "2"]
    assert "its fingerprint differs in code" in capsys.readouterr().err


def test_the_code_digest_covers_every_module_but_the_reports(tmp_path):
    import shutil

    from ficoco.fingerprint import package_code_digest

    package = tmp_path / "ficoco"
    shutil.copytree(Path(evaluate.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    assert package_code_digest(package) == package_code_digest()
    before = package_code_digest(package)
    (package / "report" / "page.py").write_text((package / "report" / "page.py").read_text() + "\n# a report edit\n")
    assert package_code_digest(package) == before                      # the report makes no prediction
    for module in ("methods/fastv.py", "paradigm/filter.py", "models/llava.py", "benchmarks/toy.py", "evaluate.py"):
        edited = package / module
        original = edited.read_text()
        edited.write_text(original + "\n# a fix\n")
        assert package_code_digest(package) != before, module
        edited.write_text(original)
    assert package_code_digest(package) == before


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


@pytest.mark.parametrize("error, line", [
    (InvariantViolation("ficoco-v: sample 7: LLM layer 2 visual tokens: expected 36, found 144"),
     "ficoco run: invariant violated: ficoco-v: sample 7: LLM layer 2 visual tokens: expected 36, found 144"),
    (InfeasibleBudget("fastv: budget B=5 is infeasible for a span of 64 tokens"),
     "ficoco run: fastv: budget B=5 is infeasible for a span of 64 tokens. An image this budget cannot reach is not "
     "left out (the score would be of the images it can reach, larger ones): choose a budget every image of the "
     "benchmark reaches"),
])
def test_numbers_that_cannot_be_fail_the_job_with_one_line(monkeypatch, capsys, error, line):
    """An invariant violation, and a budget an image of the benchmark cannot reach (its score would otherwise be of
    the other images): exit 1 and one line after the environment's."""
    def broken(**kwargs):
        raise error

    monkeypatch.setattr(evaluate, "evaluate_shard", broken)
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    assert evaluate.main(cli_args()) == 1
    lines = capsys.readouterr().err.splitlines()
    assert [text for text in lines if not text.startswith("ficoco doctor: ")] == [line]


@pytest.mark.parametrize("option, value, message", [
    ("--template", "USER: <image>\n{prompt}", "--template 'USER: <image>\\n{prompt}' is not JSON"),
    ("--template", '"USER: <image>\\n ASSISTANT:"', "a prompt template holds <image> once and {prompt}"),
    ("--template", '"USER: {prompt} ASSISTANT:"', "a prompt template holds <image> once and {prompt}"),
    ("--method", "vanilla", "--method vanilla takes --budget full (it reduces nothing); got 36"),
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

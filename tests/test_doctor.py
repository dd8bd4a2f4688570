"""`ficoco doctor`: one line per item, exit code 1 on an unfit environment."""
from __future__ import annotations

import re

import pytest
import transformers

import ficoco.models.handle as generic_handle
from ficoco import cli, doctor
from ficoco.models import selfcheck
from helpers_tiny import pretend_transformers_version

VARIABLE = "FICOCO_ALLOW_UNTESTED_TRANSFORMERS"


@pytest.fixture(autouse=True)
def environment(monkeypatch, tmp_path):
    """HF caches under tmp_path, no override, and a W&B key that must never be printed."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", VARIABLE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "secret-wandb-key-0123456789")
    selfcheck.selfcheck_once.cache_clear()
    yield
    selfcheck.selfcheck_once.cache_clear()


def _run(capsys, argv=()) -> tuple[int, str]:
    code = cli.main(["doctor", *argv])
    out = capsys.readouterr().out
    assert "secret-wandb-key" not in out
    return code, out


def test_doctor_passes_here_and_prints_every_item(capsys, tmp_path):
    code, out = _run(capsys)
    lines = out.splitlines()
    assert code == 0
    assert lines[0].startswith("python: 3.")
    assert lines[1].startswith("torch: 2.")
    assert lines[2] == "cuda: not available (cpu only)" or lines[2].startswith("cuda: available, ")
    assert re.fullmatch(r"cpu: \d+ logical, torch threads \d+, kernels [A-Z0-9_]+", lines[3]), lines[3]
    assert f"transformers: {transformers.__version__} (tested; tested: 5.23.0, 5.24.0; {VARIABLE}=unset)" in lines
    assert any(line.startswith("adapter self-check (LLaVA): passed (ficoco-vl on a tiny random LLaVA") for line in lines)
    for family in ("Qwen2-VL", "Qwen2.5-VL"):
        assert any(line.startswith(f"adapter self-check ({family}): passed (ficoco-l on a tiny random {family}")
                   for line in lines)
    for name in selfcheck.CHECK_NAMES:
        assert f"  {name}: passed" in lines
    assert "wandb mode: offline (WANDB_MODE)" in lines
    hf = tmp_path / "hf"
    assert f"HF_HOME: {hf} (writable)" in lines
    assert f"HF_HUB_CACHE: {hf / 'hub'} (writable)" in lines
    assert f"HF_DATASETS_CACHE: {hf / 'datasets'} (writable)" in lines
    assert lines[-1] == "status: ok"
    assert sorted(path.name for path in (hf / "hub").iterdir()) == []      # the probe file was deleted


def test_a_cache_that_cannot_be_created_is_not_writable(capsys, monkeypatch, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, so nothing can be created below it (even by root)")
    monkeypatch.setenv("HF_HOME", str(blocker / "sub"))
    code, out = _run(capsys, ["--no-selfcheck"])
    assert code == 1
    assert f"HF_HOME: {blocker / 'sub'} (NOT WRITABLE (" in out
    assert f"HF_HUB_CACHE: {blocker / 'sub' / 'hub'} (NOT WRITABLE (" in out
    assert "status: 3 problem(s)" in out
    assert "adapter self-check: not run" in out


def test_a_separate_datasets_cache_is_checked_on_its_own(capsys, monkeypatch, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(blocker / "datasets"))
    code, out = _run(capsys, ["--no-selfcheck"])
    assert code == 1
    assert f"HF_HOME: {tmp_path / 'hf'} (writable)" in out
    assert f"HF_DATASETS_CACHE: {blocker / 'datasets'} (NOT WRITABLE (" in out
    assert "status: 1 problem(s)" in out


def test_untested_transformers_without_override_exits_1_and_says_so(capsys, monkeypatch):
    pretend_transformers_version(monkeypatch, "9.9.9")
    code, out = _run(capsys, ["--no-selfcheck"])
    assert code == 1
    assert f"transformers: 9.9.9 (NOT TESTED; tested: 5.23.0, 5.24.0; {VARIABLE}=unset)" in out
    assert "problem: transformers 9.9.9 is not a version" in out and f"{VARIABLE}=1" in out


def test_untested_transformers_with_override_rests_on_the_selfcheck(capsys, monkeypatch):
    pretend_transformers_version(monkeypatch, "9.9.9")
    monkeypatch.setenv(VARIABLE, "1")
    code, out = _run(capsys)
    assert code == 0
    assert f"(NOT TESTED; tested: 5.23.0, 5.24.0; {VARIABLE}=1)" in out and "adapter self-check (LLaVA): passed" in out

    selfcheck.selfcheck_once.cache_clear()
    monkeypatch.setattr(generic_handle, "cache_of", lambda kwargs: None)   # the 5.24 keyword bug
    code, out = _run(capsys)
    assert code == 1
    assert "adapter self-check (LLaVA): FAILED" in out and "adapter self-check (Qwen2-VL): FAILED" in out
    assert "  decode_keeps_counts: FAILED (expected" in out
    assert "problem: the LLaVA adapter self-check failed: decode_keeps_counts" in out
    assert "problem: the Qwen2.5-VL adapter self-check failed: decode_keeps_counts" in out


def test_log_environment_emits_the_lines_and_returns_the_report():
    lines = []
    report = doctor.log_environment(lines.append, selfcheck=False)
    assert isinstance(report, doctor.DoctorReport)
    assert lines == report.lines() and report.ok
    assert report.transformers.installed == transformers.__version__ and report.transformers.tested
    assert report.wandb_mode == "offline"
    assert [cache.name for cache in report.caches] == ["HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE"]


def test_doctor_is_a_registered_command():
    assert cli.COMMANDS["doctor"][0] == "ficoco.doctor:main"

"""The transformers guard in ficoco.apply and the adapter self-check it runs on an untested version."""
from __future__ import annotations

import logging
import sys

import pytest
import torch
from helpers_tiny import images, n_placeholders, prompt, tiny_llava

import ficoco
import ficoco.models.handle as generic_handle
from ficoco.models import guard, selfcheck
from helpers_tiny import pretend_transformers_version

VARIABLE = "FICOCO_ALLOW_UNTESTED_TRANSFORMERS"


@pytest.fixture(autouse=True)
def fresh_selfcheck_cache(monkeypatch):
    """Each test decides the version and override itself, and sees no cached self-check."""
    monkeypatch.delenv(VARIABLE, raising=False)
    selfcheck.selfcheck_once.cache_clear()
    yield
    selfcheck.selfcheck_once.cache_clear()


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def _apply(model):
    return ficoco.apply(model, "ficoco-vl", 6, v_start=1, l_start=1, l_window=2)


def _one_line_error(call) -> str:
    with pytest.raises(RuntimeError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    return message


def test_tested_versions_are_fixed():
    # (whether the installed version is among them: test_doctor; tools/check-latest.sh runs this file
    # on newer, untested versions)
    assert guard.TESTED_TRANSFORMERS == ("5.23.0", "5.24.0")
    assert isinstance(guard.TESTED_TRANSFORMERS, tuple)


def test_selfcheck_passes_on_the_installed_version():
    rng, threads = torch.random.get_rng_state(), torch.get_num_threads()
    result = selfcheck.run_selfcheck()
    assert [check.name for check in result.checks] == list(selfcheck.CHECK_NAMES)
    assert all(check.passed for check in result.checks), [check.line() for check in result.checks]
    assert result.passed and result.first_failure is None
    assert result.transformers_version == sys.modules["transformers"].__version__ and result.method == "ficoco-vl"
    assert result.seconds < 10
    assert torch.equal(torch.random.get_rng_state(), rng)         # the seeded build leaves the caller's RNG
    assert torch.get_num_threads() == threads


def test_selfcheck_detects_decode_steps_taken_for_prefills(monkeypatch):
    """The 5.24 bug: no cache found in the forward call, so every decode step recorded its counts."""
    monkeypatch.setattr(generic_handle, "cache_of", lambda kwargs: None)
    result = selfcheck.run_selfcheck()
    assert not result.passed
    failure = result.first_failure
    assert failure.name == "decode_keeps_counts"
    assert "'llm': [1, 1, 1, 1]" in failure.found and "'llm': [18, 13, 8, 8]" in failure.expected


def test_untested_version_is_refused_in_one_line_naming_versions_and_variable(monkeypatch, model):
    pretend_transformers_version(monkeypatch, "9.9.9")
    message = _one_line_error(lambda: _apply(model))
    assert "transformers 9.9.9" in message
    assert "5.23.0, 5.24.0" in message
    assert f"{VARIABLE}=1" in message
    assert not hasattr(model, "_ficoco_handle")                     # nothing was installed
    assert selfcheck.selfcheck_once.cache_info().currsize == 0       # refused before any self-check


def test_override_warns_runs_the_selfcheck_once_and_applies(monkeypatch, caplog, model):
    pretend_transformers_version(monkeypatch, "9.9.9")
    monkeypatch.setenv(VARIABLE, "1")
    runs = []
    real = selfcheck.run_selfcheck
    monkeypatch.setattr(selfcheck, "run_selfcheck", lambda family: runs.append(family) or real(family))
    ids = torch.tensor([prompt(n_placeholders(model), [10, 11], [12, 13, 14])])
    with caplog.at_level(logging.WARNING, logger="ficoco.models.guard"):
        with _apply(model) as handle, torch.no_grad():
            model(input_ids=ids, pixel_values=images(1, 28))
            counts = handle.last_counts()
        _apply(model).remove()                                        # a second apply: the cached result
    assert counts[0]["visual_delivered"] == handle.plan.delivered == 12
    assert runs == ["llava"]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("9.9.9" in text and "not a tested version" in text and VARIABLE in text for text in warnings)
    assert any("passed the adapter self-check" in text for text in warnings)


def test_override_with_a_broken_adapter_refuses_naming_the_failed_check(monkeypatch, model):
    pretend_transformers_version(monkeypatch, "9.9.9")
    monkeypatch.setenv(VARIABLE, "1")
    monkeypatch.setattr(generic_handle, "cache_of", lambda kwargs: None)
    message = _one_line_error(lambda: _apply(model))
    assert "transformers 9.9.9" in message and "self-check" in message
    assert "decode_keeps_counts: FAILED (expected [{" in message and "; found [{" in message
    assert not hasattr(model, "_ficoco_handle")


def test_tested_version_needs_no_selfcheck(monkeypatch, model):
    pretend_transformers_version(monkeypatch, "5.23.0")
    monkeypatch.setattr(selfcheck, "run_selfcheck", lambda *family: pytest.fail("self-check run on a tested version"))
    with _apply(model) as handle:
        assert handle.plan.delivered == 12


def test_a_bad_override_value_is_refused_naming_it_and_the_valid_ones(monkeypatch, model):
    pretend_transformers_version(monkeypatch, "9.9.9")
    monkeypatch.setenv(VARIABLE, "yes")
    message = _one_line_error(lambda: _apply(model))
    assert f"{VARIABLE}='yes'" in message and "valid values: 1" in message


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_the_qwen_selfcheck_passes_here_and_detects_decode_steps_taken_for_prefills(monkeypatch, family):
    result = selfcheck.run_selfcheck(family)
    assert [check.name for check in result.checks] == list(selfcheck.CHECK_NAMES)
    assert result.passed, [check.line() for check in result.checks]
    assert result.family == family and result.method == "ficoco-l"
    monkeypatch.setattr(generic_handle, "cache_of", lambda kwargs: None)
    broken = selfcheck.run_selfcheck(family)
    assert not broken.passed and broken.first_failure.name == "decode_keeps_counts"


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_an_untested_version_runs_the_self_check_of_the_models_own_class(monkeypatch, model_type):
    from helpers_tiny import qwen_inputs, tiny_qwen

    pretend_transformers_version(monkeypatch, "9.9.9")
    monkeypatch.setenv(VARIABLE, "1")
    runs = []
    real = selfcheck.run_selfcheck
    monkeypatch.setattr(selfcheck, "run_selfcheck", lambda family: runs.append(family) or real(family))
    qwen, dims = tiny_qwen(model_type, llm_layers=2)
    with ficoco.apply(qwen, "fastv", 700, layer=1) as handle, torch.no_grad():
        qwen(**qwen_inputs(dims, [(112, 224)]))
        assert handle.last_counts()[0]["visual_delivered"] == 32
    assert runs == [model_type]
    monkeypatch.setattr(generic_handle, "cache_of", lambda kwargs: None)
    selfcheck.selfcheck_once.cache_clear()
    message = _one_line_error(lambda: ficoco.apply(qwen, "fastv", 700, layer=1))
    assert "transformers 9.9.9" in message and "decode_keeps_counts: FAILED" in message


def test_an_unknown_selfcheck_family_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match="self-check family 'gemma'; valid: llava, qwen2_vl, qwen2_5_vl"):
        selfcheck.run_selfcheck("gemma")

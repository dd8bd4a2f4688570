"""W&B mode: the environment decides, offline without a key, never a hard-coded mode."""
import pytest

from ficoco import tracking


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path


def test_offline_without_a_key(clean_env):
    assert tracking.effective_mode() == "offline"


def test_online_with_a_key_in_the_environment(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.effective_mode() == "online"


def test_online_with_a_wandb_login_entry(clean_env):
    (clean_env / "netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    assert tracking.effective_mode() == "online"


def test_an_explicit_mode_wins(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.effective_mode() == "disabled"
    assert tracking.init_run("eval", "n", "g", {}, clean_env / "run") is None
    assert not (clean_env / "run").exists()


def test_offline_run_lands_in_the_run_directory(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tracking.init_run("eval", "vanilla-bfull-toy", "toy/toy", {"method": "vanilla", "budget": "full"},
                            clean_env / "job")
    tracking.log_summary(run, {"metrics": {"score": 0.5, "note": "text"}, "samples": 3})
    assert run.summary["metrics/score"] == 0.5 and run.summary["samples"] == 3
    tracking.finish(run)
    offline = list((clean_env / "job" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))

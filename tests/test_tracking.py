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


def test_a_fixed_run_id_continues_the_same_run(clean_env, monkeypatch):
    """A resumed journal resumes its W&B run: offline, each attempt is a folder of the same run id."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    for samples in (4, 8):
        run = tracking.init_run("eval", "n", "g", {"budget": 36}, clean_env / "job", tags=["ficoco-v", ""],
                                run_id="abc123def456")
        assert run.id == "abc123def456"
        run.log({"progress/samples": samples}, step=samples)
        tracking.finish(run)
    folders = tracking.run_folders(clean_env / "job", "abc123def456")
    assert len(folders) == 2 and all("-abc123def456" in folder.name for folder in folders)   # "-<id>-1": same second
    moved = tracking.move_run_folders(clean_env / "job", "abc123def456", clean_env / "aside")
    assert [path.parent for path in moved] == [clean_env / "aside" / "wandb"] * 2
    assert tracking.run_folders(clean_env / "job", "abc123def456") == []


def test_an_eval_run_config_has_the_budget_as_a_number_and_the_resolved_parameters(clean_env, monkeypatch,
                                                                                      tmp_path):
    import json

    from ficoco import evaluate

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    job = {"model": "toy", "method": "ficoco-v", "phase": "vision", "budget": "36", "benchmark": "b",
           "shard": 0, "shards": 1}
    header = {"fingerprint": {"method": "ficoco-v"}, "fingerprint_sha256": "f" * 64, "started": "t",
              "run_id": "0123456789abcdef0123"}
    run = evaluate._start_tracking(job, tmp_path / "out" / "predictions.jsonl", 8, header=header,
                                   params={"start": 2, "lam": 0.35}, model_dir=tmp_path)
    try:
        assert run.id == header["run_id"]
        assert run.config["budget"] == 36 and run.config["budget_label"] == "36"
        assert run.config["params"]["start"] == 2 and run.config["fingerprint_sha256"] == "f" * 64
        assert list(run.tags) == ["ficoco-v", "vision", "b36", "b"]
    finally:
        tracking.finish(run)
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"image_size": 336, "patch_size": 14},
                                                      "vision_feature_select_strategy": "default"}))
    assert evaluate.budget_number("full", tmp_path) == 576
    assert evaluate.budget_number("adaptive", tmp_path) is None

"""Bad config fails before any job starts, with one line naming the key, the value and the valid choices."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ficoco.config import (ConfigError, FULL, grid_names, job_grid, load_and_validate, load_registries, method_overrides,
                           model_dims, validate)
from ficoco.dims import ModelDims
from helpers_tiny import tiny_llava_next


def paper_like(**changes):
    config = {"models": ["llava-1.5-7b"], "methods": ["vanilla", "ficoco-v"], "budgets": [192, 64],
              "benchmarks": ["gqa"]}
    config.update(changes)
    return config


def error_of(config) -> str:
    with pytest.raises(ConfigError) as raised:
        validate(config)
    message = str(raised.value)
    assert "\n" not in message, "the message must be one line"
    return message


def test_a_valid_config_gets_defaults_and_a_grid():
    config = validate(paper_like())
    assert config["batch_size"] == 1 and config["shards"] == 1 and config["wandb"]["project"] == "ficoco"
    jobs = job_grid(config)
    assert [(j.method, j.budget) for j in jobs] == [("vanilla", FULL), ("ficoco-v", "192"), ("ficoco-v", "64")]
    assert {j.phase for j in jobs if j.method == "ficoco-v"} == {"vision"}


def test_unknown_method():
    message = error_of(paper_like(methods=["vanilla", "ficocoo-v"]))
    assert "methods[1]" in message and "'ficocoo-v'" in message and "ficoco-v" in message.split("valid:")[1]


def test_unknown_benchmark():
    message = error_of(paper_like(benchmarks=["gqa", "imagenet"]))
    assert "benchmarks[1]" in message and "'imagenet'" in message and "gqa" in message.split("valid:")[1]


def test_unknown_model():
    message = error_of(paper_like(models=["llava-1.6-7b"]))
    assert "models[0]" in message and "'llava-1.6-7b'" in message and "llava-1.5-13b" in message


@pytest.mark.parametrize("budget", [12.5, -3, 0, "64"])
def test_non_integer_or_non_positive_budget(budget):
    message = error_of(paper_like(budgets=[192, budget]))
    assert message.startswith("config error: budgets[1]:")
    assert "positive integer" in message and "reduction" in message


def test_budget_above_the_visual_token_count():
    message = error_of(paper_like(budgets=[600]))
    assert "budgets[0]" in message and "600" in message and "576" in message and "1..576" in message


def test_missing_key():
    config = paper_like()
    del config["benchmarks"]
    message = error_of(config)
    assert message.startswith("config error: benchmarks: missing required key")


def test_wrong_type():
    message = error_of(paper_like(batch_size="8"))
    assert "batch_size" in message and "'8'" in message and "integer" in message


def test_unknown_key():
    message = error_of(paper_like(budget=[64]))
    assert "budget" in message and "unknown key" in message and "budgets" in message.split("valid keys:")[1]


def test_infeasible_budget_names_the_reachable_alternatives():
    message = error_of(paper_like(methods=["ficoco-l"], budgets=[64]))
    assert "budgets[0]" in message and "ficoco-l" in message and "64" in message
    assert "72" in message          # layers 0..3 alone average 72 tokens (methods.md §2.1)


def test_an_explicit_earlier_start_makes_it_feasible():
    config = validate(paper_like(methods=["ficoco-l"], budgets=[64],
                                 method_params={"ficoco-l": {"per_budget": {64: {"start": 2, "window": 2}}}}))
    assert [j.budget for j in job_grid(config)] == ["64"]


def test_a_budget_as_reduction_ratio():
    config = validate(paper_like(budgets=[{"reduction": 2 / 3}, 128]))
    assert [j.budget for j in job_grid(config) if j.method == "ficoco-v"] == ["192", "128"]


def test_snakemake_stops_with_the_one_line_before_any_job(tmp_path, repo_copy):
    (repo_copy / "bad.yaml").write_text("models: [toy-llava]\nmethods: [vanilla, fastv2]\nbudgets: [36]\n"
                                        "benchmarks: [toy-shapes]\n")
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", "bad.yaml"],
                            cwd=repo_copy, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1 and "methods[1]" in lines[0] and "'fastv2'" in lines[0]


def test_a_budget_as_the_papers_tflops_label_maps_to_the_stated_tokens():
    config = validate(paper_like(budgets=[{"paper": 3.3}, {"paper": 2.4}, {"paper": 1.5}]))
    assert [j.budget for j in job_grid(config) if j.method == "ficoco-v" and j.model == "llava-1.5-7b"] == \
        ["192", "128", "64"]


@pytest.mark.parametrize("budget, expected", [
    ({"paper": 2.0}, ("budgets[0]", "{paper: 2} is not one of the paper's labels", "valid: {paper: 3.3} (192 tokens)")),
])
def test_an_unknown_paper_label_is_refused_naming_the_valid_ones(budget, expected):
    message = error_of(paper_like(budgets=[budget]))
    assert all(part in message for part in expected), message


def test_a_paper_label_for_a_model_without_stated_budgets_is_refused():
    message = error_of(paper_like(models=["llava-1.5-13b"], budgets=[{"paper": 3.3}]))
    assert "budgets[0]" in message and "only for LLaVA-1.5-7B" in message and "llava-1.5-13b" in message
    assert "valid: an integer budget or {reduction: r}" in message


# ---------------------------------------------------------------------------------------------
# a model copied from a local directory (source_dir), its shape read from that directory's config.json


def mirror_registry(tmp_path, config: dict) -> str:
    source = tmp_path / "mirror"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(config))
    entry = {"source": "hub", "id": "a/b", "revision": "r", "source_dir": str(source), "shape": "source-dir",
             "prompt_template": "USER: <image>\n{prompt} ASSISTANT:"}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"mirror": entry}))
    return str(tmp_path / "models.yaml")


def test_a_source_dir_shape_reads_the_copied_models_config(tmp_path):
    model, dims = tiny_llava_next()
    registry = mirror_registry(tmp_path, model.config.to_dict())
    config = validate(paper_like(models=["mirror"], methods=["vanilla"], budgets=[40], benchmarks=["toy-shapes-mini"],
                                 registries={"models": registry}))
    assert [(job.model, job.method, job.budget) for job in job_grid(config)] == [("mirror", "vanilla", FULL)]
    assert model_dims("mirror", yaml.safe_load(Path(registry).read_text())["mirror"]) == dims == ModelDims.from_config(model.config)
    message = error_of(paper_like(models=["mirror"], methods=["vanilla"], budgets=[81], benchmarks=["toy-shapes-mini"],
                                  registries={"models": registry}))
    assert "81 is above the 80 visual tokens of model mirror" in message      # nominal: 5 passes x 16 patches


def test_a_source_dir_of_another_model_family_is_refused(tmp_path):
    registry = mirror_registry(tmp_path, {"model_type": "mllama"})
    message = error_of(paper_like(models=["mirror"], methods=["vanilla"], benchmarks=["toy-shapes-mini"],
                                  registries={"models": registry}))
    assert "mirror.shape" in message and "model_type 'mllama'" in message and "valid: a source_dir" in message


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_a_qwen_source_dir_is_planned_on_its_nominal_image_and_refuses_what_cannot_run(tmp_path, model_type):
    from helpers_tiny import tiny_qwen

    model, dims = tiny_qwen(model_type, patch_size=8, llm_layers=3)
    registry = mirror_registry(tmp_path, model.config.to_dict())
    config = validate(paper_like(models=["mirror"], methods=["vanilla", "fastv"], budgets=[1960],
                                 benchmarks=["toy-shapes-mini"], registries={"models": registry},
                                 method_params={"fastv": {"layer": 1}}))
    assert [(job.method, job.budget) for job in job_grid(config)] == [("vanilla", FULL), ("fastv", "1960")]
    assert model_dims("mirror", yaml.safe_load(Path(registry).read_text())["mirror"]) == dims
    over = error_of(paper_like(models=["mirror"], methods=["vanilla"], budgets=[3921], benchmarks=["toy-shapes-mini"],
                               registries={"models": registry}))
    assert "3921 is above the 3920 visual tokens of model mirror" in over    # 896 x 1120 px in 8 px patches, 2 x 2
    for method, reason in (("ficoco-v", "it needs a CLS token first in the vision tower"),
                           ("divprune", f"only reductions inside the LLM, or inside the tower's blocks alone, run on "
                                        f"{model_type} so far")):
        message = error_of(paper_like(models=["mirror"], methods=["vanilla", method], budgets=[1960],
                                      benchmarks=["toy-shapes-mini"], registries={"models": registry}))
        assert f"{method} cannot run on model mirror: {reason}" in message and "fastv" in message, message
    # DivPrune with its official positions acts at the input of LLM layer 0, which the Qwen adapter places
    validate(paper_like(models=["mirror"], methods=["divprune"], budgets=[1960], benchmarks=["toy-shapes-mini"],
                        registries={"models": registry}, method_params={"divprune": {"positions": "original"}}))
    solved = error_of(paper_like(models=["mirror"], methods=["fastv"], budgets=[{"tflops": 1.0}],
                                 benchmarks=["toy-shapes-mini"], registries={"models": registry}))
    assert "costs differently per image size" in solved
    # a count for every image: its own label; checked on the nominal image, where it reduces most
    counted = validate(paper_like(models=["mirror"], methods=["fastv"], budgets=[{"image_tokens": 2000}, 1960],
                                  benchmarks=["toy-shapes-mini"], registries={"models": registry},
                                  method_params={"fastv": {"layer": 1}}))
    assert [job.budget for job in job_grid(counted)] == ["n2000", "1960"]      # in the order configured
    above = error_of(paper_like(models=["mirror"], methods=["fastv"], budgets=[{"image_tokens": 3921}],
                                benchmarks=["toy-shapes-mini"], registries={"models": registry}))
    assert "{image_tokens: 3921} is above the 3920 visual tokens of the largest image of model mirror" in above
    unreachable = error_of(paper_like(models=["mirror"], methods=["fastv"], budgets=[{"image_tokens": 1000}],
                                      benchmarks=["toy-shapes-mini"], registries={"models": registry},
                                      method_params={"fastv": {"layer": 1}}))
    assert "1000 for method fastv on model mirror" in unreachable and "infeasible" in unreachable


def test_a_count_for_every_image_is_refused_where_images_are_one_size():
    message = error_of(paper_like(budgets=[{"image_tokens": 64}]))
    assert "budgets[0]" in message and "a token count for every image runs on Qwen2-VL-family models" in message
    assert "model llava-1.5-7b is not one; valid: an integer budget (of its nominal 576-token image)" in message


# ---------------------------------------------------------------------------------------------
# further grids (another model family with its own methods, budgets and benchmarks)


def with_next_grid(**grid_changes):
    grid = {"models": ["llava-next-7b"], "methods": ["vanilla", "ficoco-l"], "budgets": [320],
            "benchmarks": ["mmmu"], "method_params": {"ficoco-l": {"start": 1, "window": 1}}}
    grid.update(grid_changes)
    return paper_like(grids=[grid], method_params={"ficoco-v": {"lam": 0.5}})


def test_each_grid_runs_its_own_methods_budgets_benchmarks_and_parameters():
    config = validate(with_next_grid())
    jobs = job_grid(config)
    assert [(j.model, j.method, j.budget, j.benchmark) for j in jobs] == [
        ("llava-1.5-7b", "vanilla", FULL, "gqa"), ("llava-1.5-7b", "ficoco-v", "192", "gqa"),
        ("llava-1.5-7b", "ficoco-v", "64", "gqa"),
        ("llava-next-7b", "vanilla", FULL, "mmmu"), ("llava-next-7b", "ficoco-l", "320", "mmmu")]
    models = yaml.safe_load(Path("config/models.yaml").read_text())
    assert method_overrides(config, models, "llava-next-7b", "ficoco-l", "320") == {"start": 1, "window": 1}
    assert method_overrides(config, models, "llava-1.5-7b", "ficoco-v", "64")["lam"] == 0.5
    assert "lam" not in method_overrides(config, models, "llava-next-7b", "ficoco-v", "320")
    assert grid_names(config, "benchmarks") == ["gqa", "mmmu"]
    assert grid_names(config, "models") == ["llava-1.5-7b", "llava-next-7b"]


def test_a_grids_problem_names_its_place_in_the_grids_list():
    message = error_of(with_next_grid(methods=["vanilla", "ficoco-l", "fastv2"]))
    assert message.startswith("config error: grids[0].methods[2]:") and "fastv2" in message
    message = error_of(with_next_grid(budgets=[3000]))
    assert message.startswith("config error: grids[0].budgets[0]:") and "2880" in message
    message = error_of(with_next_grid(budgets=["x"]))
    assert message.startswith("config error: grids[0].budgets[0]:") and "reduction" in message   # schema via $ref
    message = error_of(with_next_grid(method_params={"ficoco-v": {"lam": 0.5}}))
    assert message.startswith("config error: grids[0].method_params.ficoco-v:") and "not in methods" in message
    message = error_of(with_next_grid(shards=2))
    assert message.startswith("config error: grids[0].shards:") and "unknown key" in message
    message = error_of(with_next_grid(models=["llava-next-7b", "llava-1.5-7b"]))
    assert message.startswith("config error: grids[0].models[1]:") and "also in the grid at models[0]" in message


def test_shared_keys_name_benchmarks_and_methods_of_any_grid():
    config = validate({**with_next_grid(benchmarks=["mmmu", "textvqa"]), "shards": {"mmmu": 2},
                       "measure": {"methods": ["ficoco-l"]}, "benchmark_options": {"textvqa": {"ocr": True}}})
    assert [j.shards for j in job_grid(config) if j.benchmark == "mmmu"] == [2] * 4
    message = error_of({**with_next_grid(), "measure": {"methods": ["pdrop"]}})
    assert "measure.methods[0]" in message and "ficoco-l" in message.split("valid:")[1]


def test_the_paper_grids_counts_for_every_image_have_a_planned_schedule():
    """`ficoco grid --json` plans each job; a Qwen2-VL job's {image_tokens: n} label plans the nominal image at n
    tokens (as the config check does), its LLM layers averaging at most n."""
    from ficoco.config import planned_schedule

    config = load_and_validate("config/paper.yaml")
    models = load_registries(config)[0]
    jobs = [job for job in job_grid(config) if job.budget.startswith("n")]
    assert {job.model for job in jobs} == {"qwen2-vl-7b", "qwen2.5-vl-7b"}
    for job in jobs:
        planned = planned_schedule(config, models, job)
        tokens = int(job.budget[1:])
        assert planned["layer_average"] <= tokens and planned["visual_tokens"] == 1280, (job, planned)

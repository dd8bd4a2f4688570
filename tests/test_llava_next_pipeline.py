"""A tiny random LLaVA-NeXT through the real pipeline (issue 18): fetched by Snakemake from a local source
directory, evaluated unreduced, with FiCoCo-V (in the tower, on each crop) and with FastV (in the LLM) on
toy scenes, scored, measured, aggregated and reported; every sample's counts and costs are those of its
image's AnyRes layout and budget, computed here independently of the adapter. FitPrune is fitted by the
calibrate rule on prompts of several spans and run with its schedule scaled to each image's span."""
from __future__ import annotations

import json

import pytest
import yaml

from ficoco import flops
from ficoco.budget import span_budget
from ficoco.dims import ModelDims
from helpers_tiny import save_tiny_llava_next
from pipeline import copy_workflow, read_jsonl, snakemake

TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


def tiny_next_entry(source_dir) -> dict:
    return {"source": "hub", "id": "tests/tiny-llava-next", "revision": "tiny-v1", "source_dir": str(source_dir),
            "shape": "source-dir", "dtype": "float32", "image_preprocessing": "none", "prompt_template": TEMPLATE,
            "text_tokens": 11, "method_params": {"fastv": {"layer": 1}, "ficoco-v": {"start": 1}}}   # 3 layers each


def write_next_config(repo, source_dir, name="next", methods=("vanilla", "ficoco-v", "fastv")) -> str:
    models = yaml.safe_load((repo / "config/models.yaml").read_text())
    models["tiny-next"] = tiny_next_entry(source_dir)
    (repo / "config/test_models.yaml").write_text(yaml.safe_dump(models))
    config = {"models": ["tiny-next"], "methods": list(methods), "budgets": [40], "benchmarks": ["toy-shapes-mini"],
              "limit": 4, "batch_size": 2, "device": "cpu", "registries": {"models": "config/test_models.yaml"},
              "measure": {"enabled": True, "methods": list(methods), "warmup": 0, "repeats": 1, "new_tokens": 2,
                          "prompt_tokens": 8},
              "wandb": {"project": "ficoco-test"}}
    (repo / f"config/{name}.yaml").write_text(yaml.safe_dump(config))
    return f"config/{name}.yaml"


@pytest.fixture(scope="module")
def next_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("next")
    source = save_tiny_llava_next(root / "hub-copy")
    repo = copy_workflow(root / "repo")
    config = write_next_config(repo, source)
    result = snakemake(repo, "--cores", "2", "--configfile", config)
    assert result.returncode == 0, result.stderr[-4000:]
    return repo, source


def test_a_tiny_llava_next_runs_end_to_end_through_snakemake(next_run):
    repo, source = next_run
    manifest = json.loads((repo / "resources/models/tiny-next/manifest.json").read_text())
    assert manifest["source_dir"] == source and manifest["resolved_revision"] == "tiny-v1"
    config = json.loads((repo / "resources/models/tiny-next/config.json").read_text())
    assert config["model_type"] == "llava_next"
    dims = ModelDims.from_config(config)

    run_dir = repo / "results/runs/tiny-next/toy-shapes-mini/vanilla/bfull"
    records = read_jsonl(next(run_dir.glob("shard*/predictions.jsonl")))
    assert len(records) == 4 and all(record["error"] is None for record in records)
    for record in records:                         # toy scenes are 96 x 96: a 2x2 canvas, 5 tower passes
        counts = record["counts"]
        text = counts["llm"][0] - counts["visual_delivered"]
        expected = flops.vanilla_counts(dims, text, image_size=(96, 96))
        assert {key: counts[key] for key in expected} == expected
        assert counts["vision_crops"] == 5 and counts["visual_delivered"] == 16 + 8 * 8 + 8
        assert record["cost"] == pytest.approx(flops.sample_cost(dims, expected, record["generated_tokens"]))

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["samples"] == 4 and metrics["visual_tokens"]["delivered"] == 88

    # FastV at 40 of the nominal 80: 44 of each 88-token span on average over 3 layers, pruned after layer 1:
    # 88 + 2k = 3 x 44 -> k = 22
    fastv_dir = repo / "results/runs/tiny-next/toy-shapes-mini/fastv/b40"
    for record in read_jsonl(next(fastv_dir.glob("shard*/predictions.jsonl"))):
        counts = record["counts"]
        assert record["error"] is None and counts["llm_visual"] == [88, 22, 22] and counts["vision_crops"] == 5
        assert counts["overhead_macs"] > 0 and counts["llm"][0] - counts["llm"][1] == 88 - 22
    fastv = json.loads((fastv_dir / "metrics.json").read_text())
    assert fastv["visual_tokens"]["layer_average"] == 44
    assert fastv["cost_mean"]["prefill_flops"] < metrics["cost_mean"]["prefill_flops"]

    # FiCoCo-V at 40 of the nominal 80: 8 of each pass's 16 patches, 5 passes -> 40 tokens, no image-newline
    ficoco_v_dir = repo / "results/runs/tiny-next/toy-shapes-mini/ficoco-v/b40"
    for record in read_jsonl(next(ficoco_v_dir.glob("shard*/predictions.jsonl"))):
        counts = record["counts"]
        assert record["error"] is None and counts["visual_delivered"] == 40 and counts["llm_visual"] == [40] * 3
        assert counts["vision_crops"] == 5 and counts["vision"][-1] == [17, 9] and len(counts["vision"]) == 5 * 2
    ficoco_v = json.loads((ficoco_v_dir / "metrics.json").read_text())
    assert ficoco_v["cost_mean"]["vision_flops"] < metrics["cost_mean"]["vision_flops"]
    measured = json.loads((repo / "results/measure/tiny-next/vanilla/bfull.json").read_text())
    assert measured["image_size"] == [64, 64] and measured["counts"]["vision_crops"] == 5
    assert measured["plan"]["vision_crops"] == 5 and measured["visual_tokens"] == 80    # nominal: 5 x 16
    # the measured 64 x 64 image has the toy scenes' layout: 5 passes, an 88-token span
    for method, llm_visual in (("ficoco-v", [40] * 3), ("fastv", [88, 22, 22])):
        measured = json.loads((repo / f"results/measure/tiny-next/{method}/b40.json").read_text())
        assert measured["counts"]["llm_visual"] == measured["plan"]["llm_visual"] == llm_visual
    html = (repo / "report/report.html").read_text()
    assert "tiny-next" in html


def test_nothing_is_left_to_do_after_the_run(next_run):
    repo, _ = next_run
    result = snakemake(repo, "-n", "--cores", "2", "--configfile", "config/next.yaml")
    assert result.returncode == 0 and "Nothing to be done" in result.stdout, result.stdout[-2000:]


def test_a_new_pin_in_the_registry_stops_the_run_before_any_job(next_run):
    """The fetched copy holds tiny-v1; a registry that pins tiny-v2 would report that copy's numbers under the new
    pin: the run stops before any job, naming the copy, both pins and what to do."""
    repo, source = next_run
    config = write_next_config(repo, source, "next-repinned")
    models = yaml.safe_load((repo / "config/test_models.yaml").read_text())
    models["tiny-next"]["revision"] = "tiny-v2"
    (repo / "config/repinned_models.yaml").write_text(yaml.safe_dump(models))
    settings = yaml.safe_load((repo / config).read_text())
    settings["registries"] = {"models": "config/repinned_models.yaml"}
    (repo / config).write_text(yaml.safe_dump(settings))
    result = snakemake(repo, "-n", "--cores", "1", "--configfile", config)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("config error: tiny-next: resources/models/tiny-next was fetched at another pin")
    assert "revision 'tiny-v1' there, 'tiny-v2' in the registry" in message and "rm -r resources/models/tiny-next" in message
    result = snakemake(repo, "-n", "--cores", "1", "--configfile", "config/next.yaml")      # the pin it was fetched at
    assert result.returncode == 0 and "Nothing to be done" in result.stdout


def test_fitprune_is_fitted_and_run_on_llava_next_through_snakemake(next_run):
    """The calibrate rule fits FitPrune's schedule on the copied model (calibration prompts of several spans),
    and the evaluate and measure jobs run each image with it scaled to its span, within its budget share."""
    repo, source = next_run
    config_path = write_next_config(repo, source, "next-fitprune", methods=("vanilla", "fitprune"))
    config = yaml.safe_load((repo / config_path).read_text())
    config["calibration"] = {"benchmark": "toy-shapes-train", "rows": 3}
    (repo / config_path).write_text(yaml.safe_dump(config))
    result = snakemake(repo, "--cores", "2", "--configfile", config_path)
    assert result.returncode == 0, result.stderr[-4000:]
    fit = json.loads((repo / "results/calibration/tiny-next/fitprune/b40.json").read_text())["fit"]
    assert fit["layer_average"] <= 40 and fit["deletions"][-1] == 0
    run_dir = repo / "results/runs/tiny-next/toy-shapes-mini/fitprune/b40"
    records = read_jsonl(next(run_dir.glob("shard*/predictions.jsonl")))
    assert len(records) == 4 and all(record["error"] is None for record in records)
    for record in records:
        visual = record["counts"]["llm_visual"]
        assert sum(visual) / len(visual) <= span_budget(40, visual[0], 80) and visual[-1] < visual[0]
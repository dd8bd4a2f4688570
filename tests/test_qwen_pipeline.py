"""Tiny random Qwen2-VL and Qwen2.5-VL models through the real pipeline (issue 19): fetched by Snakemake from
local source directories, evaluated unreduced, with FastV and FiCoCo-L (inside the LLM) and with FiCoCo-V (inside
the tower, its key-mean semantic term) on toy scenes
through the model's own image processor and tokenizer, scored, measured on the nominal image, aggregated and
reported, at a budget of the nominal image and at a token count for every image. Every sample's counts come
from its image's patch grid, computed here from the image size
(`QwenVLDims`' smart_resize, checked against transformers' in test_qwen_flops.py), and its cost is the exact
cost of that image (FlopCounterMode-checked in test_qwen_flops.py)."""
from __future__ import annotations

import json

import pytest
import yaml

from ficoco import flops
from ficoco.dims import dims_from_config
from helpers_tiny import save_tiny_qwen
from pipeline import copy_workflow, read_jsonl, snakemake

TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
MODELS = {"tiny-qwen2": "qwen2_vl", "tiny-qwen25": "qwen2_5_vl"}
METHODS = ("vanilla", "fastv", "ficoco-l", "ficoco-v")
BUDGET = 1960            # half of the tiny models' nominal 896 x 1120 px image: 3,920 tokens of 8 px patches, 2 x 2
PER_IMAGE = 2000         # {image_tokens: 2000}: 2,000 tokens for every image, all of its own for a smaller one


def tiny_qwen_entry(source_dir) -> dict:
    return {"source": "hub", "id": "tests/tiny-qwen", "revision": "tiny-v1", "source_dir": str(source_dir),
            "shape": "source-dir", "dtype": "float32", "image_preprocessing": "none", "prompt_template": TEMPLATE,
            "text_tokens": 11, "method_params": {"fastv": {"layer": 1}, "ficoco-l": {"start": 1, "window": 1},
                                                 "ficoco-v": {"semantic": "key-mean", "start": 0}}}


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    repo = copy_workflow(root / "repo")
    models = yaml.safe_load((repo / "config/models.yaml").read_text())
    sources = {}
    for name, model_type in MODELS.items():
        sources[name] = save_tiny_qwen(root / f"hub-{name}", model_type)
        models[name] = tiny_qwen_entry(sources[name])
    (repo / "config/test_models.yaml").write_text(yaml.safe_dump(models))
    config = {"models": list(MODELS), "methods": list(METHODS), "budgets": [BUDGET, {"image_tokens": PER_IMAGE}],
              "benchmarks": ["toy-shapes-mini"],
              "limit": 4, "batch_size": 2, "device": "cpu", "registries": {"models": "config/test_models.yaml"},
              "measure": {"enabled": True, "methods": list(METHODS), "warmup": 0, "repeats": 1, "new_tokens": 2,
                          "prompt_tokens": 8},
              "wandb": {"project": "ficoco-test"}}
    (repo / "config/qwen.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(repo, "--cores", "2", "--configfile", "config/qwen.yaml")
    assert result.returncode == 0, result.stderr[-4000:]
    return repo, sources


@pytest.mark.parametrize("model", list(MODELS))
def test_a_tiny_qwen_runs_end_to_end_through_snakemake(qwen_run, model):
    repo, sources = qwen_run
    manifest = json.loads((repo / f"resources/models/{model}/manifest.json").read_text())
    assert manifest["source_dir"] == sources[model] and manifest["resolved_revision"] == "tiny-v1"
    config = json.loads((repo / f"resources/models/{model}/config.json").read_text())
    assert config["model_type"] == MODELS[model]
    dims = dims_from_config(config)
    grid, span = dims.patch_grid(96, 96), dims.image_tokens(96, 96)      # toy scenes are 96 x 96 px
    assert (grid, span) == ((12, 12), 36)

    runs = repo / f"results/runs/{model}/toy-shapes-mini"
    # FastV at 1,960 of the nominal 3,920: each 36-token image keeps 18 a layer on average over 3 layers,
    # pruned after layer 1: 36 + 2k = 3 x 18 -> k = 9. FiCoCo-L from layer 1 (window 1): the same counts.
    # At PER_IMAGE tokens for every image, a 36-token scene has fewer and is kept whole: no reduction runs.
    # FiCoCo-V keeps 18 of the 36 merge groups (72 of 144 patches) in the blocks that attend over the whole image:
    # Qwen2-VL's two (9 groups each), Qwen2.5-VL's middle one; the LLM gets the 18 in every layer.
    tower = {"qwen2_vl": [[144, 108], [108, 72]], "qwen2_5_vl": [[144, 144], [144, 72], [72, 72]]}[MODELS[model]]
    unreduced = [[144, 144]] * dims.vision_layers
    planned = {("vanilla", "bfull"): ([36, 36, 36], unreduced), ("fastv", f"b{BUDGET}"): ([36, 9, 9], unreduced),
               ("ficoco-l", f"b{BUDGET}"): ([36, 9, 9], unreduced), ("ficoco-v", f"b{BUDGET}"): ([18, 18, 18], tower),
               ("fastv", f"bn{PER_IMAGE}"): ([36, 36, 36], unreduced),
               ("ficoco-l", f"bn{PER_IMAGE}"): ([36, 36, 36], unreduced),
               ("ficoco-v", f"bn{PER_IMAGE}"): ([36, 36, 36], unreduced)}
    for (method, label), (llm_visual, vision) in planned.items():
        records = read_jsonl(next((runs / method / label).glob("shard*/predictions.jsonl")))
        assert len(records) == 4 and all(record["error"] is None for record in records), records
        for record in records:
            counts = record["counts"]
            text = counts["llm"][0] - counts["visual_delivered"]
            assert counts["vision_grids"] == [list(grid)] and counts["visual_delivered"] == llm_visual[0]
            assert counts["vision"] == vision and counts["llm_visual"] == llm_visual
            assert (counts["overhead_macs"] > 0) == (llm_visual[-1] < 36)      # a whole image costs no selection
            if vision[-1] != [72, 72]:            # Qwen2.5-VL's windows after a reduction: from the run's pairs
                expected = flops.qwen_vl_sample_cost(dims, (96, 96), text, record["generated_tokens"],
                                                     llm_visual=llm_visual, vision_counts=vision)
            else:                                 # (FlopCounterMode-checked in test_qwen_flops.py), within bounds
                assert 4 * 16 ** 2 <= counts["vision_attention_pairs"][-1] <= 4 * 36 ** 2
                expected = flops.sample_cost(dims, counts, record["generated_tokens"])
            for key in ("vision_flops", "projector_flops", "prefill_flops", "decode_flops", "total_flops"):
                assert record["cost"][key] == pytest.approx(expected[key]), key
        metrics = json.loads((runs / method / label / "metrics.json").read_text())
        assert metrics["samples"] == 4 and metrics["visual_tokens"]["layer_average"] == sum(llm_visual) / 3
    vanilla = json.loads((runs / "vanilla/bfull/metrics.json").read_text())
    fastv = json.loads((runs / f"fastv/b{BUDGET}/metrics.json").read_text())
    assert fastv["cost_mean"]["prefill_flops"] < vanilla["cost_mean"]["prefill_flops"]
    assert fastv["cost_mean"]["vision_flops"] == vanilla["cost_mean"]["vision_flops"]     # the tower runs unreduced
    ficoco_v = json.loads((runs / f"ficoco-v/b{BUDGET}/metrics.json").read_text())
    assert ficoco_v["cost_mean"]["vision_flops"] < vanilla["cost_mean"]["vision_flops"]

    # measured on the nominal image: 112 x 140 patches, 3,920 tokens; FastV keeps half of them on average
    measured = json.loads((repo / f"results/measure/{model}/vanilla/bfull.json").read_text())
    assert measured["image_size"] == [896, 1120] and measured["visual_tokens"] == 3920
    assert measured["counts"]["vision_grids"] == [[112, 140]] and measured["counts"]["visual_delivered"] == 3920
    measured = json.loads((repo / f"results/measure/{model}/fastv/b{BUDGET}.json").read_text())
    assert measured["counts"]["llm_visual"] == measured["plan"]["llm_visual"] == [3920, 980, 980]
    # the nominal image has more than PER_IMAGE tokens: 2,000 a layer on average, 3,920 + 2k = 6,000 -> k = 1,040
    measured = json.loads((repo / f"results/measure/{model}/ficoco-l/bn{PER_IMAGE}.json").read_text())
    assert measured["job"]["budget"] == f"n{PER_IMAGE}"
    assert measured["counts"]["llm_visual"] == measured["plan"]["llm_visual"] == [3920, 1040, 1040]
    measured = json.loads((repo / f"results/measure/{model}/ficoco-v/bn{PER_IMAGE}.json").read_text())
    assert measured["counts"]["llm_visual"] == measured["plan"]["llm_visual"] == [2000] * 3
    assert measured["counts"]["vision"] == measured["plan"]["vision_counts"]
    assert model in (repo / "report/report.html").read_text()


def test_nothing_is_left_to_do_after_the_run(qwen_run):
    repo, _ = qwen_run
    result = snakemake(repo, "-n", "--cores", "2", "--configfile", "config/qwen.yaml")
    assert result.returncode == 0 and "Nothing to be done" in result.stdout, result.stdout[-2000:]


def test_fitprune_is_fitted_and_run_on_a_tiny_qwen_through_snakemake(qwen_run):
    """The calibrate rule fits FitPrune's schedule on the copied Qwen2-VL (toy training scenes, 36 tokens each, so
    each prompt's deletions count 3,920 / 36 times for the nominal image), and the evaluate and measure jobs run
    each image with that schedule scaled to its span, within its share of the budget."""
    from ficoco.budget import span_budget

    repo, _ = qwen_run
    config = yaml.safe_load((repo / "config/qwen.yaml").read_text())
    config.update(models=["tiny-qwen2"], methods=["vanilla", "fitprune"], budgets=[BUDGET],
                  calibration={"benchmark": "toy-shapes-train", "rows": 3})
    config["measure"]["methods"] = ["fitprune"]
    (repo / "config/qwen-fitprune.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(repo, "--cores", "2", "--configfile", "config/qwen-fitprune.yaml")
    assert result.returncode == 0, result.stderr[-4000:]
    fit = json.loads((repo / f"results/calibration/tiny-qwen2/fitprune/b{BUDGET}.json").read_text())["fit"]
    assert fit["layer_average"] <= BUDGET and fit["deletions"][-1] == 0
    records = read_jsonl(next((repo / f"results/runs/tiny-qwen2/toy-shapes-mini/fitprune/b{BUDGET}")
                              .glob("shard*/predictions.jsonl")))
    assert len(records) == 4 and all(record["error"] is None for record in records)
    for record in records:
        visual = record["counts"]["llm_visual"]
        assert visual[0] == 36 and sum(visual) / len(visual) <= span_budget(BUDGET, 36, 3920) == 18
    measured = json.loads((repo / f"results/measure/tiny-qwen2/fitprune/b{BUDGET}.json").read_text())
    assert measured["counts"]["llm_visual"] == measured["plan"]["llm_visual"]
    assert sum(measured["plan"]["llm_visual"]) / 3 <= BUDGET

"""ficoco.measure on a tiny random-weight LLaVA built from a config.json alone (no weights on disk)."""
from __future__ import annotations

import json

import pytest

from ficoco import measure as measure_module

FIELDS = ("job", "prefill_s", "per_token_s", "end_to_end_s", "throughput", "latency", "peak_memory_bytes",
          "peak_memory_source", "timer", "device", "dtype", "batch_size", "warmup", "repeats", "prompt_tokens",
          "new_tokens", "input_tokens", "counts", "cost", "versions")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              image_size=28, patch_size=7, projection_dim=32)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=5, image_seq_length=16,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    directory = tmp_path_factory.mktemp("models") / "tiny-llava"
    config.save_pretrained(directory)          # config.json only: measure builds random weights
    return directory


def test_measure_vanilla_fields_and_latencies(model_dir):
    result = measure_module.measure(model_dir, "vanilla", None, {}, device="cpu", dtype="float32", batch_size=2,
                                    warmup=1, repeats=3, prompt_tokens=6, new_tokens=4, progress=False)
    for field in FIELDS:
        assert field in result, field
    assert result["job"] == {"model": "tiny-llava", "method": "vanilla", "budget": "full"}
    assert result["prefill_s"] > 0 and result["per_token_s"] > 0
    assert result["prefill_s"] < result["end_to_end_s"]
    for key in ("prefill_s", "per_token_s", "end_to_end_s"):
        assert len(result["latency"][key]) == 3
        assert all(value > 0 for value in result["latency"][key])
    assert all(p < e for p, e in zip(result["latency"]["prefill_s"], result["latency"]["end_to_end_s"]))
    assert result["throughput"] == pytest.approx(2 / result["end_to_end_s"])
    assert result["peak_memory_bytes"] > 0 and result["timer"] == "time.perf_counter"
    # BOS + 2 text + 16 image placeholders + 3 text
    assert result["input_tokens"] == 6 + 16
    # the counts of what ran, from the adapter: CLIP layers 0..2 (the unused last layer is skipped)
    # at 17 tokens, 22 tokens per LLM layer; 4 new tokens = 3 decode steps
    assert result["adapter"] == "ficoco.apply"
    assert result["counts"]["vision"] == [[17, 17]] * 3
    assert result["counts"]["llm"] == [22] * 4
    assert result["cost"]["decode_steps"] == 3
    json.dumps(result)


def test_measure_reduced_method(model_dir):
    # FiCoCo-V at budget 8 over CLIP layers 1..2 of the tiny model (16 patches -> 8)
    result = measure_module.measure(model_dir, "ficoco-v", 8, {"start": 1, "end": 2}, device="cpu",
                                    dtype="float32", warmup=0, repeats=2, prompt_tokens=6, new_tokens=3,
                                    progress=False)
    assert result["job"] == {"model": "tiny-llava", "method": "ficoco-v", "budget": 8}
    assert result["counts"]["visual_delivered"] == 8
    assert result["counts"]["llm"] == [6 + 8] * 4
    assert result["plan"]["delivered"] == 8
    assert 0 < result["prefill_s"] < result["end_to_end_s"]


def test_counts_off_the_plan_fail_the_measure_job_as_an_evaluate_jobs_do(model_dir, monkeypatch):
    """A measure job checks the counts it records against the plan, and its cost, before it writes anything."""
    from ficoco.invariants import InvariantViolation
    from ficoco.models.handle import Handle

    recorded = Handle.last_counts

    def one_token_more(self):
        counts = recorded(self)
        return [{**row, "llm_visual": [row["llm_visual"][0], *[n + 1 for n in row["llm_visual"][1:]]],
                 "llm": [row["llm"][0], *[n + 1 for n in row["llm"][1:]]]} for row in counts]

    monkeypatch.setattr(Handle, "last_counts", one_token_more)
    with pytest.raises(InvariantViolation, match="fastv: LLM layer 1 visual tokens: expected"):
        measure_module.measure(model_dir, "fastv", 10, {"layer": 1}, device="cpu", dtype="float32", warmup=0,
                               repeats=1, prompt_tokens=6, new_tokens=2, progress=False)


def test_main_writes_json_atomically(model_dir, tmp_path):
    out = tmp_path / "results" / "measure" / "tiny-llava" / "vanilla" / "bfull.json"
    code = measure_module.main(["--model-config", str(model_dir / "config.json"), "--method", "vanilla",
                                "--budget", "full", "--overrides", "{}", "--device", "cpu", "--dtype", "float32",
                                "--warmup", "0", "--repeats", "2", "--prompt-tokens", "4", "--new-tokens", "2",
                                "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["job"]["budget"] == "full" and data["repeats"] == 2
    assert data["prefill_s"] < data["end_to_end_s"]
    assert [p.name for p in out.parent.iterdir()] == ["bfull.json"]   # no temporary file left behind


def test_measure_llava_next_at_an_image_size_costs_that_images_layout(tmp_path):
    """LLaVA-NeXT: the prompt holds the placeholders of the image's AnyRes span, the tower runs its passes;
    the counts equal `vanilla_counts` of that size (the layout computed independently of the model)."""
    from helpers_tiny import tiny_llava, tiny_llava_next

    from ficoco import flops

    model, dims = tiny_llava_next()
    model.config.save_pretrained(tmp_path)
    for image_size, passes in (((30, 70), 4), (None, 5)):       # None: the largest canvas, 56 x 56
        result = measure_module.measure(tmp_path, "vanilla", None, device="cpu", warmup=0, repeats=1, prompt_tokens=6,
                                        new_tokens=2, progress=False, image_size=image_size)
        layout = dims.anyres_layout(*(image_size or (56, 56)))
        assert result["image_size"] == list(image_size or (56, 56)) and result["input_tokens"] == 6 + layout.delivered
        assert result["counts"] == {**flops.vanilla_counts(dims, 6, image_size or (56, 56)), "overhead_macs": 0}
        assert result["counts"]["vision_crops"] == result["plan"]["vision_crops"] == passes
    with pytest.raises(ValueError, match=r"image_size=\(30, 70\): this model encodes every image at 28 px"):
        measure_module.synthetic_inputs(tiny_llava(), 1, 6, 0, (30, 70))        # one crop: no image sizes


def test_bad_arguments_name_the_value(model_dir):
    with pytest.raises(ValueError, match="dtype='float8'.*valid choices"):
        measure_module.build_random_model(model_dir / "config.json", "float8", "cpu", "sdpa", 0)
    with pytest.raises(ValueError, match="device='tpu'.*valid choices"):
        measure_module.resolve_device("tpu")
    with pytest.raises(FileNotFoundError, match="no model config"):
        measure_module.resolve_config_path(model_dir / "missing")
    with pytest.raises(SystemExit):
        measure_module.main(["--model-config", str(model_dir), "--budget", "-3", "--out", "x.json"])
    with pytest.raises(ValueError, match="prompt_tokens=1"):
        measure_module.measure(model_dir, prompt_tokens=1, device="cpu", progress=False)

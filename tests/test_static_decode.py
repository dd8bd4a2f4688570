"""Greedy decoding on a static KV cache (`ficoco.models.static_decode`), what `ficoco gpu-bench --decode graph`
replays as CUDA graphs, on the tiny LLaVA-1.5-shaped model (576 image tokens, 4 + 4 layers):

- every registered method, and the FiCoCo-L placements and layer choices, decodes the tokens and logits
  `generate` gives on its dynamic cache, with the same counts and overhead;
- each layer's static cache holds exactly the tokens that layer kept plus the new ones;
- a decode step reads nothing from the device on the host (what a CUDA graph capture forbids), checked by
  intercepting every torch call that would;
- transformers' own `StaticCache`, one size for every layer, decodes the same (the adapter masks the slots a
  reduced layer never fills);
- what it cannot decode is refused by name.
"""
import pytest
import torch
from transformers import StaticCache

import ficoco
from ficoco import methods
from ficoco.bench import bench_configs, text_towers
from ficoco.dims import ModelDims
from ficoco.gpu_bench import overrides_for
from ficoco.measure import synthetic_inputs
from ficoco.models import static_decode
from ficoco.models.static_decode import PromptStaticCache, greedy_decode
from helpers_tiny import HostReads, bench_shaped_model, emulate_cuda_graphs, tiny_llava_next

NEW_TOKENS = 5
# FiCoCo-L beyond the tiny model's defaults (start 0, window 1: one reduction at layer 0's input)
VARIANTS = [("ficoco-l", {"placement": "attention", "start": 1, "window": 1}),
            ("ficoco-l", {"start": 1, "window": 2})]
FITTED = [("fitprune", {"deletions": [300, 150, 50, 0]})]       # a fitted schedule: attention sees 576, 276, 126, 76


@pytest.fixture(scope="module")
def model():
    return bench_shaped_model()


@pytest.fixture(scope="module")
def inputs(model):
    """Two prompts of 636 tokens, each with its own random image."""
    return synthetic_inputs(model, 2, 60, 0)


def configs(model, budgets, names=None, variants=()):
    found, _ = bench_configs(methods.names() if names is None else names, budgets, ModelDims.from_config(model.config),
                             variants=variants, overrides=overrides_for("tiny"))
    return found


def config_id(config):
    method, budget, overrides = config
    return f"{method}-{budget}-" + "-".join(f"{key}={value}" for key, value in overrides.items())


def installed(model, config):
    method, budget, overrides = config
    return ficoco.apply(model, method, budget, text_tower=text_towers(model, [config])(method), **overrides)


def generate(model, inputs):
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
    return output.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(output.logits, dim=1)


def every_config(model):
    """Every registered method at 192 (or, where the tiny model cannot reach it, at a budget it reaches) and at
    its own schedule where it has one; the FiCoCo-L variants, and the reductions at layer 0's input at 64."""
    adaptive = {"prumerge-adaptive", "prumerge-plus-adaptive"}          # a count per image: refused, below
    found = [config for config in configs(model, [192], variants=VARIANTS) if config[0] not in adaptive]
    return (found + configs(model, [64], ["ficoco-l", "pdrop", "ficoco-vl"])[1:]
            + configs(model, [384], ["ficoco-v-code"])[1:]                  # its released Compress needs 2r <= T
            + configs(model, [264], [], FITTED)[1:])


def test_every_method_decodes_what_generate_decodes(model, inputs):
    checked = []
    for config in every_config(model):
        with installed(model, config) as handle:
            tokens, logits = generate(model, inputs)
            generate_counts = handle.last_counts()
            decoded = greedy_decode(model, inputs["input_ids"], inputs["pixel_values"], NEW_TOKENS,
                                    attention_mask=inputs["attention_mask"])
            assert torch.equal(decoded.tokens, tokens), config_id(config)
            torch.testing.assert_close(decoded.logits, logits, rtol=1e-4, atol=1e-5)
            assert handle.last_counts() == generate_counts, config_id(config)    # the keys read, the overhead
        checked.append(config[0])
    assert set(checked) == set(methods.names()) - {"prumerge-adaptive", "prumerge-plus-adaptive"} | {"vanilla"}


def test_each_layer_holds_its_kept_tokens_and_the_new_ones(model, inputs):
    held = {}
    for config in configs(model, [64], ["pdrop", "ficoco-v"]):
        with installed(model, config) as handle, torch.inference_mode():
            cache = PromptStaticCache(model.config, NEW_TOKENS)
            model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], cache=cache, logits_to_keep=1)
            kept = handle.last_counts()[0]["llm"]
            assert [layer.keys.shape[2] for layer in cache.layers] == [n + NEW_TOKENS for n in kept]
            assert [int(layer.cumulative_length) for layer in cache.layers] == kept
            held[config[0]] = kept
    assert held["vanilla"] == [636] * 4
    assert held["ficoco-v"] == [60 + 64] * 4                      # the prompt collapsed to 64 visual tokens
    assert held["pdrop"] == sorted(held["pdrop"], reverse=True) and len(set(held["pdrop"])) > 1   # its stages


def decode_step(model, inputs, cache):
    """A prefill and one eager decode step on `cache`; returns the decode step to run again."""
    with torch.inference_mode():
        logits = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], cache=cache,
                       logits_to_keep=1).logits
        token = logits[:, -1:].argmax(-1)
        model(input_ids=token, cache=cache, logits_to_keep=1)

    def step():
        with torch.inference_mode():
            return model(input_ids=token, cache=cache, logits_to_keep=1).logits
    return step


@pytest.mark.parametrize("names, budget, variants", [
    (["ficoco-v", "ficoco-l", "ficoco-vl", "pdrop", "sparsevlm", "vscan"], 64, VARIANTS),
    (["fastv", "dart", "tome"], 192, ()),
])
def test_a_decode_step_reads_nothing_on_the_host(model, inputs, names, budget, variants):
    for config in configs(model, [budget], names, variants):
        with installed(model, config):
            step = decode_step(model, inputs, PromptStaticCache(model.config, NEW_TOKENS))
            with HostReads() as reads:
                step()
            assert reads.reads == [], config_id(config)


def test_the_host_read_check_catches_a_read(model, inputs):
    """transformers' own StaticCache answers "does it hold tokens?" with a device value: the handle reads it."""
    with installed(model, configs(model, [64], ["ficoco-l"])[1]):
        step = decode_step(model, inputs, StaticCache(config=model.config, max_cache_len=700))
        with HostReads() as reads:
            step()
    assert reads.reads == ["__bool__ at llama.py:" + reads.reads[0].split(":")[-1]]


def test_transformers_static_cache_decodes_the_same(model, inputs):
    """One size for every layer: the slots a reduced layer never fills are masked."""
    for config in configs(model, [64], ["pdrop", "ficoco-v", "ficoco-l"], VARIANTS):
        with installed(model, config):
            tokens, logits = generate(model, inputs)
            cache = StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] + NEW_TOKENS)
            with torch.inference_mode():
                out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], cache=cache,
                            logits_to_keep=1)
                decoded = [out.logits[:, -1]]
                for _ in range(NEW_TOKENS - 1):
                    decoded.append(model(input_ids=decoded[-1].argmax(-1, keepdim=True), cache=cache,
                                         logits_to_keep=1).logits[:, -1])
            decoded = torch.stack(decoded, dim=1)
            assert torch.equal(decoded.argmax(-1), tokens), config_id(config)
            torch.testing.assert_close(decoded, logits, rtol=1e-4, atol=1e-5)


def test_a_reset_cache_takes_a_prefill_again(model, inputs):
    with installed(model, configs(model, [64], ["pdrop"])[1]) as handle, torch.inference_mode():
        cache = PromptStaticCache(model.config, NEW_TOKENS)
        first = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], cache=cache,
                      logits_to_keep=1).logits
        assert cache.holds_prompt
        cache.reset()
        assert not cache.holds_prompt
        again = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], cache=cache,
                      logits_to_keep=1).logits
        torch.testing.assert_close(again, first)
        assert handle.last_counts()[0]["llm"] == [int(layer.cumulative_length) for layer in cache.layers]


def test_what_it_cannot_decode_is_refused(model, inputs, monkeypatch):
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    padded = inputs["attention_mask"].clone()
    padded[1, 0] = 0
    with pytest.raises(ValueError, match="without padding"):
        greedy_decode(model, ids, pixels, NEW_TOKENS, attention_mask=padded)
    with pytest.raises(ValueError, match="new_tokens=0"):
        greedy_decode(model, ids, pixels, 0)
    with pytest.raises(ValueError, match="replays CUDA graphs; the inputs are on cpu"):
        greedy_decode(model, ids, pixels, NEW_TOKENS, graph=True)
    with installed(model, ("prumerge-adaptive", None, {})):              # a count per image: rows padded
        with pytest.raises(ValueError, match=r"prumerge-adaptive: its prefill padded the rows with \[\d+, \d+\]"):
            greedy_decode(model, ids, pixels, NEW_TOKENS)
        decoded = greedy_decode(model, ids[:1], pixels[:1], NEW_TOKENS)  # one row: nothing to pad
        assert decoded.tokens.shape == (1, NEW_TOKENS)
    # a cache passed under a name the model does not take is swallowed; the model makes its own
    monkeypatch.setattr(static_decode, "cache_keyword", lambda model: "kv_cache")
    with pytest.raises(RuntimeError, match="the prefill did not write the static cache passed as `kv_cache`"):
        greedy_decode(model, ids, pixels, NEW_TOKENS)


def test_other_models_are_refused():
    next_model, _ = tiny_llava_next()
    with pytest.raises(ValueError, match="greedy_decode runs LLaVA-1.5-shaped models; LlavaNextForConditionalGeneration"):
        greedy_decode(next_model, torch.ones(1, 4, dtype=torch.long), None, NEW_TOKENS)
    config = next_model.config.text_config
    config.layer_types = ["sliding_attention"] + ["full_attention"] * (config.num_hidden_layers - 1)
    with pytest.raises(ValueError, match=r"full-attention layers only; this model has \['full_attention', "
                                         r"'sliding_attention'\]"):
        PromptStaticCache(next_model.config, NEW_TOKENS)


def test_the_graph_loop_feeds_each_replay_the_token_before(model, inputs, monkeypatch):
    """graph=True with the CUDA parts emulated on the CPU (helpers_tiny.emulate_cuda_graphs). The loop must refill
    the captured step's token in place and copy each replay's logits out: the tokens and logits are generate's."""
    captures = emulate_cuda_graphs(monkeypatch)
    for config in configs(model, [64], ["ficoco-l"]):
        with installed(model, config):
            tokens, logits = generate(model, inputs)
            graphed = greedy_decode(model, inputs["input_ids"], inputs["pixel_values"], NEW_TOKENS, graph=True)
        assert torch.equal(graphed.tokens, tokens), config_id(config)
        torch.testing.assert_close(graphed.logits, logits, rtol=1e-4, atol=1e-5)
        assert len(set(tokens[0].tolist())) > 1                       # the tokens change from step to step
    assert len(captures) == 2                                         # one capture per call

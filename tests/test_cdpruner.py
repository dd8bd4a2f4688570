"""CDPruner: the conditional DPP and the relevance, the CLIP text tower beside the model, and the method
on tiny LLaVA models, each checked against an independent computation (float64 log-determinants, the
CLIP checkpoint run directly, the unpatched model's own features)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import yaml

import ficoco
from ficoco.config import ConfigError, validate
from ficoco.fetch import fetch_model
from ficoco.models.companion import model_text_tower, template_edges
from ficoco.paradigm.filter import conditional_kernel, dpp_greedy_map, instruction_relevance
from helpers_tiny import (generate_batch_and_alone, images, n_placeholders, one_image_prompt, prompt, tiny_llava,
                          tiny_text_tower)

TOY_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


# ------------------------------------------------------------------------------------------------
# The paradigm stages, against float64 brute force

def brute_force_greedy(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP by definition: each step adds the item that makes log det L_S largest (float64)."""
    kernel, chosen = kernel.double(), []
    for _ in range(k):
        best = max((j for j in range(kernel.shape[0]) if j not in chosen),
                   key=lambda j: torch.linalg.slogdet(kernel[chosen + [j]][:, chosen + [j]]).logabsdet.item())
        chosen.append(best)
    return sorted(chosen)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_map_equals_the_log_determinant_greedy(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 24, 40, generator=generator)                   # width > tokens: L has full rank
    relevance = torch.rand(2, 24, generator=generator) + 0.05
    kernel = conditional_kernel(x, relevance)
    kept = dpp_greedy_map(kernel, 10)
    assert kept.tolist() == [brute_force_greedy(kernel[b], 10) for b in range(2)]


def test_once_the_rank_is_used_up_the_rest_are_taken_in_position_order():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 12, 3, generator=generator)                    # L has rank 3
    kernel = conditional_kernel(x, torch.rand(1, 12, generator=generator) + 0.05)
    kept = dpp_greedy_map(kernel, 8)[0].tolist()
    informative = brute_force_greedy(kernel[0], 3)
    rest = [j for j in range(12) if j not in informative][:5]
    assert kept == sorted(informative + rest)
    # rounding noise (another processor's last bits) neither reorders the rest nor breaks exact ties
    ties = conditional_kernel(torch.randn(1, 12, 3, generator=generator), torch.ones(1, 12))  # every L_jj = 1
    assert dpp_greedy_map(ties, 1)[0].tolist() == [0]
    for seed in range(5):
        noise = torch.randn(12, 12, generator=torch.Generator().manual_seed(seed)) * 1e-7
        assert dpp_greedy_map(kernel + (noise + noise.T) / 2, 8)[0].tolist() == kept


def test_relevance_is_the_authors_min_max_of_the_negative_mean_cosine():
    cosines = torch.tensor([[0.2, 0.4], [-0.1, 0.1], [0.5, 0.3], [0.0, 0.0]])
    negative_mean = [-(a + b) / 2 for a, b in cosines.double().tolist()]
    low, high = min(negative_mean), max(negative_mean)
    expected = [(value - low + 1e-6) / (high - low) for value in negative_mean]
    assert instruction_relevance(cosines).tolist() == pytest.approx(expected, rel=1e-6)
    assert instruction_relevance(torch.full((5, 2), 0.3)).tolist() == [1.0] * 5      # conditions nothing


def test_the_kernel_is_diag_r_times_cosines_times_diag_r():
    x, relevance = torch.randn(2, 7, 5), torch.rand(2, 7)
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    expected = torch.diag_embed(relevance.double()) @ unit @ unit.transpose(1, 2) @ torch.diag_embed(relevance.double())
    assert torch.allclose(conditional_kernel(x, relevance).double(), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The text tower beside the model

@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def companion_dir(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip")
    tiny_text_tower(model, directory)
    return directory


@pytest.fixture(scope="module")
def text_tower(model, companion_dir):
    from ficoco.dims import ModelDims
    from ficoco.models.companion import load_text_tower
    from helpers_tiny import tiny_word_tokenizer

    return load_text_tower(companion_dir, tiny_word_tokenizer(), "<image>{prompt}", model.model.vision_tower,
                           ModelDims.from_config(model.config).last_vision_layer)


def clip_reference(companion_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(companion_dir), dtype=torch.float64, attn_implementation="eager").eval()


@pytest.mark.parametrize("words", [3, 7, 19])       # one segment (end token appended), exactly 8, three segments
def test_text_embeddings_are_the_clip_text_features_of_each_segment(text_tower, companion_dir, words):
    text = " ".join(f"w{10 + i % 40}" for i in range(words))
    ids = text_tower.text_ids(text)
    assert ids[-1] == 3 and ids.count(3) == 1                         # the tiny tower pools at its end token 3
    clip, context = clip_reference(companion_dir), text_tower.context
    with torch.no_grad():
        expected = torch.cat([clip.text_projection(clip.text_model(input_ids=torch.tensor([ids[i:i + context]]))
                                                   .pooler_output) for i in range(0, len(ids), context)])
        got = text_tower.text_embeddings(text)
    assert got.shape == (-(-len(ids) // context), expected.shape[1])
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_the_instruction_is_what_stands_for_the_prompt_in_the_template(text_tower):
    from ficoco.toy import model as toy_model

    tokenizer = toy_model.build_tokenizer()
    head, tail = template_edges(tokenizer, TOY_TEMPLATE, "<image>")
    toy = dataclasses.replace(text_tower, llm_tokenizer=tokenizer, template_head=head, template_tail=tail,
                              template=TOY_TEMPLATE)
    ids = tokenizer(TOY_TEMPLATE.replace("{prompt}", "what shape is left ?"))["input_ids"]
    after_image = ids[ids.index(tokenizer.convert_tokens_to_ids("<image>")) + 1:]
    assert tokenizer.convert_ids_to_tokens(tail) == ["assistant", ":"] and head == []
    assert toy.instruction_text(after_image) == "what shape is left ?"
    with pytest.raises(ValueError, match="does not have the form of the template"):
        toy.instruction_text(after_image[:-1])                        # the template's end is missing


def test_a_clip_checkpoint_of_another_tower_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="not the LLaVA vision tower's"):
        tiny_text_tower(model, tmp_path, vision_weights=False)


def test_a_model_without_a_companion_is_named(model, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"id": "x"}))
    with pytest.raises(FileNotFoundError, match="no CLIP companion"):
        model_text_tower(tmp_path, None, TOY_TEMPLATE, model, 2)


def test_fetch_copies_the_companion_and_records_it(model, companion_dir, tmp_path):
    source = tmp_path / "source"
    model.save_pretrained(str(source))
    shutil.copytree(companion_dir, source / "clip")
    entry = {"source": "hub", "id": "org/tiny", "revision": "a" * 40,
             "text_tower": {"id": "org/tiny-clip", "revision": "b" * 40}}
    manifest = fetch_model("tiny", entry, tmp_path / "fetched", endpoint_dir=source)
    assert manifest["clip"] == {"dir": "clip", "id": "org/tiny-clip", "revision": "b" * 40,
                                "resolved_revision": "b" * 40}
    assert "clip/config.json" in manifest["files"]
    from helpers_tiny import tiny_word_tokenizer

    loaded = model_text_tower(tmp_path / "fetched", tiny_word_tokenizer(), "<image>{prompt}", model, 2)
    assert loaded.context == 8
    shutil.rmtree(source / "clip")
    with pytest.raises(FileNotFoundError, match="text tower"):
        fetch_model("tiny", entry, tmp_path / "again", endpoint_dir=source)


# ------------------------------------------------------------------------------------------------
# The method on a tiny LLaVA

def reference_kept(model, companion_dir, ids, pixels, instruction: str, keep: int) -> list[int]:
    """The tokens CDPruner keeps, from the unpatched model and the CLIP checkpoint run directly (float64)."""
    clip = clip_reference(companion_dir)
    feature_layer = model.config.vision_feature_layer
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[feature_layer][:, 1:]
        projected = model.model.multi_modal_projector(hidden)[0].double()                     # (N, D_llm)
        image = clip.visual_projection(clip.vision_model.post_layernorm(hidden[0].double()))   # (N, C)
        words = instruction.split() + ["."]                                                    # + the end token
        text_ids = torch.tensor([[{".": 3}.get(word, int(word[1:]) if word.startswith("w") else 4) for word in words]])
        text = clip.text_projection(clip.text_model(input_ids=text_ids).pooler_output)         # (1, C)
    cosine = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    relevance = -cosine.mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    unit = torch.nn.functional.normalize(projected, dim=-1)
    kernel = relevance[:, None] * (unit @ unit.T) * relevance[None, :]
    return brute_force_greedy(kernel, keep)


@pytest.mark.parametrize("after", [[12, 13, 14], [30, 31, 32, 33, 34]])
def test_kept_tokens_equal_the_reference(model, companion_dir, text_tower, after):
    ids, mask, pixels = one_image_prompt(model, [10, 11], after)
    with ficoco.apply(model, "cdpruner", 6, text_tower=text_tower) as handle, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        kept = handle.last_trace()["vision"]["projector"][0].tolist()
        counts = handle.last_counts()[0]
    instruction = " ".join(f"w{token}" for token in after)
    assert kept == reference_kept(model, companion_dir, ids, pixels, instruction, 6)
    assert counts["visual_delivered"] == 6 and counts["projector_tokens"] == n_placeholders(model)
    # the text tower's work is counted: two layers over one 8-token segment, beside the image embeddings
    assert counts["overhead_macs"] > text_tower.macs(n_placeholders(model), 1) > 0


def test_the_instruction_changes_the_choice(model, text_tower):
    ids_pixels = [one_image_prompt(model, [10], [word, word + 1], seed=5) for word in (12, 20, 28, 36, 44)]
    chosen = set()
    with ficoco.apply(model, "cdpruner", 5, text_tower=text_tower) as handle, torch.no_grad():
        for ids, mask, pixels in ids_pixels:
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
            chosen.add(tuple(handle.last_trace()["vision"]["projector"][0].tolist()))
    assert len(chosen) > 1


@pytest.mark.parametrize("budget", [1, 4, 9, 16])
def test_the_llm_receives_the_budget(model, text_tower, budget):
    ids, mask, pixels = one_image_prompt(model, [10, 11], [12, 13, 14])
    with ficoco.apply(model, "cdpruner", budget, text_tower=text_tower) as handle, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        counts = handle.last_counts()[0]
    assert counts["visual_delivered"] == budget and set(counts["llm_visual"]) == {budget}


def test_cached_generation_and_a_batch_equal_each_prompt_alone(model, text_tower):
    prompts = [prompt(n_placeholders(model), [10], [12, 13]),
               prompt(n_placeholders(model), [10, 11, 12], list(range(20, 31)))]
    with ficoco.apply(model, "cdpruner", 6, text_tower=text_tower) as handle:
        generate_batch_and_alone(model, handle, prompts, images(2, 28, seed=4))


def test_remove_restores_the_model(model, text_tower):
    ids, mask, pixels = one_image_prompt(model, [10, 11], [12, 13, 14])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        with ficoco.apply(model, "cdpruner", 6, text_tower=text_tower):
            reduced = model(input_ids=ids[:, :1], attention_mask=mask[:, :1]).logits   # text-only runs too
        after = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert torch.equal(before, after) and reduced.shape[1] == 1


def test_the_text_tower_is_required_and_only_where_it_is_read(model, text_tower):
    with pytest.raises(ValueError, match="pass text_tower="):
        ficoco.apply(model, "cdpruner", 6)
    with pytest.raises(ValueError, match="does not read a text tower"):
        ficoco.apply(model, "divprune", 6, text_tower=text_tower)


def test_a_model_without_a_text_tower_is_refused_before_any_job(tmp_path):
    models = yaml.safe_load(open("config/models.yaml"))
    del models["llava-1.5-7b"]["text_tower"]
    models["toy-llava"]["recipe"] = "end-to-end"
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    for model, benchmark, budget in (("llava-1.5-7b", "gqa", 64), ("toy-llava", "toy-shapes", 36)):
        config = {"models": [model], "methods": ["vanilla", "cdpruner"], "budgets": [budget], "benchmarks": [benchmark],
                  "registries": {"models": str(tmp_path / "models.yaml")}}
        with pytest.raises(ConfigError, match=f"cdpruner cannot run on model {model}: it reads the instruction"):
            validate(config)
    assert validate({"models": ["llava-1.5-7b"], "methods": ["cdpruner"], "budgets": [64], "benchmarks": ["gqa"]})


def test_the_companion_is_part_of_the_fingerprint_of_a_job_that_reads_it(tmp_path):
    from ficoco.fingerprint import differences, job_fingerprint

    model_dir, bench_dir = tmp_path / "model", tmp_path / "bench"
    for directory, manifest in ((model_dir, {"id": "m", "revision": "r", "clip": {"dir": "clip", "revision": "c1"}}),
                                (bench_dir, {"id": "b", "checksum": "x", "rows": 4})):
        directory.mkdir()
        (directory / "manifest.json").write_text(json.dumps(manifest))

    def fingerprint(method: str, reads: bool):
        return job_fingerprint(model_dir=model_dir, benchmark_dir=bench_dir, benchmark_module="toy-shapes", options={},
                               method=method, budget="36", params={}, template=TOY_TEMPLATE, dtype="float32",
                               image_preprocessing="none", batch_size=1, device="cpu", shard=0, shards=1, limit=None,
                               text_tower=reads)

    before = fingerprint("cdpruner", True)
    assert before.text_tower == {"dir": "clip", "revision": "c1"} and fingerprint("divprune", False).text_tower is None
    (model_dir / "manifest.json").write_text(json.dumps({"id": "m", "revision": "r",
                                                          "clip": {"dir": "clip", "revision": "c2"}}))
    assert differences(before.as_dict(), fingerprint("cdpruner", True).as_dict()) == ["text_tower"]


def test_the_llava_text_towers_are_pinned_to_a_commit():
    from ficoco.fetch import is_pinned

    models = yaml.safe_load(open("config/models.yaml"))
    towers = {name: entry["text_tower"] for name, entry in models.items() if entry.get("text_tower")}
    assert set(towers) == {"llava-1.5-7b", "llava-1.5-13b", "llava-next-7b"}
    assert all(tower["id"] == "openai/clip-vit-large-patch14-336" and is_pinned(tower["revision"])
               for tower in towers.values())

"""The CLIP-style stage of the toy world (ficoco/toy/clip.py): captions, the contrastive loss, the CLS
attention measurement and a short pretraining, each against an independent computation."""
from __future__ import annotations

import json

import pytest
import torch

from ficoco.toy import clip as toy_clip
from ficoco.toy import model as toy_model
from ficoco.toy import shapes
from ficoco.toy import train as toy_train


def test_caption_lists_objects_in_raster_order_with_their_side():
    for index in range(40):
        row = shapes.sample(0, "train", index)
        words = row.caption().split()
        assert words[-1] == shapes.CAPTION_END
        parts = " ".join(words[:-1]).split(f" {shapes.CAPTION_SEPARATOR} ")
        ordered = sorted(row.objects, key=lambda o: o.row * shapes.GRID + o.col)
        assert len(parts) == len(ordered)
        for part, obj in zip(parts, ordered):
            # the side read from the pixels: the floor colour at the cell's corner (outside every shape mask)
            floor = tuple(int(v) for v in row.image().getpixel((obj.col * shapes.CELL, obj.row * shapes.CELL)))
            side = "left" if floor == shapes.BACKGROUND_LEFT else "right"
            assert part == f"{obj.color} {obj.shape} {side}"


def test_text_encoder_pools_at_the_caption_end():
    """Pooled output = the last hidden state at the "." position (not transformers' legacy argmax pooling)."""
    from transformers import CLIPTextModel

    processor = toy_model.build_clip_processor()
    rows = [shapes.sample(0, "train", i) for i in range(4)]
    batch = toy_clip.caption_batch(rows, processor.tokenizer)
    unknown = processor.tokenizer.convert_tokens_to_ids("<unk>")
    assert not (batch["input_ids"] == unknown).any()
    torch.manual_seed(0)
    text = CLIPTextModel(toy_model.toy_clip_config().text_config).eval()
    with torch.no_grad():
        output = text(**batch)
    end = processor.tokenizer.convert_tokens_to_ids(shapes.CAPTION_END)
    for i in range(len(rows)):
        position = batch["input_ids"][i].tolist().index(end)
        assert position == int(batch["attention_mask"][i].sum()) - 1
        torch.testing.assert_close(output.pooler_output[i], output.last_hidden_state[i, position])


def _loss_reference(logits: torch.Tensor, captions: list[str]) -> float:
    """The soft-target symmetric loss as a float64 loop."""
    logits = logits.double()
    total = 0.0
    for matrix in (logits, logits.T):
        for i in range(len(captions)):
            positives = [j for j in range(len(captions)) if captions[j] == captions[i]]
            log_norm = torch.logsumexp(matrix[i], dim=0)
            total += -sum(float(matrix[i, j] - log_norm) for j in positives) / len(positives) / len(captions)
    return total / 2


def test_contrastive_loss_against_a_loop_and_transformers_clip_loss():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 6, generator=generator) * 3
    distinct = [f"c{i}" for i in range(6)]
    with_duplicates = ["a", "b", "a", "c", "b", "a"]
    for captions in (distinct, with_duplicates):
        assert toy_clip.contrastive_loss(logits, captions).item() == pytest.approx(_loss_reference(logits, captions),
                                                                                   rel=1e-5)
    # all captions distinct: exactly the loss CLIPModel itself returns
    processor = toy_model.build_clip_processor()
    rows = shapes.samples(0, "val", 8)
    assert len({r.caption() for r in rows}) == len(rows)
    with torch.no_grad():
        output = toy_model.build_clip(0)(**toy_clip.caption_batch(rows, processor.tokenizer), return_loss=True,
                                         pixel_values=toy_model.pixel_values([r.image() for r in rows], processor))
    ours = toy_clip.contrastive_loss(output.logits_per_image, [r.caption() for r in rows])
    assert ours.item() == pytest.approx(output.loss.item(), rel=1e-5)


def test_cls_attention_equals_the_eager_attention_weights():
    """The recomputed CLS row of the feature layer = transformers' own attention probabilities."""
    processor = toy_model.build_processor()
    model = toy_model.build_model(3)
    tower = model.model.vision_tower
    rows = [shapes.sample(0, "val", i) for i in range(3)]
    pixels = toy_model.pixel_values([r.image() for r in rows], processor)
    measured = toy_clip.cls_attention(tower, pixels, feature_layer=-2)                 # (B, N)
    # a positive feature layer k reads hidden_states[k], layer k - 1's output: -2 of 6 layers is 5
    torch.testing.assert_close(toy_clip.cls_attention(tower, pixels, feature_layer=len(tower.encoder.layers) - 1),
                               measured, rtol=0, atol=0)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        weights = tower(pixel_values=pixels, output_attentions=True).attentions[len(tower.encoder.layers) - 2]
    reference = weights.mean(dim=1)[:, 0, 1:]                                        # (B, N) head mean, CLS row
    torch.testing.assert_close(measured, reference / reference.sum(dim=1, keepdim=True), rtol=1e-4, atol=1e-6)
    share = toy_clip.cls_object_share(tower, processor, rows)
    expected = sum(float(measured[i, [o.patch_index for o in r.objects]].sum()) for i, r in enumerate(rows)) / 3
    assert share["cls_share_on_objects"] == pytest.approx(expected, rel=1e-5)
    assert share["object_patch_share"] == pytest.approx(sum(len(r.objects) for r in rows) / 3 / 144)


def test_short_pretraining_learns_to_retrieve_captions():
    processor = toy_model.build_clip_processor()
    clip_model = toy_model.build_clip(0)
    rows = shapes.samples(0, "val", 64)
    before = toy_clip.retrieval_accuracy(clip_model, processor, rows)
    result = toy_clip.pretrain(clip_model, processor, toy_clip.ClipSettings(steps=120, batch_size=32), progress=False)
    after = toy_clip.retrieval_accuracy(clip_model, processor, rows)
    losses = result["losses"]
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:10]) / 10
    assert after > 4 * max(before, 1 / 64)                      # chance is about 1 in 64


def test_pretrain_clip_writes_a_loadable_clip_directory(tmp_path, monkeypatch, capsys):
    from transformers import AutoProcessor, CLIPModel

    from ficoco.toy.cli import build_model, inspect_tower, pretrain_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "clip"
    manifest = pretrain_clip(out, steps=3, batch_size=8, eval_rows=16, progress=False)
    assert manifest["training_result"]["cls"]["rows"] == 16
    assert json.loads((out / "manifest.json").read_text()) == manifest
    model = CLIPModel.from_pretrained(str(out))
    processor = AutoProcessor.from_pretrained(str(out))
    rows = shapes.samples(0, "val", 4)
    inputs = processor(text=[r.caption() for r in rows], images=[r.image() for r in rows], return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        assert model(**inputs).logits_per_image.shape == (4, 4)
    assert pretrain_clip(out, steps=3, batch_size=8, eval_rows=16, progress=False) == manifest
    assert "up to date" in capsys.readouterr().out

    llava = tmp_path / "llava"
    build_model(llava, train=False, size="small", eval_rows=0, progress=False)
    for directory in (out, llava):
        share = inspect_tower(directory, rows=8)
        assert 0 < share["cls_share_on_objects"] < 1 and share["rows"] == 8
    with pytest.raises(ValueError, match="valid: a toy LLaVA"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
        inspect_tower(tmp_path / "other")


# ---------------------------------------------------------------------------------- the staged recipe

def test_attention_aid_over_all_heads_equals_the_layers_own_attention():
    """attention_loss(heads=None) = -log(mass on the targets) read from the eager attention weights."""
    import numpy as np

    processor = toy_model.build_processor()
    model = toy_model.build_model(0, "small")
    model.set_attn_implementation("eager")
    rows = [shapes.sample(0, "train", i) for i in range(3)]
    batch = toy_train.training_batch(rows, processor, turns=2, rng=np.random.default_rng(0))
    grounding = batch.pop("grounding")
    batch.pop("asked")
    layer_index = 2
    layer = model.model.language_model.layers[layer_index]
    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["position_embeddings"] = kwargs["position_embeddings"]

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        weights = model(**batch, output_attentions=True).attentions[layer_index]     # (B, H, T, T)
    handle.remove()
    for heads in (1, 2, None):
        n = weights.shape[1] if heads is None else heads
        reference = np.mean([np.mean([-np.log(float(weights[b, h, query, keys].sum())) for h in range(n)])
                             for b, query, keys in grounding])
        with torch.no_grad():
            ours = toy_train.attention_loss(layer, captured, grounding, heads)
        assert ours.item() == pytest.approx(reference, rel=1e-4)
    with pytest.raises(ValueError, match="valid: 1..2 or None"):
        toy_train.attention_loss(layer, captured, grounding, 3)


def test_projector_targets_are_the_embeddings_of_each_patchs_words_by_pixels():
    from test_toy_world import SHAPE_BY_AREA, blobs_from_pixels

    processor = toy_model.build_processor()
    model = toy_model.build_model(0, "small")
    embeddings = model.get_input_embeddings().weight.detach()
    word = processor.tokenizer.convert_tokens_to_ids
    rows = [shapes.sample(0, "train", i) for i in range(4)]
    targets = toy_train.projector_targets(model, rows, processor.tokenizer)             # (B, N, D)
    for i, row in enumerate(rows):
        object_patches = set()
        for blob in blobs_from_pixels(row.image()):
            y, x = blob["center"]
            patch = int(y) // shapes.CELL * shapes.GRID + int(x) // shapes.CELL
            side = "left" if int(x) < shapes.IMAGE_SIZE // 2 else "right"
            expected = embeddings[word(blob["color"])] + embeddings[word(SHAPE_BY_AREA[blob["area"]])] \
                + embeddings[word(side)]
            torch.testing.assert_close(targets[i, patch], expected)
            object_patches.add(patch)
        for patch in set(range(shapes.GRID * shapes.GRID)) - object_patches:
            side = "left" if patch % shapes.GRID < shapes.GRID // 2 else "right"
            torch.testing.assert_close(targets[i, patch], embeddings[word(side)])


def test_recipes_and_their_defaults():
    staged = toy_train.TrainSettings.for_recipe("staged", seed=4, steps=7)
    assert (staged.recipe, staged.steps, staged.batch_size, staged.attention_heads) == ("staged", 7, 32, None)
    assert staged.clip == toy_clip.ClipSettings(seed=4) and staged.align_steps > 0
    assert staged.projector_lr_scale == 10.0 and toy_train.TrainSettings.for_recipe("staged").steps == 800
    assert toy_train.TrainSettings.for_recipe("end-to-end") == toy_train.TrainSettings()
    with pytest.raises(ValueError, match=r"recipe='clip': valid recipes are \['end-to-end', 'staged'\]"):
        toy_train.TrainSettings.for_recipe("clip")


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_the_projector_learns_at_its_own_rate(scale):
    """One step from the same start, so the same gradients: Adam's first step moves a weight by about its
    learning rate, so the projector moves `scale` times as far as at scale 1 (not at all at 0), and the
    LLM exactly as at scale 1."""
    processor = toy_model.build_processor()
    moved = {}
    for run_scale in (scale, 1.0):
        model = toy_model.build_model(0, size="small")
        before = {name: value.clone() for name, value in model.state_dict().items()}
        settings = toy_train.TrainSettings(steps=1, batch_size=2, size="small", weight_decay=0.0,
                                           projector_lr_scale=run_scale)       # Adam's step alone
        toy_train.train(model, processor, settings, progress=False)
        moved[run_scale] = {name: (value - before[name]).abs().max().item()
                            for name, value in model.state_dict().items()}
    projector = [name for name in moved[1.0] if name.startswith("model.multi_modal_projector.")]
    llm = [name for name in moved[1.0] if name.startswith("model.language_model.") and moved[1.0][name] > 0]
    assert projector and llm
    for name in projector:
        assert moved[scale][name] == pytest.approx(scale * moved[1.0][name], rel=1e-3, abs=1e-12), name
    for name in llm:                                     # one step: the LLM's update does not depend on it
        assert moved[scale][name] == moved[1.0][name], name
    with pytest.raises(ValueError, match=r"projector_lr_scale=-1.0: valid: a factor >= 0"):
        toy_train.train(toy_model.build_model(0, size="small"), processor,
                        toy_train.TrainSettings(steps=1, size="small", projector_lr_scale=-1.0), progress=False)


def test_staged_build_pretrains_aligns_and_keeps_the_tower_frozen(tmp_path, monkeypatch, capsys):
    from transformers import CLIPModel, LlavaForConditionalGeneration

    from ficoco.toy.cli import CLIP_DIR, _require_same_tower, build_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "staged"
    short = {"clip": toy_clip.ClipSettings(steps=3, batch_size=8), "align_steps": 2, "batch_size": 4}
    manifest = build_model(out, size="small", steps=3, eval_rows=8, recipe="staged", overrides=short,
                           progress=False)
    training = manifest["training_result"]
    assert list(training["stages"]) == ["clip", "align", "instruct"]
    assert training["seconds"] == pytest.approx(sum(s["seconds"] for s in training["stages"].values()), abs=0.2)
    assert "retrieval_accuracy" in training["stages"]["clip"] and training["cls"]["rows"] == 8
    assert manifest["clip"]["dir"] == CLIP_DIR and manifest["request"]["training"]["recipe"] == "staged"

    llava = LlavaForConditionalGeneration.from_pretrained(str(out))
    clip = CLIPModel.from_pretrained(str(out / CLIP_DIR))
    pretrained = clip.vision_model.state_dict()
    for name, value in llava.model.vision_tower.state_dict().items():
        assert torch.equal(value, pretrained[name]), name                 # the LLaVA tower is the CLIP tower
    random_projector = toy_model.build_model(0, "small").model.multi_modal_projector.state_dict()
    assert any(not torch.equal(value, random_projector[name])
               for name, value in llava.model.multi_modal_projector.state_dict().items())

    capsys.readouterr()
    assert build_model(out, size="small", steps=3, eval_rows=8, recipe="staged", overrides=short,
                       progress=False) == manifest
    assert "up to date" in capsys.readouterr().out

    with torch.no_grad():
        llava.model.vision_tower.encoder.layers[0].mlp.fc1.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="must keep it frozen"):
        _require_same_tower(llava.model.vision_tower, clip.vision_model)

"""Tiny random-weight LLaVA models and prompts for CPU tests (platform-notes §5).

`tiny_llava()` is a 28 px / patch 7 model (16 patches + CLS); `llava_shaped()` has LLaVA-1.5's
token geometry (336 px / patch 14 -> 577 vision tokens, 576 image placeholders) with small
layers. Both use transformers' real classes, so the adapter is exercised on the code paths it
patches. Weights are random but seeded, and `initializer_range` is raised so attention is peaked
enough for scores to differ.
"""
from __future__ import annotations

import math
import re
import traceback
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

PAD, BOS, EOS, IMAGE = 0, 1, 2, 5


def tiny_llava(*, image_size: int = 28, patch_size: int = 7, vision_layers: int = 4, vision_hidden: int = 32,
               vision_heads: int = 4, vision_mlp: int = 64, llm_layers: int = 4, llm_hidden: int = 32,
               llm_heads: int = 4, llm_kv_heads: int | None = None, llm_mlp: int = 64, vocab_size: int = 64,
               feature_layer: int = -2, seed: int = 0, initializer_range: float = 0.1,
               attn_implementation: str = "sdpa"):
    """A random LlavaForConditionalGeneration in eval mode (float32)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    n_patches = (image_size // patch_size) ** 2
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_mlp,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                              image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden,
                              initializer_range=initializer_range)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=llm_hidden, intermediate_size=llm_mlp,
                       num_hidden_layers=llm_layers, num_attention_heads=llm_heads,
                       num_key_value_heads=llm_kv_heads or llm_heads, max_position_embeddings=4096,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, initializer_range=initializer_range)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, image_seq_length=n_patches,
                         vision_feature_layer=feature_layer, vision_feature_select_strategy="default")
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = PAD
    return model


# LLaVA-NeXT canvases of the tiny tower: 1x2, 2x1, 2x2, 3x1 and 1x3 crops of 28 px (as llava-v1.6's of 336 px)
TINY_NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


def tiny_llava_next(attention: str = "eager"):
    """A random LlavaNextForConditionalGeneration (28 px crops, patch 7: 16 patches + CLS a pass; GQA
    LLM) in eval mode, and its ModelDims."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    from ficoco.dims import ModelDims

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              image_size=28, patch_size=7, projection_dim=32)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE,
                             image_grid_pinpoints=TINY_NEXT_PINPOINTS, vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    model = LlavaNextForConditionalGeneration(config).eval()
    model.set_attn_implementation(attention)
    return model, ModelDims.from_config(config)


NEXT_BEFORE, NEXT_AFTER = [1, 10, 11], [12, 13, 14, 15]   # a LLaVA-NeXT prompt's text around the image
NEXT_TEXT = len(NEXT_BEFORE + NEXT_AFTER)


def next_prompt(dims, image_size):
    """Token ids of one prompt with the image span of an image of `image_size` on a LLaVA-NeXT of `dims`, and
    the image's tower passes."""
    layout = dims.anyres_layout(*image_size)
    return NEXT_BEFORE + [IMAGE] * layout.delivered + NEXT_AFTER, layout.tower_passes


def next_batch(dims, image_sizes, left_pad=True):
    """Left-padded input_ids / attention_mask, pixel_values (B, most passes, 3, 28, 28) and image_sizes."""
    prompts = [next_prompt(dims, size) for size in image_sizes]
    length = max(len(ids) for ids, _ in prompts)
    most = max(passes for _, passes in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, _) in enumerate(prompts):
        span = slice(length - len(prompt), length) if left_pad else slice(0, len(prompt))
        ids[row, span], mask[row, span] = torch.tensor(prompt), 1
    generator = torch.Generator().manual_seed(len(image_sizes))
    pixels = torch.randn(len(prompts), most, 3, 28, 28, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "image_sizes": torch.tensor(image_sizes)}


def save_tiny_llava_next(directory) -> str:
    """A tiny random LLaVA-NeXT model directory as a hub snapshot holds one (config, weights, processor) for
    the toy world's 96 px scenes: 32 px crops of 8 px patches (16 patches + CLS a pass), canvases of 1x2,
    2x1 and 2x2 crops, the toy word-level tokenizer. A 96 px square image: 5 passes, 88 visual tokens
    (16 base + 8x8 crop patches + 8 image-newlines). Returns the directory."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    from ficoco.toy.model import CLIP_MEAN, CLIP_STD, build_tokenizer

    tokenizer = build_tokenizer()
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32, initializer_range=0.1)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, initializer_range=0.1)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id,
                             image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                              image_grid_pinpoints=pinpoints, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    model.save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    return str(directory)


QWEN_VISION_START, QWEN_VISION_END, QWEN_VIDEO = 61, 62, 63


QWEN_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}


def qwen_tokenizer():
    """The toy world's word-level tokenizer with Qwen2-VL's image, video and vision start/end tokens."""
    from transformers import PreTrainedTokenizerFast

    from ficoco.toy.model import build_tokenizer

    toy = build_tokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=toy.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", extra_special_tokens=QWEN_TOKENS)


def tiny_qwen(model_type: str, *, patch_size: int = 14, window_size: int = 112, llm_layers: int = 4,
              attention: str = "eager", seed: int = 0, tokenizer=None):
    """A random Qwen2-VL ("qwen2_vl": 2 full-attention tower blocks) or Qwen2.5-VL ("qwen2_5_vl": 3 blocks, the
    middle one full, the others windowed) with a Qwen2 LLM of `llm_layers` layers (GQA 4/2 heads), patches
    merged 2 × 2; the image token is IMAGE, or `tokenizer`'s (`qwen_tokenizer()`: its vocabulary and special
    tokens). Returns (model, QwenVLDims)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    from ficoco.qwen_dims import QwenVLDims

    torch.manual_seed(seed)
    ids = dict(vocab_size=64, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, image_token_id=IMAGE,
               vision_start_token_id=QWEN_VISION_START, vision_end_token_id=QWEN_VISION_END, video_token_id=QWEN_VIDEO)
    if tokenizer is not None:
        ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id,
                   **{f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in QWEN_TOKENS.items()})
    text = dict(vocab_size=ids["vocab_size"], hidden_size=32, intermediate_size=48, num_hidden_layers=llm_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
                initializer_range=0.1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    geometry = dict(patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.1)
    if model_type == "qwen2_vl":
        vision = dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, **geometry)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=3, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                      window_size=window_size, fullatt_block_indexes=[1], **geometry)
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    config = config_class(vision_config=vision, text_config=text, image_token_id=ids["image_token_id"],
                          vision_start_token_id=ids["vision_start_token_id"],
                          vision_end_token_id=ids["vision_end_token_id"], video_token_id=ids["video_token_id"])
    model = model_class(config).eval()
    model.set_attn_implementation(attention)
    return model, QwenVLDims.from_config(config)


def save_tiny_qwen(directory, model_type: str) -> str:
    """A tiny random Qwen2-VL-family model directory as a hub snapshot holds one (config, weights, image
    processor, tokenizer) for the toy world's 96 px scenes: 8 px patches merged 2 × 2, so a scene is a 12 × 12
    patch grid and 36 visual tokens; Qwen2.5-VL's windows are 64 px (4 × 4 merged tokens: four windows a scene).
    Returns the directory."""
    from transformers import Qwen2VLImageProcessor

    from ficoco.toy.model import CLIP_MEAN, CLIP_STD

    tokenizer = qwen_tokenizer()
    model, _ = tiny_qwen(model_type, patch_size=8, window_size=64, llm_layers=3, attention="sdpa", tokenizer=tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = Qwen2VLImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2, image_mean=CLIP_MEAN,
                                            image_std=CLIP_STD)
    model.save_pretrained(str(directory))
    image_processor.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)


def qwen_inputs(dims, image_sizes: list[tuple[int, int]], before=(7, 8), after=(9, 10, 11, 12), seed: int = 1) -> dict:
    """What the processor hands a Qwen2-VL model: per row `before`, the image span between its start and end
    markers, `after`; random pixels per patch. Rows of one length (no padding): images of one size per batch
    unless the caller pads."""
    generator = torch.Generator().manual_seed(seed)
    rows, pixels, grids = [], [], []
    for height, width in image_sizes:
        grid = dims.patch_grid(height, width)
        rows.append([*before, QWEN_VISION_START, *[IMAGE] * dims.image_tokens(height, width), QWEN_VISION_END, *after])
        pixels.append(torch.randn(grid[0] * grid[1], dims.patch_features, generator=generator))
        grids.append([1, *grid])
    if len({len(row) for row in rows}) != 1:
        raise ValueError(f"qwen_inputs: images {image_sizes} give rows of different lengths; batch one size")
    ids = torch.tensor(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == IMAGE).int(),
            "pixel_values": torch.cat(pixels), "image_grid_thw": torch.tensor(grids)}


def masked_forward(model, ids, pixels, select=None, hidden_from=None, overwrite=None, **model_inputs):
    """The unmodified model without cache, keeping every token; dropped tokens are hidden as keys.

    `select[l](layer, hidden, kwargs, current_image, dropped) -> kept image positions` runs at the input
    of layer l (on this run's hidden states) and drops the rest from layer l on; `hidden_from[l]`
    gives a fixed set of dropped positions from layer l on instead; `overwrite[l]` maps positions
    to the values they hold at the input of layer l (new tokens). `model_inputs`: more inputs of the
    model (LLaVA-NeXT's image_sizes). Returns the logits (L, V), the kept image positions per reducing
    layer and the dropped positions.
    """
    length = ids.shape[1]
    image = [p for p in range(length) if ids[0, p] == IMAGE]
    dropped: set[int] = set()
    kept_at: dict[int, list[int]] = {}

    def mask_now():
        allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))
        allowed[:, sorted(dropped)] = False
        allowed |= torch.eye(length, dtype=torch.bool)  # a dropped query still sees itself (its output is unused)
        return allowed[None, None]

    def hook_for(index, layer):
        def pre_hook(module, args, kwargs):
            hidden = args[0]
            if overwrite and index in overwrite:
                hidden = hidden.clone()
                for position, value in overwrite[index].items():
                    hidden[0, position] = value
            if select and index in select:
                current = [p for p in image if p not in dropped]
                kept_at[index] = select[index](layer, hidden, kwargs, current, dropped)
                dropped.update(set(current) - set(kept_at[index]))
            if hidden_from and index in hidden_from:
                dropped.update(hidden_from[index])
            return ((hidden, *args[1:]), {**kwargs, "attention_mask": mask_now()}) if dropped else None
        return pre_hook

    hooks = [layer.register_forward_pre_hook(hook_for(i, layer), with_kwargs=True)
             for i, layer in enumerate(model.model.language_model.layers)]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixels, use_cache=False, **model_inputs).logits[0]
    finally:
        for hook in hooks:
            hook.remove()
    return logits, kept_at, dropped


# FlopCounterMode counts only these (matmuls and convolutions): element-wise work is out on both sides
COUNTED_OPS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.convolution"}


def counted(counter) -> dict:
    """FLOPs of the parts our formula covers, the global total, and the ops that contributed.

    Module names differ between a plain forward ("LlavaForConditionalGeneration.model.vision_tower...")
    and an adapter that encodes images itself inside generate ("CLIPVisionModel..."), so parts are
    matched by the end of the name.
    """
    by_module = counter.get_flop_counts()

    def total(pattern: str) -> int:
        return sum(sum(ops.values()) for name, ops in by_module.items() if re.search(pattern, name))

    vision = total(r"(\.vision_tower|^CLIPVisionModel)$")
    projector = total(r"(multi_modal_projector|^LlavaMultiModalProjector)$")
    prefill = total(r"language_model\.layers\.\d+\.(self_attn|mlp)$") + total(r"lm_head$")
    return {
        "ops": {str(op) for op in by_module["Global"]},
        "total": total(r"^Global$"),
        "vision": vision,
        "projector": projector,
        "prefill": prefill,
        "covered": vision + projector + prefill,
    }



@contextmanager
def eager_attention(module):
    """Run `module` (a vision tower or language model) with eager attention, then back to SDPA."""
    module.set_attn_implementation("eager")
    try:
        yield module
    finally:
        module.set_attn_implementation("sdpa")


def llava_shaped(**overrides):
    """LLaVA-1.5 token geometry (577 vision tokens, 576 placeholders) with small, few layers."""
    shape = dict(image_size=336, patch_size=14, vision_layers=4, vision_hidden=64, vision_heads=4, vision_mlp=128,
                 llm_layers=4, llm_hidden=64, llm_heads=4, llm_mlp=128)
    shape.update(overrides)
    return tiny_llava(**shape)


def prompt(n_image_tokens: int, before: list[int], after: list[int]) -> list[int]:
    """BOS, text before the image, the image placeholders, the instruction after it."""
    return [BOS, *before, *([IMAGE] * n_image_tokens), *after]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (B, L) of prompts left-padded to the longest."""
    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, tokens in enumerate(prompts):
        ids[row, length - len(tokens):] = torch.tensor(tokens)
        mask[row, length - len(tokens):] = 1
    return ids, mask


def float64_layer_probabilities(model, ids, pixels, layer_index: int) -> torch.Tensor:
    """Per-head causal attention probabilities (H, L, L) of LLM layer `layer_index`, recomputed in
    float64 from its input (captured by a pre-hook on the unpatched model)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    layer = model.model.language_model.layers[layer_index]
    seen = {}

    def pre_hook(module, args, kwargs):
        seen["hidden"], seen["rope"] = args[0], kwargs["position_embeddings"]

    hook = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pixels)
    finally:
        hook.remove()
    attention, length = layer.self_attn, ids.shape[1]
    with torch.no_grad():
        hidden = layer.input_layernorm(seen["hidden"])
        q = attention.q_proj(hidden).view(1, length, -1, attention.head_dim).transpose(1, 2)
        k = attention.k_proj(hidden).view(1, length, -1, attention.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *seen["rope"])
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.double() @ k.double().transpose(-1, -2)) * attention.scaling
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)[0]


def images(n: int, image_size: int, seed: int = 1) -> torch.Tensor:
    """(n, 3, size, size) random pixel values."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, image_size, image_size, generator=generator)


def one_image_prompt(model, before: list[int], after: list[int], seed: int = 1):
    """input_ids (1, L), its attention mask and one random image (1, 3, size, size) for `model`."""
    ids = torch.tensor([prompt(n_placeholders(model), before, after)])
    return ids, torch.ones_like(ids), images(1, model.config.vision_config.image_size, seed=seed)


def n_placeholders(model) -> int:
    """Image placeholders the processor would insert per image ("default" strategy drops CLS)."""
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def generate_batch_and_alone(model, handle, prompts: list[list[int]], pixels: torch.Tensor,
                             max_new_tokens: int = 3):
    """Greedy `generate` of the prompts as one left-padded batch, then each prompt alone, under the
    installed `handle`. Asserts what every method must give: each row's new tokens, logits and token
    counts equal those of the prompt run alone. Returns (ids, batched output, batched counts, the
    output and the counts of each prompt alone) for the method-specific checks."""
    def generate(ids, mask, pixel_values):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                                  max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)

    ids, mask = left_padded(prompts)
    batched = generate(ids, mask, pixels)
    batched_counts = handle.last_counts()
    singles, alone_counts = [], []
    for row, tokens in enumerate(prompts):
        single_ids = torch.tensor([tokens])
        single = generate(single_ids, torch.ones_like(single_ids), pixels[row:row + 1])
        singles.append(single)
        assert torch.equal(batched.sequences[row, ids.shape[1]:], single.sequences[0, len(tokens):])
        torch.testing.assert_close(torch.stack(batched.logits, 1)[row], torch.stack(single.logits, 1)[0],
                                   rtol=1e-4, atol=1e-5)
        alone_counts.append(handle.last_counts()[0])
        assert batched_counts[row] == alone_counts[-1]              # padding excluded from the counts
    return ids, batched, batched_counts, singles, alone_counts


def pretend_transformers_version(monkeypatch, version: str) -> None:
    """Make `transformers.__version__` read `version`. The module object in sys.modules is patched:
    transformers 5.24 replaces it when a model class is first imported, so a reference taken at import
    time may be stale."""
    import sys

    from transformers import LlavaForConditionalGeneration  # noqa: F401 - settle the module object first

    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)


def reference_quantile(values, q: float) -> float:
    """Linear-interpolation quantile (numpy/torch 'linear') by hand: the loop the references compare with."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


TEXT_END = 3        # the tiny text tower pools at this id ("."), as the toy's pools at its captions' "."


def tiny_word_tokenizer(vocab_size: int = 64):
    """A word-level tokenizer over the tiny models' ids: <pad> <s> </s> . <unk> <image> w6 .. w{n-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", ".", "<unk>", "<image>", *(f"w{i}" for i in range(6, vocab_size))]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def text_tower_for(model, method: str, **options):
    """The tiny text tower (`tiny_text_tower`) a method that reads the instruction needs; None for any other."""
    import tempfile

    from ficoco import methods

    if not methods.get(method).needs_text_tower:
        return None
    with tempfile.TemporaryDirectory() as directory:        # loading reads everything into memory
        return tiny_text_tower(model, directory, **options)


def tiny_text_tower(model, directory, template: str = "<image>{prompt}", context: int = 8, seed: int = 0,
                    vision_weights: bool = True):
    """A random CLIP checkpoint beside a tiny LLaVA, saved to `directory` and loaded as its text tower.

    Its vision model carries the LLaVA tower's weights (`vision_weights=False`: its own random ones);
    its text tower has `context` positions, so a longer instruction is split into segments.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    from ficoco.dims import ModelDims
    from ficoco.models.companion import load_text_tower

    vocab = model.config.text_config.vocab_size
    text = CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=context, pad_token_id=PAD, bos_token_id=BOS,
                          eos_token_id=TEXT_END, initializer_range=0.1)
    vision = model.config.vision_config.to_dict()
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=16)).eval()
    if vision_weights:
        clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())
    tokenizer = tiny_word_tokenizer(vocab)
    clip.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return load_text_tower(directory, tokenizer, template, model.model.vision_tower,
                           ModelDims.from_config(model.config).last_vision_layer)


def emulate_cuda_graphs(monkeypatch, replayed=lambda logits: logits) -> list:
    """`static_decode.greedy_decode(graph=True)` on the CPU: the side-stream warm-up runs the step, a capture
    records it without running it, and a replay runs it into the one logits tensor the capture returned
    (`replayed(logits)` of the step's own: a test may perturb them). Returns the list of captured steps."""
    from ficoco.models import static_decode

    captures = []

    def captured(step):
        captures.append(step)
        logits = torch.empty(0)          # written in place by every replay: one tensor, as a capture's output

        def replay():
            new = replayed(step())
            logits.resize_(new.shape).copy_(new)
        return replay, logits

    monkeypatch.setattr(static_decode, "_check_graph_device", lambda device: None)
    monkeypatch.setattr(static_decode, "_on_side_stream", lambda step: step())
    monkeypatch.setattr(static_decode, "_captured", captured)
    return captures


class HostReads(TorchFunctionMode):
    """Records every torch call that hands a device value to the host, or copies host data to the device, while
    `active()` holds: on a GPU each waits for all the work queued before it, and a CUDA graph capture cannot
    record one. `reads`: each as "function at file:line" (the innermost frame of ficoco or transformers)."""
    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere",
             "masked_select", "unique", "unique_consecutive", "equal", "allclose", "tensor", "as_tensor", "cpu",
             "numpy"}

    def __init__(self, active=lambda: True):
        super().__init__()
        self.active, self.reads = active, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.active() and self._reads(getattr(func, "__name__", ""), args):
            frames = [frame for frame in traceback.extract_stack()[:-1]
                      if "/ficoco/" in frame.filename or "/transformers/" in frame.filename]
            site = f"{frames[-1].filename.rsplit('/', 2)[-1]}:{frames[-1].lineno}" if frames else "?"
            self.reads.append(f"{getattr(func, '__name__', func)} at {site}")
        return func(*args, **(kwargs or {}))

    def _reads(self, name: str, args) -> bool:
        if name in ("tensor", "as_tensor"):             # an empty tensor copies nothing
            return not (args and hasattr(args[0], "__len__") and len(args[0]) == 0)
        if name in ("__getitem__", "__setitem__"):      # a boolean mask index has a data-dependent size
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in index)
        return name in self.READS


def bench_shaped_model():
    """`ficoco gpu-bench --shape tiny`'s model: LLaVA-1.5-7B's token geometry (577 tower tokens, 576 image tokens)
    with 4 + 4 narrow layers, random weights, float32, SDPA."""
    import tempfile
    from pathlib import Path

    from ficoco.gpu_bench import shape_config
    from ficoco.measure import build_random_model

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        shape_config("tiny").to_json_file(str(path))
        return build_random_model(path, "float32", "cpu", "sdpa", 0)

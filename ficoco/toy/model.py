"""The toy LLaVA: the same transformers classes as LLaVA-1.5, shrunk to train on 2 CPU cores.

- vision tower: `CLIPVisionConfig` (CLS + 12 x 12 patch grid of a 96 px image, patch 8)
- projector: LLaVA's 2-layer GELU MLP
- language model: `LlamaConfig` decoder
- tokenizer: `PreTrainedTokenizerFast` over a `tokenizers` WordLevel model whose vocabulary is the
  toy world's words + the prompt template words + `<image>`
- processor: `CLIPImageProcessor` + `LlavaProcessor` (one `<image>` -> 144 placeholders)

`vision_feature_layer = -2` and `vision_feature_select_strategy = "default"` as in LLaVA-1.5.
"""
from __future__ import annotations

import hashlib
import json

from ficoco.toy import shapes

MODEL_ID = "ficoco/toy-llava"
# The prompt the toy model is trained with; the evaluate job puts the benchmark prompt at {prompt}.
PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: "
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Weight init std. HF's 0.02 leaves attention uniform over the 144 image tokens, so the answer
# signal from one object patch is diluted ~150x and training stalls; 0.1 lets it start.
INIT_RANGE = 0.1
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]      # ids 0..4
TEMPLATE_WORDS = ["user", ":", "assistant"]                         # template, after lower-casing

# name -> architecture; "default" is the toy world's model, "small" a fast variant for tests
SIZES: dict[str, dict] = {
    "default": dict(vision_hidden=32, vision_mlp=64, vision_layers=6, vision_heads=2,
                    llm_hidden=64, llm_mlp=128, llm_layers=6, llm_heads=4),
    "small": dict(vision_hidden=32, vision_mlp=64, vision_layers=4, vision_heads=2,
                  llm_hidden=64, llm_mlp=128, llm_layers=4, llm_heads=2),
}
# How the model is trained (ficoco/toy/train.py): all parts together, or in LLaVA-1.5's stages
RECIPES = ("end-to-end", "staged")
# The CLIP text encoder the tower is pretrained against (stage 1); the LLaVA model does not use it.
TEXT_ENCODER = dict(hidden=32, mlp=64, layers=2, heads=2, max_words=32)


def vocabulary() -> list[str]:
    """Token strings in id order: specials, template words, then the toy world's words."""
    words = list(SPECIAL_TOKENS)
    for word in TEMPLATE_WORDS + shapes.vocabulary():
        if word not in words:
            words.append(word)
    return words


def image_token_id() -> int:
    return SPECIAL_TOKENS.index("<image>")


def vocab_size() -> int:
    return 8 * ((len(vocabulary()) + 7) // 8)                       # round up to a multiple of 8


def vision_config(size: str = "default"):
    """The CLIP vision tower's config: shared by the LLaVA model and the CLIP model it is pretrained in."""
    from transformers import CLIPVisionConfig

    if size not in SIZES:
        raise ValueError(f"size={size!r}: valid sizes are {sorted(SIZES)}")
    dims = SIZES[size]
    return CLIPVisionConfig(
        hidden_size=dims["vision_hidden"], intermediate_size=dims["vision_mlp"],
        num_hidden_layers=dims["vision_layers"], num_attention_heads=dims["vision_heads"],
        image_size=shapes.IMAGE_SIZE, patch_size=shapes.CELL, projection_dim=dims["vision_hidden"],
        hidden_act="quick_gelu", initializer_range=INIT_RANGE,
    )


def toy_clip_config(size: str = "default"):
    """`CLIPConfig` of the tower's pretraining: the LLaVA tower + a small text encoder over captions.

    The text encoder pools at the caption's end word ("."), as CLIP pools at its end-of-text token
    (with eos_token_id 2, `</s>` here, transformers would fall back to the legacy argmax pooling).
    """
    from transformers import CLIPConfig, CLIPTextConfig

    vision = vision_config(size)
    text = CLIPTextConfig(
        vocab_size=vocab_size(), hidden_size=TEXT_ENCODER["hidden"], intermediate_size=TEXT_ENCODER["mlp"],
        num_hidden_layers=TEXT_ENCODER["layers"], num_attention_heads=TEXT_ENCODER["heads"],
        max_position_embeddings=TEXT_ENCODER["max_words"], hidden_act="quick_gelu", initializer_range=INIT_RANGE,
        pad_token_id=0, bos_token_id=1, eos_token_id=vocabulary().index(shapes.CAPTION_END),
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      projection_dim=vision.projection_dim, initializer_range=INIT_RANGE)


def toy_llava_config(size: str = "default"):
    """The `LlavaConfig` of the toy model (random weights are built from it by `build_model`)."""
    from transformers import LlamaConfig, LlavaConfig

    if size not in SIZES:
        raise ValueError(f"size={size!r}: valid sizes are {sorted(SIZES)}")
    dims = SIZES[size]
    num_patches = shapes.GRID * shapes.GRID
    text = LlamaConfig(
        vocab_size=vocab_size(), hidden_size=dims["llm_hidden"], intermediate_size=dims["llm_mlp"],
        num_hidden_layers=dims["llm_layers"], num_attention_heads=dims["llm_heads"],
        num_key_value_heads=dims["llm_heads"], max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        initializer_range=INIT_RANGE,
    )
    return LlavaConfig(
        vision_config=vision_config(size), text_config=text, image_token_id=image_token_id(),
        image_seq_length=num_patches, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        initializer_range=INIT_RANGE,
    )


def config_hash(config) -> str:
    """sha256 (16 hex) of the config's JSON, independent of transformers' bookkeeping fields."""
    data = config.to_dict()
    for key in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_tokenizer():
    """Word-level fast tokenizer: lower-cases, splits on whitespace and punctuation, prepends <s>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = vocabulary()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()             # "USER:" -> "user", ":"
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", words.index("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
    )


def build_processor():
    """`LlavaProcessor` with a CLIP image processor at the toy image size (no resize/crop effect)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = shapes.IMAGE_SIZE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=shapes.CELL,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(seed: int, size: str = "default"):
    """Random-weight toy LLaVA, initialised deterministically from `seed`; in eval mode."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(toy_llava_config(size))
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    return model.eval()


def build_clip(seed: int, size: str = "default"):
    """Random-weight `CLIPModel` (tower + text encoder + projections), initialised from `seed`."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(toy_clip_config(size)).eval()


def build_clip_processor():
    """`CLIPProcessor` for the CLIP model: the same image processor and word-level tokenizer as the LLaVA one."""
    from transformers import CLIPProcessor

    llava = build_processor()
    return CLIPProcessor(image_processor=llava.image_processor, tokenizer=llava.tokenizer)


def pixel_values(images: list, processor) -> torch.Tensor:
    """(B, 3, H, W) float32, exactly the CLIP processor's rescale + normalise (no resize: size matches).

    images: PIL images or (H, W, 3) uint8 arrays (`shapes.batch_pixels`). Training builds its batches
    with this instead of calling the processor per image (faster). A uint8 pixel has 256 values, so
    each channel's (v · rescale − mean) / std is computed once per value, in float32 as the processor
    computes it, and looked up.
    """
    import numpy as np
    import torch

    ip = processor.image_processor
    array = np.stack([np.asarray(image) for image in images])                       # (B, H, W, 3)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"pixel_values: images must be RGB uint8 (H, W, 3); got {array.dtype} {array.shape[1:]}")
    values = np.arange(256, dtype=np.float32)[:, None]                              # (256, 1)
    table = ((values * np.float32(ip.rescale_factor) - np.asarray(ip.image_mean, np.float32))
             / np.asarray(ip.image_std, np.float32)).T.copy()                       # (3, 256)
    return torch.from_numpy(np.stack([np.take(table[channel], array[..., channel]) for channel in range(3)],
                                     axis=1))                                       # (B, 3, H, W)


def prompt_text(question: str) -> str:
    """The full prompt string for one question (what the evaluate job builds from the template)."""
    return PROMPT_TEMPLATE.format(prompt=question)

"""Model adapters: attach a method (ficoco.methods) to a model family through hooks.

All knowledge of HF internals lives here. Supported: transformers' `LlavaForConditionalGeneration`
(LLaVA-1.5: CLIP vision tower + Llama decoder), `LlavaNextForConditionalGeneration` (llava_next.py:
unreduced, a method on each crop, inside the LLM, or both) and Qwen2-VL / Qwen2.5-VL (qwen_vl.py: unreduced
or inside the LLM), on the transformers versions in
`guard.TESTED_TRANSFORMERS`; any other version is refused, or self-checked (selfcheck.py) when
FICOCO_ALLOW_UNTESTED_TRANSFORMERS=1 (docs/contracts.md §7).
"""
from __future__ import annotations

# a config's model_type -> the transformers class of that family that `apply` supports
MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                 "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}

# a config's model_type -> the text that stands for one image in its prompts (the processor expands the image
# token to the image's placeholders): a prompt template's `<image>` becomes it
QWEN_IMAGE_MARKER = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_MARKERS = {"llava": "<image>", "llava_next": "<image>", "qwen2_vl": QWEN_IMAGE_MARKER,
                 "qwen2_5_vl": QWEN_IMAGE_MARKER}


def model_class(model_type: str):
    """The transformers class to load a model of `model_type` with (ValueError for another family)."""
    import transformers

    if model_type not in MODEL_CLASSES:
        raise ValueError(f"model_type {model_type!r} is not a supported model family; valid: "
                         f"{', '.join(MODEL_CLASSES)}")
    return getattr(transformers, MODEL_CLASSES[model_type])


def apply(model, method, budget: int | None = None, text_tower=None, **overrides):
    """Install `method` (a `ficoco.methods.base.Method`) at `budget` on `model`; returns the handle. `budget`:
    visual tokens (of the nominal image where images differ in size), or on Qwen2-VL-family models also
    `ficoco.budget_labels.ImageTokens(n)`, n for every image.

    Adapters never import the method registry or a method's module (tests/test_contract.py):
    `ficoco.apply` resolves a method's name before it gets here. `text_tower`: the CLIP text tower a
    method that reads the instruction needs (ficoco/models/companion.py)."""
    from transformers import (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                              Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration)

    from ficoco.budget_labels import ImageTokens

    qwen = isinstance(model, (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration))
    if isinstance(budget, ImageTokens) and not qwen:
        raise ValueError(f"budget {budget.label} ({budget.describe()}) runs on Qwen2-VL-family models; on "
                         f"{type(model).__name__} give visual tokens of the nominal image (an integer)")
    if isinstance(model, LlavaForConditionalGeneration):
        from ficoco.models.llava import apply_llava

        return apply_llava(model, method, budget, text_tower=text_tower, **overrides)
    if isinstance(model, LlavaNextForConditionalGeneration):
        from ficoco.models.llava_next import apply_llava_next

        return apply_llava_next(model, method, budget, text_tower=text_tower, **overrides)
    if qwen:
        from ficoco.models.qwen_vl import apply_qwen_vl

        return apply_qwen_vl(model, method, budget, text_tower=text_tower, **overrides)
    raise TypeError(f"ficoco.apply: unsupported model class {type(model).__name__}; supported: "
                    f"{', '.join(MODEL_CLASSES.values())}")


__all__ = ["IMAGE_MARKERS", "MODEL_CLASSES", "apply", "model_class"]

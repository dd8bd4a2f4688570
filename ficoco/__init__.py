"""ficoco: training-free visual token reduction for multimodal LLMs (filter -> correlate -> compress)."""
from __future__ import annotations

from ficoco.budget_labels import ImageTokens

__version__ = "0.1.0"


def apply(model, method, budget: int | ImageTokens | None = None, text_tower=None, **overrides):
    """Install a token-reduction method on a HF LLaVA model; returns a handle with `.remove()`.

    `method` is a registered name (`ficoco methods`) or a `ficoco.methods.base.Method`.
    `budget` is the average number of visual tokens per LLM decoder layer (None = unreduced); where
    images differ in size (LLaVA-NeXT, Qwen2-VL), of the nominal image, every image keeping that fraction
    of its own; on Qwen2-VL-family models also `ficoco.ImageTokens(n)`: n for every image.
    Extra keyword arguments override the method's hyperparameters (see `ficoco methods`).
    `text_tower` is the CLIP text tower a method that reads the instruction needs (CDPruner;
    `ficoco.models.companion.load_text_tower`).
    """
    from ficoco import methods
    from ficoco.models import apply as apply_to_model

    return apply_to_model(model, methods.get(method), budget, text_tower=text_tower, **overrides)


__all__ = ["ImageTokens", "apply"]

"""ficoco: training-free visual token reduction for multimodal LLMs (filter -> correlate -> compress)."""
from __future__ import annotations

__version__ = "0.1.0"


def apply(model, method, budget: int | None = None, text_tower=None, **overrides):
    """Install a token-reduction method on a HF LLaVA model; returns a handle with `.remove()`.

    `method` is a registered name (`ficoco methods`) or a `ficoco.methods.base.Method`.
    `budget` is the average number of visual tokens per LLM decoder layer (None = unreduced).
    Extra keyword arguments override the method's hyperparameters (see `ficoco methods`).
    `text_tower` is the CLIP text tower a method that reads the instruction needs (CDPruner;
    `ficoco.models.companion.load_text_tower`).
    """
    from ficoco import methods
    from ficoco.models import apply as apply_to_model

    return apply_to_model(model, methods.get(method), budget, text_tower=text_tower, **overrides)

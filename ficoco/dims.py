"""Model dimensions that budgets, schedules and FLOPs need, read from a HF LLaVA config.

One place knows how to read them, so `budget.py`, `flops.py` and the adapters agree.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict


@dataclass(frozen=True)
class ModelDims:
    # vision tower (CLIP-style: CLS + patch grid)
    vision_layers: int          # encoder layers in the checkpoint (24 for CLIP ViT-L/14-336)
    vision_hidden: int          # d_v
    vision_mlp: int             # m_v
    vision_heads: int
    image_size: int             # pixels per side
    patch_size: int
    feature_layer: int          # index into hidden_states (-2 for LLaVA-1.5)
    select_strategy: str        # "default" drops CLS, "full" keeps it
    # language model (Llama-style: SwiGLU, RoPE)
    llm_layers: int
    llm_hidden: int
    llm_mlp: int
    llm_heads: int
    llm_kv_heads: int
    vocab_size: int
    projector_hidden: int       # width of the projector's hidden layer (= llm_hidden in LLaVA-1.5)

    @property
    def grid_side(self) -> int:
        """Patches per side of the square patch grid (24 for 336/14)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_side ** 2

    @property
    def vision_tokens(self) -> int:
        """Tokens inside the vision tower: CLS + patches (577 for LLaVA-1.5)."""
        return self.num_patches + 1

    @property
    def visual_tokens(self) -> int:
        """Visual tokens the unreduced LLM receives per image (576 for LLaVA-1.5)."""
        return self.num_patches + (0 if self.select_strategy == "default" else 1)

    @property
    def last_vision_layer(self) -> int:
        """0-based index of the last encoder layer whose output LLaVA reads (22 for LLaVA-1.5).

        hidden_states[0] is the embedding output, hidden_states[i + 1] the output of layer i,
        so feature_layer = -2 of 25 hidden states is the output of layer 22.
        """
        index = self.feature_layer if self.feature_layer >= 0 else self.vision_layers + 1 + self.feature_layer
        return index - 1

    @property
    def vision_layers_run(self) -> int:
        """Encoder layers that must run to produce the selected features (23 for LLaVA-1.5)."""
        return self.last_vision_layer + 1

    def to_dict(self) -> dict:
        return asdict(self)

    def image_layout(self):
        """The `ficoco.contract.ImageLayout` of one image (LLaVA-1.5: one square crop behind a CLS token)."""
        from ficoco.contract import CropLayout, ImageLayout

        return ImageLayout(crops=(CropLayout(grid=(self.grid_side, self.grid_side), prefix=1),),
                           prefix_delivered=self.select_strategy != "default", layout_tokens=0, positions="rope-1d")

    @classmethod
    def from_config(cls, config) -> "ModelDims":
        """From a `LlavaConfig` (object or dict, as in config.json)."""
        if isinstance(config, dict):
            from transformers import LlavaConfig
            config = LlavaConfig(**config)
        vision, text = config.vision_config, config.text_config
        feature_layer = config.vision_feature_layer
        if isinstance(feature_layer, (list, tuple)):
            raise ValueError(f"vision_feature_layer={feature_layer!r}: only a single layer is supported")
        return cls(
            vision_layers=vision.num_hidden_layers,
            vision_hidden=vision.hidden_size,
            vision_mlp=vision.intermediate_size,
            vision_heads=vision.num_attention_heads,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            feature_layer=feature_layer,
            select_strategy=config.vision_feature_select_strategy,
            llm_layers=text.num_hidden_layers,
            llm_hidden=text.hidden_size,
            llm_mlp=text.intermediate_size,
            llm_heads=text.num_attention_heads,
            llm_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            vocab_size=text.vocab_size,
            projector_hidden=text.hidden_size,
        )


def llava_1_5_dims(size: str = "7b") -> ModelDims:
    """The published LLaVA-1.5 shapes (7b or 13b), for FLOPs tables and benchmarks without weights."""
    llm = {"7b": (32, 4096, 11008, 32), "13b": (40, 5120, 13824, 40)}
    if size not in llm:
        raise ValueError(f"size={size!r}: valid sizes are {sorted(llm)}")
    layers, hidden, mlp, heads = llm[size]
    return ModelDims(
        vision_layers=24, vision_hidden=1024, vision_mlp=4096, vision_heads=16,
        image_size=336, patch_size=14, feature_layer=-2, select_strategy="default",
        llm_layers=layers, llm_hidden=hidden, llm_mlp=mlp, llm_heads=heads, llm_kv_heads=heads,
        vocab_size=32000, projector_hidden=hidden,
    )

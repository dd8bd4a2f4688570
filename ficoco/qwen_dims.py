"""Shapes of the Qwen2-VL family (Qwen2-VL, Qwen2.5-VL), for exact FLOPs without weights.

What differs from LLaVA (`ficoco.dims.ModelDims`), and what the cost depends on:
- dynamic resolution: the image is resized to multiples of patch_size · merge_size (28 px) inside a pixel
  range (`resized`, transformers' `smart_resize`), so the tower's patch grid and the LLM's visual token
  count follow the image's size;
- a tower without CLS: one token per patch of temporal_patch_size frames (a still image is repeated to 2)
  × patch_size² pixels × in_channels, embedded by one Conv3d;
- attention inside the tower per image (Qwen2-VL), or per window of window_size pixels in all layers but
  `full_attention_layers` (Qwen2.5-VL);
- a patch merger: each merge_size × merge_size block of patches becomes one LLM token through a norm and a
  two-layer MLP (4·d_v → 4·d_v → d);
- a Qwen2 LLM (GQA, SwiGLU), with the same field names as ModelDims so flops.py's LLM formulas apply.

Issue 19: the geometry and the exact cost (docs/flops.md §6), and what a method plans one image's LLM
reduction with (`for_image_span`, `image_layout`; docs/methods.md, "On Qwen2-VL and Qwen2.5-VL").
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from ficoco.budget import image_budget

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# transformers' Qwen2VLImageProcessor defaults: at least 56² pixels, at most 1,280 LLM tokens of 28² pixels
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280


@dataclass(frozen=True)
class QwenVLDims:
    model_type: str                     # "qwen2_vl" or "qwen2_5_vl"
    # vision tower (no CLS; one token per patch)
    vision_layers: int                  # 32 in both 7B towers
    vision_hidden: int                  # d_v (1280)
    vision_mlp: int                     # m_v (5120 in Qwen2-VL, 3420 in Qwen2.5-VL)
    vision_mlp_matrices: int            # 2: fc1, fc2 (Qwen2-VL, GELU); 3: gate, up, down (Qwen2.5-VL, SwiGLU)
    vision_heads: int
    patch_size: int                     # 14
    temporal_patch_size: int            # 2: a still image counts as two frames
    merge_size: int                     # 2: 2 × 2 patches per LLM token
    in_channels: int                    # 3
    window_size: int                    # attention window side in pixels (112); 0 = full attention everywhere
    full_attention_layers: tuple[int, ...]   # Qwen2.5-VL: (7, 15, 23, 31); the other layers are windowed
    # language model (Qwen2)
    llm_layers: int
    llm_hidden: int
    llm_mlp: int
    llm_heads: int
    llm_kv_heads: int
    vocab_size: int
    # the processor's pixel range (dynamic resolution)
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    # in the dims a method plans one image's reduction with (`for_image_span`, `for_image_grid`): that image's
    # visual tokens in the LLM, and its patch grid (rows, cols) where known; None = the nominal image
    image_span: int | None = None
    image_grid: tuple[int, int] | None = None

    # -- what a method plans with (the names of ficoco.dims.ModelDims) ---------------------------------
    @property
    def nominal_grid(self) -> tuple[int, int]:
        """The patch grid of the nominal image: the most LLM tokens the processor gives an image
        (max_pixels / 28² = 1,280), on the squarest grid of merged blocks with that many (32 × 40 blocks,
        64 × 80 patches, an 896 × 1120 image). Budgets are stated on it, as the paper's 600 / 500 / 400."""
        tokens = self.max_pixels // self.factor ** 2
        rows = max(divisor for divisor in range(1, math.isqrt(tokens) + 1) if tokens % divisor == 0)
        return rows * self.merge_size, tokens // rows * self.merge_size

    @property
    def visual_tokens(self) -> int:
        """Visual tokens the unreduced LLM receives for the image planned for: `image_span`, or the nominal
        image's 1,280."""
        if self.image_span is not None:
            return self.image_span
        rows, columns = self.nominal_grid
        return rows * columns // self.merge_size ** 2

    @property
    def nominal_visual_tokens(self) -> int:
        """The nominal image's visual tokens (1,280), also in the dims of one image's span: what a budget or a
        fitted schedule is stated on."""
        return replace(self, image_span=None).visual_tokens

    @property
    def vision_tokens(self) -> int:
        """Tokens inside the tower for the image planned for: its patches (merge² per visual token, no CLS)."""
        return self.visual_tokens * self.merge_size ** 2

    @property
    def vision_layers_run(self) -> int:
        """Tower blocks that run: all of them (the merger reads the last)."""
        return self.vision_layers

    @property
    def last_vision_layer(self) -> int:
        """0-based index of the tower block whose output the merger reads: the last."""
        return self.vision_layers - 1

    # -- what a reduction inside the tower keeps or drops (the names of ficoco.dims.ModelDims) ---------
    @property
    def tower_units(self) -> int:
        """Units a reduction inside the tower keeps or drops: the merge groups (merge_size x merge_size
        patches, consecutive in the tower's sequence), one per LLM visual token, so the merger still reads
        whole groups and a budget in LLM tokens is a count of units."""
        return self.visual_tokens

    @property
    def tower_prefix(self) -> int:
        """Tower tokens before the units: none (no CLS)."""
        return 0

    @property
    def patches_per_unit(self) -> int:
        """Tower tokens per unit: merge_size² patches (4)."""
        return self.merge_size ** 2

    @property
    def unit_grid(self) -> tuple[int, int]:
        """(rows, cols) of the units (merge groups) on the image planned for: its patch grid / merge_size."""
        if self.image_grid is not None:
            rows, columns = self.image_grid
        elif self.image_span is None:
            rows, columns = self.nominal_grid
        else:
            raise ValueError(f"these dims plan an image of {self.image_span} tokens without its patch grid; a "
                             f"reduction inside the tower is planned on the grid (`for_image_grid`)")
        return rows // self.merge_size, columns // self.merge_size

    def attends_whole_image(self, layer: int) -> bool:
        """Whether tower block `layer` attends over the whole image: every block of Qwen2-VL's tower;
        Qwen2.5-VL's `full_attention_layers` only (the others attend within windows)."""
        return not self.window_size or layer in self.full_attention_layers

    @property
    def image_grid_pinpoints(self) -> tuple:
        """No AnyRes canvases: one image is one crop (the planning code's test for LLaVA-NeXT)."""
        return ()

    def for_image_span(self, span: int) -> "QwenVLDims":
        """These dims for planning the LLM reduction of one image of `span` visual tokens."""
        if span < 1:
            raise ValueError(f"image span {span}: an image has at least one visual token")
        return replace(self, image_span=int(span), image_grid=None)

    def for_image_grid(self, grid: tuple[int, int]) -> "QwenVLDims":
        """These dims for planning the reduction of one image whose patch grid is `grid` (rows, cols): its span
        and, for a reduction inside the tower, its units' grid."""
        rows, columns = (int(side) for side in grid)
        if rows < self.merge_size or columns < self.merge_size or rows % self.merge_size or columns % self.merge_size:
            raise ValueError(f"patch grid {rows}x{columns}: both sides must be positive multiples of the merge size "
                             f"{self.merge_size}")
        return replace(self, image_span=rows * columns // self.merge_size ** 2, image_grid=(rows, columns))

    def image_layout(self):
        """The `ficoco.contract.ImageLayout` a method must handle on this model: the nominal image, one crop of
        patches without a CLS token, every merged token delivered, no layout tokens, 3-D M-RoPE positions."""
        from ficoco.contract import CropLayout, ImageLayout

        return ImageLayout(crops=(CropLayout(grid=self.nominal_grid, prefix=0),), prefix_delivered=False,
                           layout_tokens=0, positions="mrope-3d")

    @property
    def factor(self) -> int:
        """Pixels per side of one LLM token (28): image sides are resized to multiples of it."""
        return self.patch_size * self.merge_size

    @property
    def patch_features(self) -> int:
        """Input features of one patch: in_channels · temporal_patch_size · patch_size² (1,176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the processor resizes an image to, as transformers' `smart_resize`: sides
        rounded to multiples of `factor`, then scaled (keeping the aspect ratio) into [min_pixels, max_pixels]."""
        if height < 1 or width < 1:
            raise ValueError(f"image size {height}x{width}: both sides must be at least 1 pixel")
        if max(height, width) / min(height, width) > 200:
            raise ValueError(f"image size {height}x{width}: the aspect ratio must be at most 200 (the processor "
                             f"refuses wider images)")
        factor = self.factor
        resized_height, resized_width = round(height / factor) * factor, round(width / factor) * factor
        if resized_height * resized_width > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            resized_height = max(factor, math.floor(height / beta / factor) * factor)
            resized_width = max(factor, math.floor(width / beta / factor) * factor)
        elif resized_height * resized_width < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            resized_height = math.ceil(height * beta / factor) * factor
            resized_width = math.ceil(width * beta / factor) * factor
        return resized_height, resized_width

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of the tower's patch grid for an image of this size: `image_grid_thw`'s h and w."""
        resized_height, resized_width = self.resized(height, width)
        return resized_height // self.patch_size, resized_width // self.patch_size

    def image_tokens(self, height: int, width: int) -> int:
        """LLM visual tokens of an image of this size: its patches / merge_size²."""
        rows, columns = self.patch_grid(height, width)
        return rows * columns // self.merge_size ** 2

    def attention_spans(self, grid: tuple[int, int], layer: int) -> list[int]:
        """Lengths of the sequences one tower layer's attention runs over, for one image's patch grid.

        Full attention: the whole image. Qwen2.5-VL's windowed layers: windows of
        window_size / patch_size patches per side, cut from the top-left over the grid of merged 2 × 2 blocks
        (the last row and column of windows hold the rest), as transformers' `get_vision_window_index`."""
        rows, columns = grid
        if not self.window_size or layer in self.full_attention_layers:
            return [rows * columns]
        side = self.window_size // self.factor                   # merged blocks per window side (4)
        block_rows, block_columns = rows // self.merge_size, columns // self.merge_size

        def cuts(blocks: int) -> list[int]:
            return [side] * (blocks // side) + ([blocks % side] if blocks % side else [])
        return [r * c * self.merge_size ** 2 for r in cuts(block_rows) for c in cuts(block_columns)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config) -> "QwenVLDims":
        """From a `Qwen2VLConfig` or `Qwen2_5_VLConfig` (object, or dict as in config.json)."""
        model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r}: QwenVLDims reads {', '.join(MODEL_TYPES)} configs")
        if isinstance(config, dict):
            from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

            config = (Qwen2VLConfig if model_type == "qwen2_vl" else Qwen2_5_VLConfig)(
                **{key: value for key, value in config.items() if key != "model_type"})
        vision, text = config.vision_config, config.text_config
        if model_type == "qwen2_vl":
            hidden, mlp, matrices = vision.embed_dim, vision.embed_dim * vision.mlp_ratio, 2
            window, full, merged_width = 0, (), vision.hidden_size
        else:
            hidden, mlp, matrices = vision.hidden_size, vision.intermediate_size, 3
            window, full, merged_width = vision.window_size, tuple(vision.fullatt_block_indexes), vision.out_hidden_size
        if merged_width != text.hidden_size:
            raise ValueError(f"the patch merger's output width {merged_width} is not the LLM's hidden size "
                             f"{text.hidden_size}: not a {model_type} model this code can cost")
        return cls(
            model_type=model_type, vision_layers=vision.depth, vision_hidden=hidden, vision_mlp=mlp,
            vision_mlp_matrices=matrices, vision_heads=vision.num_heads, patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size, merge_size=vision.spatial_merge_size,
            in_channels=vision.in_channels, window_size=window, full_attention_layers=full,
            llm_layers=text.num_hidden_layers, llm_hidden=text.hidden_size, llm_mlp=text.intermediate_size,
            llm_heads=text.num_attention_heads, llm_kv_heads=text.num_key_value_heads, vocab_size=text.vocab_size,
        )


def qwen_vl_dims(shape: str) -> QwenVLDims:
    """The published 7B shapes: Qwen/Qwen2-VL-7B-Instruct ("qwen2-vl-7b") and Qwen/Qwen2.5-VL-7B-Instruct
    ("qwen2.5-vl-7b"), from their config.json; both LLMs are Qwen2-7B's (28 layers, d = 3584, 28 query heads
    and 4 key/value heads of 128, MLP 18944, vocabulary 152064)."""
    llm = dict(llm_layers=28, llm_hidden=3584, llm_mlp=18944, llm_heads=28, llm_kv_heads=4, vocab_size=152064)
    tower = dict(vision_layers=32, vision_hidden=1280, vision_heads=16, patch_size=14, temporal_patch_size=2,
                 merge_size=2, in_channels=3)
    if shape == "qwen2-vl-7b":
        return QwenVLDims(model_type="qwen2_vl", vision_mlp=5120, vision_mlp_matrices=2, window_size=0,
                          full_attention_layers=(), **tower, **llm)
    if shape == "qwen2.5-vl-7b":
        return QwenVLDims(model_type="qwen2_5_vl", vision_mlp=3420, vision_mlp_matrices=3, window_size=112,
                          full_attention_layers=(7, 15, 23, 31), **tower, **llm)
    raise ValueError(f"shape {shape!r}: valid Qwen shapes are ['qwen2-vl-7b', 'qwen2.5-vl-7b']")


def qwen_image_plan(method, dims: QwenVLDims, grid: tuple[int, int], budget, **overrides):
    """`method`'s plan (a `ficoco.contract.Plan`; `method` a `ficoco.methods.base.Method`) for one image whose
    patch grid is `grid`: at the kept fraction the budget `budget` is of the nominal image, or at a per-image
    count (`ficoco.budget.image_budget`: None, unreduced, for an image with no more tokens), planned on
    `for_image_grid` dims (a reduction inside the tower needs the image's grid of units)."""
    image = dims.for_image_grid(grid)
    scaled = None if budget is None else image_budget(budget, image.visual_tokens, dims.nominal_visual_tokens)
    return method.plan(image, scaled, **overrides)


def qwen_has_sites(steps) -> bool:
    """Whether the Qwen2-VL adapter places these steps (`ficoco.contract` steps): steps inside the LLM only, or
    one step inside the tower's blocks alone."""
    from ficoco.contract import LLMLayerStep, VisionLayerStep

    return (all(isinstance(step, LLMLayerStep) for step in steps)
            or [type(step) for step in steps] == [VisionLayerStep])


def qwen_cannot_run(method, dims: QwenVLDims, **overrides) -> str | None:
    """Why `method` (a `ficoco.methods.base.Method`) with these parameters cannot run on this Qwen2-VL-family model
    yet, or None: what its image layout lacks of the method's `needs` (a CLS token), or a step the adapter has no
    site for. The adapter places reductions inside the LLM, and reductions inside the tower's blocks
    (`VisionLayerStep`) alone, of whole merge groups (a method whose needs admit a tower without CLS: FiCoCo-V
    with semantic="key-mean"); a method of another phase runs when its parameters put every step there, e.g.
    DivPrune's positions="original", at the input of LLM layer 0."""
    unmet = method.unmet_needs(dims, **overrides)
    if unmet:
        return f"it needs {'; '.join(unmet)}"
    if method.phase in ("none", "llm"):
        return None
    steps = method.steps(method.plan(dims, dims.visual_tokens // 2, **overrides))    # where its steps act
    if steps and qwen_has_sites(steps):
        return None
    return (f"only reductions inside the LLM, or inside the tower's blocks alone, run on {dims.model_type} so far "
            f"(issue 19), and with these parameters it acts elsewhere or in both (phase {method.phase!r}: "
            f"{[type(step).__name__ for step in steps]})")


def qwen_refusal(method, dims: QwenVLDims, **overrides) -> str | None:
    """`qwen_cannot_run` as a sentence about the method, or None."""
    reason = qwen_cannot_run(method, dims, **overrides)
    return None if reason is None else f"{method.name} cannot run on {dims.model_type}: {reason}"

"""Model dimensions that budgets, schedules and FLOPs need, read from a HF LLaVA or LLaVA-NeXT config.

One place knows how to read them, so `budget.py`, `flops.py` and the adapters agree. LLaVA-NeXT's
AnyRes layout of one image (`ModelDims.anyres_layout`) is here too: how many tower passes an image
of a given size costs and how many tokens its packed features hand the LLM.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ficoco.budget import image_budget, span_budget
from ficoco.budget_labels import ImageTokens

MODEL_TYPES = ("llava", "llava_next")      # config.model_type values `from_config` reads
# the methods' phases that reduce each tower pass of a LLaVA-NeXT image alike: in the tower, at its output,
# after the projector (`pass_plan`, `crops_plan`)
PER_PASS_PHASES = ("vision", "projector")


def best_canvas(image_size: tuple[int, int], canvases) -> tuple[int, int]:
    """The (height, width) canvas LLaVA-NeXT tiles an image of `image_size` (height, width) onto: the one
    that keeps most of the image's pixels after fitting it in, then the one that wastes the fewest
    (transformers' `select_best_resolution`; tests/test_llava_next_dims.py checks them equal)."""
    height, width = image_size
    best, best_kept, best_wasted = None, 0, float("inf")      # a sliver may keep 0 pixels anywhere
    for canvas_height, canvas_width in canvases:
        scale = min(canvas_width / width, canvas_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_width * canvas_height - kept
        if kept > best_kept or (kept == best_kept and wasted < best_wasted):
            best, best_kept, best_wasted = (canvas_height, canvas_width), kept, wasted
    return best


@dataclass(frozen=True)
class AnyresLayout:
    """What LLaVA-NeXT makes of one image (transformers' `LlavaNextModel.get_image_features` and
    `pack_image_features`, "spatial_unpad"): the tower runs on a base image and on `crop_grid` crops of
    the canvas, the projector on every pass's patches; the LLM gets the base image's patches, then the
    crops' patch grid with the rows and columns that only cover the canvas's padding removed, each of
    its rows followed by one image-newline token."""

    canvas: tuple[int, int]          # (height, width) pixels the image was fitted into
    crop_grid: tuple[int, int]       # crops per column and per row of the canvas
    feature_grid: tuple[int, int]    # (rows, columns) of crop patches the LLM gets, padding removed
    patches_per_pass: int            # patches one tower pass hands on (576 for CLIP-L/336, CLS dropped)

    @property
    def tower_passes(self) -> int:
        """Base image + crops."""
        return 1 + self.crop_grid[0] * self.crop_grid[1]

    @property
    def projector_tokens(self) -> int:
        """The projector runs on every pass's patches, padding included (2,880 for a 2x2 canvas on LLaVA-NeXT-7B)."""
        return self.tower_passes * self.patches_per_pass

    @property
    def newline_tokens(self) -> int:
        return self.feature_grid[0]

    @property
    def delivered(self) -> int:
        """Tokens in the LLM's image span: base patches + unpadded crop patches + one newline per row."""
        return self.patches_per_pass + self.feature_grid[0] * self.feature_grid[1] + self.newline_tokens


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
    # LLaVA-NeXT's AnyRes canvases, (height, width) in pixels; () = one crop per image (LLaVA-1.5)
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    # LLaVA-NeXT, in the dims a method plans one image's LLM reduction with (`for_image_span`): that image's
    # visual tokens in the LLM; None = the nominal image
    image_span: int | None = None

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
        """Visual tokens the unreduced LLM receives per image (576 for LLaVA-1.5).

        LLaVA-NeXT, where the count depends on the image's size: the *nominal* image's, every tower pass of
        the largest canvas before unpadding and without image-newlines (5 × 576 = 2,880 on LLaVA-NeXT-7B).
        The paper's labels count so (docs/flops.md), and so do the budget label "full" and budget bounds.
        In `for_image_span(n)`'s dims: n, one image's own span."""
        if self.image_span is not None:
            return self.image_span
        return (self.num_patches + (0 if self.select_strategy == "default" else 1)) * self.max_tower_passes

    @property
    def nominal_visual_tokens(self) -> int:
        """The nominal image's visual tokens, also in the dims of one image's span (`for_image_span`): what a
        budget or a fitted schedule is stated on (576 for LLaVA-1.5, 2,880 for LLaVA-NeXT-7B)."""
        return replace(self, image_span=None).visual_tokens

    def for_image_span(self, span: int) -> "ModelDims":
        """These dims for planning an LLM reduction of one LLaVA-NeXT image whose LLM span (patches and
        image-newlines) holds `span` tokens: `visual_tokens` is `span`, everything else unchanged."""
        if not self.image_grid_pinpoints:
            raise ValueError("for_image_span: a model with one crop per image has one span, visual_tokens")
        return replace(self, image_span=span)

    @property
    def largest_canvas(self) -> tuple[int, int]:
        """(height, width) of the canvas with the most crops: the costliest image (672 x 672 on LLaVA-NeXT-7B:
        5 passes, 2,928 tokens); the tower's image size on a model with one crop per image."""
        if not self.image_grid_pinpoints:
            return (self.image_size, self.image_size)
        return max(self.image_grid_pinpoints, key=lambda canvas: canvas[0] * canvas[1])

    def tower_pass(self) -> "ModelDims":
        """The dims of one tower pass of a LLaVA-NeXT image, as a method that reduces inside the tower plans
        it: LLaVA-1.5's geometry, one square crop behind a CLS token."""
        return replace(self, image_grid_pinpoints=(), image_span=None)

    @property
    def max_tower_passes(self) -> int:
        """Tower passes of the costliest image: 1 for LLaVA-1.5; LLaVA-NeXT: the base image and the crops
        of its largest canvas (5 on LLaVA-NeXT-7B)."""
        height, width = self.largest_canvas
        return 1 + (height // self.image_size) * (width // self.image_size) if self.image_grid_pinpoints else 1

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

    # -- what a reduction inside the tower keeps or drops (the same names on QwenVLDims) ----------------
    @property
    def tower_units(self) -> int:
        """Units a reduction inside the tower keeps or drops, per crop: its patches (576 for LLaVA-1.5)."""
        return self.num_patches

    @property
    def tower_prefix(self) -> int:
        """Tower tokens before the units: CLS (never a candidate, always kept)."""
        return 1

    @property
    def patches_per_unit(self) -> int:
        """Tower tokens per unit: 1 (a unit is one patch)."""
        return 1

    @property
    def unit_grid(self) -> tuple[int, int]:
        """(rows, cols) of the units on the image: the square patch grid (24 x 24)."""
        return self.grid_side, self.grid_side

    def attends_whole_image(self, layer: int) -> bool:
        """Whether tower layer `layer` attends over the whole crop: every CLIP layer does."""
        return True

    def to_dict(self) -> dict:
        return asdict(self)

    def anyres_layout(self, image_height: int, image_width: int) -> AnyresLayout:
        """The `AnyresLayout` of an image of this size on a LLaVA-NeXT model (ValueError on LLaVA-1.5).

        The unpadding is computed on the crop patch grid as transformers does it: the image, scaled to
        fit the canvas, covers `round(side * scale)` patches of the shorter direction (7 decimals, then
        int); the padding split evenly on both sides, its integer half, is dropped from each side.
        """
        if not self.image_grid_pinpoints:
            raise ValueError("anyres_layout: this model has one crop per image (no image_grid_pinpoints)")
        if image_height < 1 or image_width < 1:
            raise ValueError(f"image size {image_height}x{image_width}: both sides must be at least 1 pixel")
        canvas = best_canvas((image_height, image_width), self.image_grid_pinpoints)
        crop_grid = (canvas[0] // self.image_size, canvas[1] // self.image_size)
        rows, columns = crop_grid[0] * self.grid_side, crop_grid[1] * self.grid_side
        if image_width / image_height > columns / rows:            # wider than the grid: rows of padding
            kept = int(round(image_height * (columns / image_width), 7))
            rows -= 2 * ((rows - kept) // 2)
        else:                                                      # taller (or as wide): columns of padding
            kept = int(round(image_width * (rows / image_height), 7))
            columns -= 2 * ((columns - kept) // 2)
        return AnyresLayout(canvas=canvas, crop_grid=crop_grid, feature_grid=(rows, columns),
                            patches_per_pass=self.num_patches)

    def image_layout(self):
        """The `ficoco.contract.ImageLayout` of one image (LLaVA-1.5: one square crop behind a CLS token).

        LLaVA-NeXT: the layout of an image on its largest canvas (the base image and the most crops, one
        image-newline per patch row of the crops), the one a method must handle to run on every image."""
        from ficoco.contract import CropLayout, ImageLayout

        crop = CropLayout(grid=(self.grid_side, self.grid_side), prefix=1)
        newlines = (self.largest_canvas[0] // self.image_size) * self.grid_side if self.image_grid_pinpoints else 0
        return ImageLayout(crops=(crop,) * self.max_tower_passes, prefix_delivered=self.select_strategy != "default",
                           layout_tokens=newlines, positions="rope-1d")

    @classmethod
    def from_config(cls, config) -> "ModelDims":
        """From a `LlavaConfig` or `LlavaNextConfig` (object, or dict as in config.json: its `model_type`
        picks the class; a config of any other model type is refused)."""
        model_type = config.get("model_type", "llava") if isinstance(config, dict) else getattr(config, "model_type", None)
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r}: ModelDims reads {', '.join(MODEL_TYPES)} configs")
        if isinstance(config, dict):
            from transformers import LlavaConfig, LlavaNextConfig

            config = (LlavaNextConfig if model_type == "llava_next" else LlavaConfig)(**config)
        vision, text = config.vision_config, config.text_config
        feature_layer = config.vision_feature_layer
        if isinstance(feature_layer, (list, tuple)):
            raise ValueError(f"vision_feature_layer={feature_layer!r}: only a single layer is supported")
        pinpoints = ()
        if model_type == "llava_next":
            pinpoints = tuple((int(height), int(width)) for height, width in config.image_grid_pinpoints)
            uneven = [p for p in pinpoints if p[0] % vision.image_size or p[1] % vision.image_size]
            if uneven:
                raise ValueError(f"image_grid_pinpoints {uneven}: every canvas side must be a multiple of the "
                                 f"tower's image size {vision.image_size}")
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
            image_grid_pinpoints=pinpoints,
        )


def dims_from_config(config):
    """The dimensions of a model config (object, or dict as in config.json) of any supported family: `ModelDims`
    (LLaVA-1.5, LLaVA-NeXT) or `ficoco.qwen_dims.QwenVLDims` (Qwen2-VL, Qwen2.5-VL), by its model_type."""
    from ficoco.qwen_dims import MODEL_TYPES as QWEN_MODEL_TYPES
    from ficoco.qwen_dims import QwenVLDims

    model_type = config.get("model_type", "llava") if isinstance(config, dict) else getattr(config, "model_type", None)
    return (QwenVLDims if model_type in QWEN_MODEL_TYPES else ModelDims).from_config(config)


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


# llava-hf/llava-v1.6-vicuna-7b-hf's canvases: 1x2, 2x1, 2x2, 3x1 and 1x3 crops of 336 px
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def llava_next_dims(size: str = "7b") -> ModelDims:
    """LLaVA-NeXT (v1.6, Vicuna): LLaVA-1.5's tower, projector and LLM shapes with AnyRes canvases."""
    return replace(llava_1_5_dims(size), image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)


def image_plan(method, dims: ModelDims, layouts: list[AnyresLayout], budget: int | None, **overrides):
    """`method`'s plan (a `ficoco.contract.Plan`) for a batch row's LLaVA-NeXT images with these layouts, at a
    budget of the nominal image: a method that reduces in or right after the tower (`PER_PASS_PHASES`) on
    every pass alike (`crops_plan`), one that reduces in the tower and the LLM on every pass and then on
    the passes' tokens (`passes_plan`), any other on their span (`span_plan`, `anyres_plan`). No image:
    unreduced."""
    if not layouts:
        return unreduced_plan(dims, [], method.name)
    passes = sum(layout.tower_passes for layout in layouts)
    if method.phase in PER_PASS_PHASES:
        return crops_plan(pass_plan(method, dims, budget, **overrides), dims, passes)
    if method.phase == "both":
        return passes_plan(method, dims, passes, budget, **overrides)
    span = sum(layout.delivered for layout in layouts)
    return anyres_plan(span_plan(method, dims, span, budget, **overrides), dims, layouts)


def pass_budget(dims: ModelDims, budget: int | None) -> int | None:
    """One tower pass's share of a budget of the nominal LLaVA-NeXT image, the same kept fraction: 32 of 576
    patches a pass for 160 of 2,880 on LLaVA-NeXT-7B (None: unreduced)."""
    return None if budget is None else span_budget(budget, dims.tower_pass().visual_tokens, dims.visual_tokens)


def pass_plan(method, dims: ModelDims, budget: int | None, **overrides):
    """`method`'s plan for one tower pass (`tower_pass` dims) at its share of the nominal budget (`pass_budget`)."""
    return method.plan(dims.tower_pass(), pass_budget(dims, budget), **overrides)


def crops_plan(plan, dims: ModelDims, passes: int):
    """A per-pass method's plan for one pass (`pass_plan`) as the plan of a batch row's LLaVA-NeXT images of
    `passes` tower passes in all: every pass reduced alike, and the LLM given each pass's kept tokens pass
    after pass (base image, then the crops in raster order) without image-newlines, the patch grid being
    gone (the adapter's packing, docs/contracts.md). An adaptive method's passes each realise a count of
    their own within the pass's bounds, so the image's count is within `passes` times them."""
    vision_counts = [list(pair) for pair in plan.vision_counts] * passes
    if plan.delivered is None:
        post = plan.post_vision
        bounds = replace(post, tokens_min=(post.tokens_min or 1) * passes,
                         tokens_max=(post.tokens_max or dims.num_patches) * passes)
        return replace(plan, vision_counts=vision_counts, vision_crops=passes, post_vision=bounds)
    delivered = plan.delivered * passes
    return replace(plan, vision_counts=vision_counts, vision_crops=passes, delivered=delivered,
                   llm_visual=[delivered] * dims.llm_layers, layer_average=float(delivered),
                   projector_tokens=None if plan.projector_tokens is None else plan.projector_tokens * passes)


def passes_plan(method, dims: ModelDims, passes: int, budget: int | None, **overrides):
    """The plan of a method that reduces in the tower and the LLM (phase "both", with `Method.tower_schedule`
    and `Method.llm_schedule`) on `passes` LLaVA-NeXT tower passes: every pass reduced by the tower part
    at its share b of the nominal budget, then the LLM part on the passes' tokens (packed pass after pass,
    as `crops_plan` says) to a layer average of passes·b. No budget: unreduced."""
    from ficoco.contract import Plan

    if budget is not None and not 1 <= budget <= dims.visual_tokens:
        raise ValueError(f"{method.name}: budget {budget} must be in [1, {dims.visual_tokens}] (the nominal image's "
                         f"visual tokens), or None for unreduced")
    params = method.resolve(overrides)
    share = pass_budget(dims, budget)
    tower = method.tower_schedule(dims.tower_pass(), share, params)
    delivered = tower["delivered"] * passes
    projected = tower.get("projector_tokens")         # where a projector step reduces after the projector
    llm_budget = None if budget is None else passes * share
    return Plan.from_schedule(method.name, method.phase, llm_budget, params, {
        **tower, "vision_counts": tower["vision_counts"] * passes, "vision_crops": passes, "delivered": delivered,
        "projector_tokens": None if projected is None else projected * passes,
        **method.llm_schedule(dims.for_image_span(delivered), delivered, llm_budget, params)})


def span_plan(method, dims, span: int, budget: int | ImageTokens | None, **overrides):
    """`method`'s plan (a `ficoco.contract.Plan`; `method` a `ficoco.methods.base.Method`) for one image span
    of `span` LLM tokens on a model whose spans differ per image (`dims`: LLaVA-NeXT's ModelDims, or
    ficoco.qwen_dims.QwenVLDims), at the kept fraction the budget `budget` is of the nominal image, or at a
    per-image count (`ficoco.budget.image_budget`), planned on `for_image_span` dims. On LLaVA-NeXT its tower
    part is one pass: `anyres_plan` gives the image's passes."""
    scaled = None if budget is None else image_budget(budget, span, dims.visual_tokens)
    return method.plan(dims.for_image_span(span), scaled, **overrides)


def anyres_plan(plan, dims: ModelDims, layouts: list[AnyresLayout]):
    """`plan` (a `ficoco.contract.Plan` of the LLM side of a batch row's images, planned on their span) with
    the tower and projector work of their AnyRes layouts: every pass of every image through the tower
    unreduced, the projector on every pass's patches. No image: nothing through the tower."""
    passes = sum(layout.tower_passes for layout in layouts)
    one_pass = [[dims.vision_tokens, dims.vision_tokens]] * dims.vision_layers_run
    return replace(plan, vision_counts=one_pass * passes, vision_crops=max(passes, 1),
                   projector_tokens=sum(layout.projector_tokens for layout in layouts) if layouts else None)


def unreduced_plan(dims: ModelDims, layouts: list[AnyresLayout], method: str = "vanilla"):
    """The `ficoco.contract.Plan` of the unreduced model on LLaVA-NeXT images with these AnyRes layouts (a
    batch row's): `anyres_plan` with their packed spans in every LLM layer."""
    from ficoco.contract import Plan

    delivered = sum(layout.delivered for layout in layouts)
    return anyres_plan(Plan(method=method, phase="none", budget=None, params={}, vision=None, vision_counts=[],
                            delivered=delivered, llm=None, llm_visual=[delivered] * dims.llm_layers,
                            layer_average=float(delivered)), dims, layouts)

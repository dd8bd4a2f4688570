"""The vision-output and projector sites of the LLaVA adapter (`VisionOutputStep`, `ProjectorStep`).

LLaVA reads the output of one CLIP layer (layer 22 for LLaVA-1.5), drops CLS under the "default"
strategy and runs the projector. `FeaturePatch` installs, all undone by `remove()`:

| hook                                    | records / does                                                    |
|-----------------------------------------|-------------------------------------------------------------------|
| tower forward pre-hook                  | opens a `FeaturePass` (pixel values, the `VisionPass` of the call) |
| feature layer `q_proj` / `k_proj` hooks | the CLS query and all keys the layer's attention used (no recompute) |
| feature layer forward hook              | the layer's output (B, 1+N, D), CLS first                        |
| projector forward pre-hook              | `VisionOutputStep`: its tokens replace the projector input        |
| projector forward hook                  | `ProjectorStep`: its tokens replace the projected tokens          |

So the projector (and then the LLM) receives exactly `tokens_out` tokens per image; the adapter
collapses each image's placeholder run to that count, as it does for FiCoCo-V. An adaptive step
(`tokens_out=None`) returns its tokens padded to the batch's largest count with `counts` (B,); the
projector runs on the padded tokens and `take_realised()` hands the counts to the adapter, which
trims each image's projected tokens to its own count (ficoco/models/llava.py). What a
vision-output step reads is computed on demand by `FeatureScores`: the CLS attention row of the
feature layer from the recorded q/k (the layer itself keeps SDPA), and for PruMerge the next
layer's layer norm + q/k projections applied to the features (the next layer does not run).

Nothing is module-level: each tower call opens a `FeaturePass` that the projector consumes.
"""
from __future__ import annotations

import hashlib

import torch

from ficoco.contract import ImageTokens, ProjectorStep, StepShape, VisionOutputStep, VisionTokens
from ficoco.paradigm.attention import head_mean_probs, pairwise_cosine

PROJECTOR_TRACE = "projector"        # key of a projector step's kept positions in the vision trace


def pixel_digest(pixels: torch.Tensor) -> str:
    """sha256 of one image's pixel values (shape, dtype and raw bytes): equal images, equal digests."""
    flat = pixels.detach().contiguous().reshape(-1)
    header = f"{tuple(pixels.shape)}:{pixels.dtype}:".encode()
    return hashlib.sha256(header + flat.view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


class FeaturePass:
    """One vision-tower call as the feature site sees it."""

    def __init__(self, pixel_values: torch.Tensor, vision_pass):
        self.pixel_values = pixel_values              # (B, 3, H, W) as the embeddings received them
        self.vision_pass = vision_pass                # ficoco.models.clip.VisionPass (positions, trace) or None
        self.q_cls: torch.Tensor | None = None        # (B, 1, D) the feature layer's CLS query
        self.keys: torch.Tensor | None = None         # (B, 1+N, D) the feature layer's keys
        self.output: torch.Tensor | None = None       # (B, 1+N, D) the feature layer's output


class FeatureScores:
    """`VisionOutputScores` of one batch of images, each part computed on first use."""

    def __init__(self, feature_layer, next_layer, feature_pass: FeaturePass):
        self._layer, self._next, self._pass = feature_layer, next_layer, feature_pass
        self._next_normed: torch.Tensor | None = None
        self._next_keys: torch.Tensor | None = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, H, N, d) with the feature layer's heads."""
        attn = self._layer.self_attn
        return x.view(x.shape[0], x.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)

    def cls_row(self) -> torch.Tensor:
        q, k = self._pass.q_cls, self._pass.keys
        if q is None or k is None:
            raise RuntimeError("the feature layer's q/k were not recorded in this vision pass")
        return head_mean_probs(self._heads(q), self._heads(k), self._layer.self_attn.scale)[:, 0]   # (B, 1+N)

    def keys(self) -> torch.Tensor:
        if self._pass.keys is None:
            raise RuntimeError("the feature layer's keys were not recorded in this vision pass")
        return self._heads(self._pass.keys)                                                          # (B, H, 1+N, d)

    def _normed(self) -> torch.Tensor:
        if self._next is None:
            raise ValueError("this method reads the q/k of the layer after the feature layer, but the feature "
                             "layer is the vision tower's last layer")
        if self._next_normed is None:
            self._next_normed = self._next.layer_norm1(self._pass.output)                          # (B, 1+N, D)
        return self._next_normed

    def next_keys(self) -> torch.Tensor:
        if self._next_keys is None:
            normed = self._normed()
            self._next_keys = self._next.self_attn.k_proj(normed)
        return self._next_keys                                                                       # (B, 1+N, D)

    def next_cls_row(self) -> torch.Tensor:
        keys = self.next_keys()
        q = self._next.self_attn.q_proj(self._normed()[:, :1])                                      # (B, 1, D)
        return head_mean_probs(q[:, None], keys[:, None], keys.shape[-1] ** -0.5)[:, 0]             # (B, 1+N)

    def image_digests(self) -> list[str]:
        return [pixel_digest(image) for image in self._pass.pixel_values]


class ProjectorInstructionScores:
    """`InstructionScores` of one batch of images: CLIP cosines of each image's patches with its prompt's
    instruction, computed on first use; `companion_macs()` says what that cost per image."""

    def __init__(self, text_tower, patches: torch.Tensor, instructions: list[list[int]]):
        self._tower, self._patches, self._instructions = text_tower, patches, instructions   # (B, N, D_vision)
        self._cosines: list[torch.Tensor] | None = None

    def instruction_cosines(self) -> list[torch.Tensor]:
        if self._cosines is None:
            self._cosines = []
            for patches, ids in zip(self._patches, self._instructions):
                text_embeds = self._tower.text_embeddings(self._tower.instruction_text(ids))   # (M, C)
                image_embeds = self._tower.image_embeddings(patches)                          # (N, C)
                self._cosines.append(pairwise_cosine(image_embeds[None], text_embeds[None])[0])   # (N, M)
        return self._cosines

    def companion_macs(self) -> list[int]:
        """Per image, the MACs of what was asked for (0 when nothing was)."""
        if self._cosines is None:
            return [0] * len(self._instructions)
        return [self._tower.macs(*cosines.shape) for cosines in self._cosines]


class FeaturePatch:
    """Hooks for at most one `VisionOutputStep` and one `ProjectorStep` on a `LlavaModel`."""

    def __init__(self, llava_model, feature_layer: int, steps, current_vision_pass, text_tower=None,
                 current_instructions=None):
        output_steps = [step for step in steps if isinstance(step, VisionOutputStep)]
        projector_steps = [step for step in steps if isinstance(step, ProjectorStep)]
        if len(output_steps) > 1 or len(projector_steps) > 1 or len(output_steps) + len(projector_steps) != len(steps):
            raise ValueError(f"the feature site takes at most one VisionOutputStep and one ProjectorStep; got "
                             f"{[type(step).__name__ for step in steps]}")
        self.output_step = output_steps[0] if output_steps else None
        self.projector_step = projector_steps[0] if projector_steps else None
        self.feature_index = feature_layer
        self.current_vision_pass = current_vision_pass          # () -> VisionPass | None
        self.text_tower = text_tower                            # companion.TextTower for a step reading the instruction
        self.current_instructions = current_instructions        # () -> per image, LLM ids after its image
        self.current: FeaturePass | None = None
        self.realised: list[int] | None = None                  # per-image counts of the last adaptive reduction
        self._handles = []
        if self.output_step is None and self.projector_step is None:
            return
        tower, projector = llava_model.vision_tower, llava_model.multi_modal_projector
        layers = tower.encoder.layers
        if not 0 <= feature_layer < len(layers):
            raise ValueError(f"feature layer {feature_layer} is outside the vision tower's layers 0..{len(layers) - 1}")
        self.feature_layer = layers[feature_layer]
        self.next_layer = layers[feature_layer + 1] if feature_layer + 1 < len(layers) else None
        self._handles.append(tower.register_forward_pre_hook(self._start_pass, with_kwargs=True))
        if self.output_step is not None:
            attn = self.feature_layer.self_attn
            self._handles += [attn.q_proj.register_forward_hook(self._record("q_cls")),
                              attn.k_proj.register_forward_hook(self._record("keys")),
                              self.feature_layer.register_forward_hook(self._record("output")),
                              projector.register_forward_pre_hook(self._reduce_features)]
        if self.projector_step is not None:
            if self.projector_step.reads_instruction:          # CLIP image embeddings start at the feature layer
                if text_tower is None or current_instructions is None:
                    raise ValueError("this projector step reads the instruction through CLIP's text tower; none "
                                     "was given (ficoco.apply(..., text_tower=...))")
                self._handles.append(self.feature_layer.register_forward_hook(self._record("output")))
            self._handles.append(projector.register_forward_hook(self._reduce_projected))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.current, self.realised = [], None, None

    @property
    def adaptive(self) -> bool:
        """True for a vision-output step that chooses a count per image (`tokens_out` None)."""
        return self.output_step is not None and self.output_step.tokens_out is None

    def take_realised(self) -> list[int] | None:
        """The per-image counts of the most recent adaptive reduction, once (None when none is pending)."""
        realised, self.realised = self.realised, None
        return realised

    # -- hooks ----------------------------------------------------------------------------------
    def _start_pass(self, tower, args, kwargs):
        pixel_values = args[0] if args else kwargs["pixel_values"]
        self.current = FeaturePass(pixel_values, self.current_vision_pass())

    def _record(self, name: str):
        def hook(module, args, output):
            if self.current is not None:
                setattr(self.current, name, output[:, :1] if name == "q_cls" else output)
        return hook

    def _reduce_features(self, projector, args):
        feature_pass = self.current
        if self.projector_step is None:                           # one projector call per tower call
            self.current = None
        features = args[0]                                        # (B, N or 1+N, D) what LLaVA selected
        if feature_pass is None or feature_pass.output is None:
            raise RuntimeError("the projector ran without a vision-tower pass; the vision-output reduction needs "
                               "the feature layer's output (pass pixel_values, not pre-computed features)")
        hidden = feature_pass.output                              # (B, 1+N, D)
        batch, tokens, _ = hidden.shape
        if features.shape[0] != batch or features.shape[1] not in (tokens, tokens - 1):
            raise ValueError(f"the projector input {tuple(features.shape)} is not the recorded output of vision "
                             f"layer {self.feature_index} {tuple(hidden.shape)} (with or without CLS)")
        vision_pass = feature_pass.vision_pass
        positions = vision_pass.positions if vision_pass is not None and vision_pass.positions.shape[1] == tokens - 1 \
            else torch.arange(tokens - 1, device=hidden.device).expand(batch, -1)
        scores = FeatureScores(self.feature_layer, self.next_layer, feature_pass)
        out = self.output_step.reduce(self.feature_index, VisionTokens(hidden, positions), scores)
        if self.adaptive:
            self.realised = kept = _check_adaptive(out, batch)
        else:
            _check_tokens(out.hidden, batch, self.output_step.tokens_out, "vision-output")
            kept = [self.output_step.tokens_out] * batch
        _record_shapes(vision_pass, "output", [StepShape(self.feature_index, tokens, count) for count in kept])
        if out.positions is not None:          # _record_shapes: a pass is there
            vision_pass.trace[self.feature_index] = out.positions
        return (out.hidden.to(features.dtype), *args[1:])

    def _reduce_projected(self, projector, args, output):
        feature_pass, self.current = self.current, None           # one projector call per tower call
        batch, tokens, _ = output.shape                           # (B, N, D_llm)
        positions = torch.arange(tokens, device=output.device).expand(batch, -1)
        scores = self._instruction_scores(feature_pass, output) if self.projector_step.reads_instruction else None
        out = self.projector_step.reduce(0, ImageTokens(output, positions), scores)
        _check_tokens(out.hidden, batch, self.projector_step.tokens_out, "projector")
        vision_pass = feature_pass.vision_pass if feature_pass is not None else None
        companion = scores.companion_macs() if scores is not None else [0] * batch
        _record_shapes(vision_pass, "projector", [StepShape(None, tokens, self.projector_step.tokens_out,
                                                            companion_macs=macs) for macs in companion])
        if out.positions is not None:          # _record_shapes: a pass is there
            vision_pass.trace[PROJECTOR_TRACE] = out.positions
        return out.hidden.to(output.dtype)

    def _instruction_scores(self, feature_pass: FeaturePass | None, projected: torch.Tensor):
        """The `InstructionScores` of the projected images: their feature-layer patches and instructions."""
        if feature_pass is None or feature_pass.output is None:
            raise RuntimeError("the projector ran without a vision-tower pass; reading the instruction needs the "
                               "feature layer's output (pass pixel_values, not pre-computed features)")
        patches = feature_pass.output[:, 1:]                       # (B, N, D_vision) CLS dropped, as LLaVA does
        instructions = self.current_instructions()
        if patches.shape[:2] != projected.shape[:2] or instructions is None or len(instructions) != len(patches):
            raise RuntimeError(f"the projector's {tuple(projected.shape[:2])} tokens are not the feature layer's "
                               f"{tuple(patches.shape[:2])} patches of the prompts' "
                               f"{'no' if instructions is None else len(instructions)} images; reading the "
                               f"instruction needs a forward call with input_ids and one image per placeholder run")
        return ProjectorInstructionScores(self.text_tower, patches, instructions)


def _record_shapes(vision_pass, site: str, shapes: list[StepShape]) -> None:
    """Record what a step ran on in the tower call's pass, for its selection overhead (handle.py)."""
    if vision_pass is None:
        raise RuntimeError(f"the {site} step ran outside a vision-tower pass, so its overhead cannot be recorded")
    vision_pass.step_shapes.append((site, shapes))


def _check_tokens(hidden: torch.Tensor, batch: int, tokens_out: int, site: str) -> None:
    if hidden.dim() != 3 or hidden.shape[:2] != (batch, tokens_out):
        raise ValueError(f"the {site} step returned tokens of shape {tuple(hidden.shape)}; expected "
                         f"({batch}, {tokens_out}, width)")


def _check_adaptive(out: ImageTokens, batch: int) -> list[int]:
    """The per-image counts of an adaptive step's output, checked against its padded tokens."""
    if out.counts is None:
        raise ValueError("an adaptive vision-output step (tokens_out=None) must return ImageTokens.counts, the "
                         "number of tokens of each image")
    counts = [int(count) for count in out.counts.tolist()]
    if out.hidden.dim() != 3 or len(counts) != batch or out.hidden.shape[:2] != (batch, max(counts, default=0)) \
            or min(counts, default=1) < 1:
        raise ValueError(f"the adaptive vision-output step returned tokens of shape {tuple(out.hidden.shape)} with "
                         f"counts {counts}; expected ({batch}, max(counts), width) and every count >= 1")
    return counts


FEATURE_STEPS = (VisionOutputStep, ProjectorStep)     # the step classes `FeaturePatch` installs

"""The CLIP vision tower side of the LLaVA adapter (transformers 5.23 `CLIPVisionModel`, flattened).

What it does to the tower, all undone by `remove()`:
- every executed encoder layer gets a forward pre-hook that records its token count (and adds a
  key bias to the attention mask when a step asked for one);
- layers after the one whose output LLaVA reads (layer 23 for LLaVA-1.5) get an identity
  `forward`, so they cost nothing and the selected features are unchanged;
- each reducing layer gets a replacement `forward` that runs the layer's attention with its own
  weights, applies the method's step between the attention residual and the MLP, then runs the
  MLP on the reduced tokens. q/k are projected once; a step that reads the full probability
  matrix gets the ones the output was computed from, any other step rows/keys on demand next
  to PyTorch's fused SDPA;
- with a `VisionInputStep` (image downsampling) the tower's pre-hook replaces the pixel values by
  the step's resized ones and asks the embeddings to interpolate the position embeddings
  (`interpolate_pos_encoding=True`), so every layer runs on the smaller patch grid.

State lives in a `VisionPass` per tower call (one batch of images); nothing is module-level.
"""
from __future__ import annotations

import types

import torch

from ficoco.contract import StepShape, VisionInputStep, VisionLayerStep, VisionTokens
from ficoco.paradigm.attention import attention_probs, head_mean_probs


class VisionPass:
    """One call of the vision tower: the current patch positions and the executed token counts."""

    def __init__(self, n_images: int, n_patches: int, device: torch.device):
        self.n_images = n_images
        self.positions = torch.arange(n_patches, device=device).expand(n_images, n_patches)   # (B, N)
        self.key_bias: torch.Tensor | None = None                                             # (B, 1+N)
        self.layer_counts: list[list[int]] = []       # [n_attn, n_mlp] per executed layer, one image
        self.trace: dict[int, torch.Tensor] = {}      # reducing layer -> kept patch positions (B, N_l)
        self.step_shapes: list[tuple[str, list[StepShape]]] = []   # (site, one shape per image) per step run:
                                                      # site "layer", "output" or "projector"


class ClipScores:
    """`VisionScores` of one layer. `head_mean` is given when the layer already computed its full
    probabilities (the step asked for them); rows and keys come from q/k on demand."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, scale: float, key_bias: torch.Tensor | None,
                 head_mean: torch.Tensor | None = None):
        self._q, self._k, self._scale = q, k, scale                                 # (B, H, 1+N, d) each
        self._bias = None if key_bias is None else key_bias[:, None, None, :]      # (B, 1, 1, 1+N)
        self._probs = head_mean                                                     # (B, 1+N, 1+N) or None

    def probs(self) -> torch.Tensor:
        if self._probs is None:
            self._probs = head_mean_probs(self._q, self._k, self._scale, self._bias)
        return self._probs

    def rows(self, queries: torch.Tensor) -> torch.Tensor:
        if self._probs is not None:
            return self._probs.gather(1, queries[..., None].expand(-1, -1, self._probs.shape[-1]))
        index = queries[:, None, :, None].expand(-1, self._q.shape[1], -1, self._q.shape[-1])
        return head_mean_probs(self._q.gather(2, index), self._k, self._scale, self._bias)   # (B, R, 1+N)

    def keys(self) -> torch.Tensor:
        return self._k

    def logits(self) -> torch.Tensor:
        # (B, 1+N, 1+N) head-mean pre-softmax q·k·scale, without the key bias (the released FiCoCo-V scores)
        return torch.matmul(self._q.float(), self._k.float().transpose(-1, -2)).mul_(self._scale).mean(dim=1)


def clip_attention(attn, x: torch.Tensor, mask: torch.Tensor | None, with_probs: bool):
    """CLIPAttention on x (B, N, D): the output (B, N, D), q/k (B, H, N, d), and, if `with_probs`,
    the head-mean probabilities (B, N, N) in float32.

    With probabilities the attention is computed once in explicit form (float32 products and softmax) and the
    same probabilities give both the output and the scores, which is cheaper than a fused kernel
    plus a second score pass. Without, the output uses PyTorch's fused SDPA.
    """
    batch, tokens, width = x.shape
    heads = (batch, tokens, attn.num_heads, attn.head_dim)
    q, k, v = (projection(x).view(heads).transpose(1, 2) for projection in (attn.q_proj, attn.k_proj, attn.v_proj))
    head_mean = None
    if with_probs:
        probs = attention_probs(q, k, attn.scale, mask)                             # (B, H, N, N) float32
        out = torch.matmul(probs.to(v.dtype), v)                                    # (B, H, N, d)
        head_mean = probs.mean(dim=1)                                               # (B, N, N)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
    out = attn.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))
    return out, q, k, head_mean


class ClipPatch:
    """Installs the hooks and replacement forwards on a `CLIPVisionModel`; `remove()` undoes them."""

    def __init__(self, tower, last_layer: int, step: VisionLayerStep | None, on_pass_start,
                 input_step: VisionInputStep | None = None):
        self.tower = tower
        self.layers = tower.encoder.layers
        self.last_layer = last_layer
        self.step = step
        self.input_step = input_step                    # resizes the image before the embeddings
        self.on_pass_start = on_pass_start              # callback(VisionPass) -> None
        self.current: VisionPass | None = None
        self._handles = []
        self._replaced = []
        reducing = set(step.layers) if step else set()
        bad = sorted(layer for layer in reducing if not 0 <= layer <= last_layer)
        if bad:
            raise ValueError(f"vision reduction layers {bad} are outside the executed layers 0..{last_layer}")
        self._install(reducing)

    # -- installation ---------------------------------------------------------------------------
    def _install(self, reducing: set[int]) -> None:
        self._handles.append(self.tower.register_forward_pre_hook(self._start_pass, with_kwargs=True))
        self._handles.append(self.tower.register_forward_hook(self._end_pass, always_call=True))
        for index, layer in enumerate(self.layers):
            if index > self.last_layer:
                self._replace_forward(layer, _identity_forward)
            elif index in reducing:
                self._replace_forward(layer, self._reducing_forward(index, layer))
            else:
                self._handles.append(layer.register_forward_pre_hook(self._plain_layer, with_kwargs=True))

    def _replace_forward(self, layer, forward) -> None:
        if "forward" in layer.__dict__:
            raise RuntimeError(f"{type(layer).__name__} already has an instance forward; is another patch installed?")
        layer.forward = types.MethodType(forward, layer) if forward is _identity_forward else forward
        self._replaced.append(layer)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for layer in self._replaced:
            del layer.forward
        self._handles, self._replaced, self.current = [], [], None

    # -- hooks ----------------------------------------------------------------------------------
    def _start_pass(self, tower, args, kwargs):
        pixel_values = args[0] if args else kwargs.get("pixel_values")
        n_images = pixel_values.shape[0]
        size = tower.config.image_size
        changed = None
        if self.input_step is not None:                 # image downsampling: fewer patches from the start
            size = self.input_step.image_side
            if tuple(pixel_values.shape[-2:]) != (size, size):
                pixel_values = self.input_step.prepare(pixel_values)
            if tuple(pixel_values.shape[-2:]) != (size, size):
                raise ValueError(f"the vision input step must give {size}x{size} pixel values; its prepare "
                                 f"returned {tuple(pixel_values.shape[-2:])}")
            args = (pixel_values, *args[1:]) if args else args
            kwargs = {**kwargs, "interpolate_pos_encoding": True} if args else \
                {**kwargs, "pixel_values": pixel_values, "interpolate_pos_encoding": True}
            changed = (args, kwargs)
        n_patches = (size // tower.config.patch_size) ** 2
        if self.step is not None and tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"vision reduction is planned on the {size}x{size} patch grid of the config; got "
                             f"pixel_values of size {tuple(pixel_values.shape[-2:])}")
        self.current = VisionPass(n_images, n_patches, pixel_values.device)
        self.on_pass_start(self.current)
        return changed

    def _end_pass(self, tower, args, output):
        self.current = None

    def _plain_layer(self, layer, args, kwargs):
        vision_pass = self.current
        if vision_pass is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        vision_pass.layer_counts.append([hidden.shape[1], hidden.shape[1]])
        if vision_pass.key_bias is None:
            return None
        return _with_key_bias(args, kwargs, vision_pass.key_bias, hidden.dtype)

    def _reducing_forward(self, index: int, layer):
        """CLIPEncoderLayer.forward with the step between the attention residual and the MLP."""
        step = self.step
        original = type(layer).forward

        def forward(hidden_states, attention_mask=None, **kwargs):
            vision_pass = self.current
            if vision_pass is None:                                        # the layer used outside the tower
                return original(layer, hidden_states, attention_mask, **kwargs)
            n_in = hidden_states.shape[1]
            if vision_pass.key_bias is not None:
                attention_mask = _bias_mask(attention_mask, vision_pass.key_bias, hidden_states.dtype)
            attn_out, q, k, head_mean = clip_attention(layer.self_attn, layer.layer_norm1(hidden_states),
                                                       attention_mask, with_probs=step.attention == "probs")
            hidden = hidden_states + attn_out                              # (B, 1+N, D) attention residual
            scores = ClipScores(q, k, layer.self_attn.scale, vision_pass.key_bias, head_mean)
            tokens = step.reduce(index, VisionTokens(hidden, vision_pass.positions, vision_pass.key_bias), scores)
            vision_pass.positions, vision_pass.key_bias = tokens.positions, tokens.key_bias
            vision_pass.trace[index] = tokens.positions
            hidden = tokens.hidden                                         # (B, 1+N', D)
            vision_pass.layer_counts.append([n_in, hidden.shape[1]])
            vision_pass.step_shapes.append(("layer", [StepShape(index, n_in, hidden.shape[1])] * vision_pass.n_images))
            return hidden + layer.mlp(layer.layer_norm2(hidden))

        return forward


def _identity_forward(self, hidden_states, attention_mask=None, **kwargs):
    """A layer whose output nobody reads: pass the hidden states through untouched."""
    return hidden_states


def _bias_mask(attention_mask, key_bias: torch.Tensor, dtype) -> torch.Tensor:
    """An additive (B, 1, 1, 1+N) mask from a per-key bias, added to an existing mask if any."""
    bias = key_bias[:, None, None, :].to(dtype)
    return bias if attention_mask is None else attention_mask + bias


def _with_key_bias(args, kwargs, key_bias, dtype):
    """Pre-hook result that passes the key bias as the layer's attention mask."""
    if len(args) > 1:
        args = (args[0], _bias_mask(args[1], key_bias, dtype), *args[2:])
    else:
        kwargs = {**kwargs, "attention_mask": _bias_mask(kwargs.get("attention_mask"), key_bias, dtype)}
    return args, kwargs

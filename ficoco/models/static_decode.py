"""Greedy decoding on a static KV cache, each step optionally replayed as one CUDA graph.

Why: `generate` decodes eagerly, so one step of a 7B LLM launches about 1,240 kernels, and on an H200 the GPU
waits for the host (docs/bench.md, "GPU run"): every method then decodes at the same speed, whatever its KV
cache holds. A static cache gives a decode step fixed shapes and fixed addresses, so the step can be captured
once (`torch.cuda.CUDAGraph`) and replayed with one launch.

How it meets an installed method (ficoco/models/llama.py):
- A static layer (transformers 5.24 `StaticLayer`) writes each call's keys after those it already holds. So a
  reduced prefill leaves layer l's L_l kept tokens in its first L_l slots and the t-th new token in slot L_l + t,
  as a dynamic cache would, and the model's decode mask, laid out like layer 0's slots, maps onto them as it
  does for a dynamic cache. A `PromptSizedLayer` has exactly the slots that layer needs, so a reduced layer's
  decode reads a shorter cache. (transformers' own `StaticCache` gives every layer the same slots; the adapter
  masks those a reduced layer never fills, `llama.static_slots`.)
- A captured step may not read a device value on the host. The handle tells a prefill from a decode step by
  asking the cache whether it holds tokens, which `PromptStaticCache` answers from the host (`holds_prompt`).

Scope: LLaVA-1.5-shaped models (what `ficoco gpu-bench` runs), prompts without padding, and a fixed count of
visual tokens per image (an adaptive method pads its rows to different lengths: refused after its prefill).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.cache_utils import Cache, StaticLayer


class PromptSizedLayer(StaticLayer):
    """A static cache layer whose slots are sized by the prefill that first writes it: the tokens that layer
    keeps plus `new_tokens`. So a decode step reads no slot a reduction left empty, and a method's shorter KV
    cache is a shorter read, as with a dynamic cache."""

    def __init__(self, new_tokens: int):
        super().__init__(max_cache_len=0)
        self.new_tokens = new_tokens

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.max_cache_len = key_states.shape[-2] + self.new_tokens     # (B, H_kv, L_l, d): L_l kept tokens
        super().lazy_initialization(key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(keys the attention reads, offset): before the first write, the slots that write will size."""
        if not self.is_initialized:
            return query_length + self.new_tokens, 0
        return super().get_mask_sizes(query_length)


class PromptStaticCache(Cache):
    """A static KV cache for one prefill and `new_tokens` decode steps, one `PromptSizedLayer` per decoder
    layer, that knows on the host whether a prefill has written it (`holds_prompt`, cleared by `reset`): a
    decode step on it needs no device read to know it is one."""

    def __init__(self, config, new_tokens: int):
        text_config = config.get_text_config(decoder=True)
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
        if set(layer_types) != {"full_attention"}:
            raise ValueError(f"PromptStaticCache holds full-attention layers only; this model has {sorted(set(layer_types))}")
        super().__init__(layers=[PromptSizedLayer(new_tokens) for _ in layer_types])
        self.holds_prompt = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.holds_prompt = True
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reset(self) -> None:
        super().reset()
        self.holds_prompt = False


@dataclass
class GreedyDecode:
    """What `greedy_decode` produced: `tokens` (B, new_tokens) and the logits (B, new_tokens, V) they were chosen
    from, the first from the prefill."""
    tokens: torch.Tensor
    logits: torch.Tensor


def cache_keyword(model) -> str:
    """The name the model's forward gives its KV cache (transformers 5.24: `cache`; earlier: `past_key_values`).
    A cache passed under another name would be swallowed by `**kwargs` and the model would make its own."""
    parameters = inspect.signature(type(model).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise RuntimeError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`: this transformers "
                       f"passes the KV cache otherwise (ficoco/models/guard.py)")


def greedy_decode(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, new_tokens: int, *,
                  attention_mask: torch.Tensor | None = None, graph: bool = False,
                  on_token: Callable[[], None] | None = None) -> GreedyDecode:
    """`new_tokens` greedy tokens after each prompt of `input_ids` (B, L), as `generate` would give them, on a
    `PromptStaticCache`.

    graph: capture the second decode step as a CUDA graph and replay it for every later one (CUDA only).
    on_token: called as each token is chosen, the first after the prefill (a timer's mark: nothing here waits
    for the device until the last token is out; the checks of the counts come after it).
    """
    from ficoco.dims import ModelDims, dims_from_config

    dims = dims_from_config(model.config)
    if not isinstance(dims, ModelDims) or dims.image_grid_pinpoints:
        raise ValueError(f"greedy_decode runs LLaVA-1.5-shaped models; {type(model).__name__} "
                         f"({model.config.model_type}) decodes with generate")
    if new_tokens < 1:
        raise ValueError(f"new_tokens={new_tokens}: need at least 1")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("greedy_decode needs prompts without padding (every attention_mask entry 1); decode padded "
                         "prompts with generate")
    if graph:
        _check_graph_device(input_ids.device)
    batch, length = input_ids.shape
    cache = PromptStaticCache(model.config, new_tokens)
    keyword = cache_keyword(model)

    def forward(**inputs) -> torch.Tensor:
        """(B, V) the logits of the last position."""
        return model(**inputs, **{keyword: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]

    tokens = input_ids.new_empty(batch, new_tokens)
    with torch.inference_mode():
        logits = [forward(input_ids=input_ids, pixel_values=pixel_values)]
        if not cache.holds_prompt:
            raise RuntimeError(f"the prefill did not write the static cache passed as `{keyword}`: the model made "
                               f"its own (an untested transformers?)")
        tokens[:, 0] = logits[0].argmax(-1)
        if on_token is not None:
            on_token()
        token = tokens[:, :1].clone()                     # (B, 1) every step's input, refilled in place: a
        step = functools.partial(forward, input_ids=token)  # captured step reads it from this address
        replay = None
        for index in range(1, new_tokens):
            if not graph:
                logits.append(step())
            elif index == 1:                              # eagerly, on a side stream: the warm-up a capture needs
                logits.append(_on_side_stream(step))
            else:
                if replay is None:                        # records this step without running it
                    replay, graph_logits = _captured(step)
                replay()
                logits.append(graph_logits.clone())
            tokens[:, index] = logits[-1].argmax(-1)
            token.copy_(tokens[:, index:index + 1])
            if on_token is not None:
                on_token()
    # checked once the last token is out, so a timer's last mark does not wait for them
    _check_prefill(model, cache, length)
    layer = cache.layers[0]
    written = int(layer.get_seq_length()) - (layer.max_cache_len - new_tokens)   # after the prompt's kept tokens
    if written != new_tokens - 1:
        raise RuntimeError(f"{new_tokens - 1} decode steps wrote {written} tokens into layer 0's cache")
    return GreedyDecode(tokens=tokens, logits=torch.stack(logits, dim=1))


def _check_graph_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"graph=True replays CUDA graphs; the inputs are on {device}")


def _on_side_stream(step: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`step()` run on a side stream, ordered after and before the current stream's work (torch.cuda.graphs'
    warm-up, so that what a first call sets up lazily is not set up on the stream being captured)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        logits = step()
    torch.cuda.current_stream().wait_stream(side)
    return logits


def _captured(step: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """`step` captured as a CUDA graph: (replay, the logits tensor every replay writes). Capturing records the
    kernels without running them; the caller's first replay runs this step."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        logits = step()
    return graph.replay, logits


def _check_prefill(model, cache: PromptStaticCache, length: int) -> None:
    """After the prefill: each layer's slots are the tokens it kept (the installed method's counts; `length`
    without one) plus the new ones, and no row was padded (an adaptive method keeps a different count of
    visual tokens per image; a decode step here passes no attention mask)."""
    from ficoco.models.handle import INSTALLED

    handle = getattr(model, INSTALLED, None)
    if handle is not None and any(handle.last_padding()):
        raise ValueError(f"{handle.method.name}: its prefill padded the rows with {handle.last_padding()} tokens (a "
                         f"different count of visual tokens per image); greedy_decode decodes rows without padding: "
                         f"use generate")
    kept = handle.last_counts()[0]["llm"] if handle is not None else [length] * len(cache.layers)
    held = [layer.max_cache_len - layer.new_tokens for layer in cache.layers]
    if held != kept:
        raise RuntimeError(f"the prefill left {held} tokens in the decoder layers' static caches; the counts say "
                           f"{kept}")

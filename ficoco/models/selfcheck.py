"""The adapter self-check: does an adapter still count, cache and batch correctly here?

The adapters hook transformers internals (platform-notes §3, §4) that change between releases
without notice (5.24 renamed `LlavaModel.forward`'s cache keyword, and decode steps were silently
taken for prefills). `run_selfcheck(family)` exercises every path a job relies on, on a tiny seeded random
model of that family built in memory (no download, CPU, about a second):

- "llava" (the LLaVA and LLaVA-NeXT adapters): FiCoCo-VL reducing in the vision tower *and* in the LLM;
- "qwen2_vl", "qwen2_5_vl" (the Qwen2-VL adapter on each model class): FiCoCo-L reducing inside the LLM
  at half of every image, images given by `image_grid_thw`, M-RoPE positions, rows left-padded; and, in
  `prefill_counts`, FiCoCo-V (its CLS-free term) reducing merge groups inside the tower;

| check                   | what must hold                                                                 |
|-------------------------|--------------------------------------------------------------------------------|
| `prefill_counts`        | a prefill's `last_counts()` equal the method's planned schedule                 |
| `decode_keeps_counts`   | `generate` (3 new tokens) leaves the prefill's counts in place                  |
| `kv_cache_lengths`      | per layer, KV length = reduced prompt length + decode steps (contracts §2)      |
| `batch_equals_alone`    | a left-padded batch of 2 prompts gives each prompt's tokens and counts alone    |
| `remove_restores_model` | after `remove()` the logits and tokens are bit-identical to before `apply`      |

An exception in any step is a failed check (named after the step), never a crash, so the guard can
refuse with one line. `selfcheck_once(version)` caches the result per transformers version for
the life of the process (the guard and `ficoco doctor` share it).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

# the tiny model's geometry: 28 px / patch 7 -> 16 patches + CLS, 4 CLIP layers (0..2 run), 4 LLM layers
_IMAGE_SIZE, _PATCH = 28, 7
_PLACEHOLDERS = (_IMAGE_SIZE // _PATCH) ** 2
_PAD, _BOS, _EOS, _IMAGE = 0, 1, 2, 5
# FiCoCo-VL reduces inside CLIP layers 1..2 (16 -> 12 patches) and in LLM layers 1..2 (to average 6)
METHOD, BUDGET, OVERRIDES = "ficoco-vl", 6, {"v_start": 1, "l_start": 1, "l_window": 2}
NEW_TOKENS = 3
PROMPTS = ((_BOS, 10, 11, *[_IMAGE] * _PLACEHOLDERS, 12, 13, 14),
           (_BOS, 17, *[_IMAGE] * _PLACEHOLDERS, 18, 19, 20, 21, 22))
# Qwen: 4 px patches merged 2 x 2, a 32 x 48 px image -> an 8 x 12 patch grid, 24 visual tokens between the vision
# start / end markers; FiCoCo-L from LLM layer 1 at half the nominal image, so every image keeps half of its own
FAMILIES = {"llava": "LLaVA", "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}    # key -> name in reports
# a config's model_type -> the self-check of its adapter (LLaVA-NeXT's adapter is checked with LLaVA's)
FAMILY_OF_MODEL_TYPE = {"llava": "llava", "llava_next": "llava", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl"}
_QWEN_START, _QWEN_END, _QWEN_VIDEO, _QWEN_GRID = 61, 62, 63, (8, 12)
_QWEN_SPAN = _QWEN_GRID[0] * _QWEN_GRID[1] // 4
QWEN_METHOD, QWEN_OVERRIDES = "ficoco-l", {"start": 1, "window": 1}
# and FiCoCo-V inside the tower: Qwen2-VL's blocks 0..1, Qwen2.5-VL's full-attention block 1
QWEN_TOWER_METHOD, QWEN_TOWER_OVERRIDES = "ficoco-v", {"semantic": "key-mean", "start": 0}
QWEN_PROMPTS = ((7, 8, _QWEN_START, *[_IMAGE] * _QWEN_SPAN, _QWEN_END, 9, 10, 11),
                (7, _QWEN_START, *[_IMAGE] * _QWEN_SPAN, _QWEN_END, 9, 10, 11, 12, 13))
CHECK_NAMES = ("prefill_counts", "decode_keeps_counts", "kv_cache_lengths", "batch_equals_alone",
               "remove_restores_model")


@dataclass(frozen=True)
class Check:
    """One named check: `expected` and `found` are short one-line descriptions."""

    name: str
    passed: bool
    expected: str
    found: str

    def line(self) -> str:
        if self.passed:
            return f"{self.name}: passed"
        return f"{self.name}: FAILED (expected {self.expected}; found {self.found})"


@dataclass(frozen=True)
class SelfCheckResult:
    transformers_version: str
    method: str
    checks: tuple[Check, ...]
    seconds: float
    family: str = "llava"

    @property
    def passed(self) -> bool:
        return len(self.checks) == len(CHECK_NAMES) and all(check.passed for check in self.checks)

    @property
    def first_failure(self) -> Check | None:
        return next((check for check in self.checks if not check.passed), None)


@functools.lru_cache(maxsize=None)
def selfcheck_once(transformers_version: str, family: str = "llava") -> SelfCheckResult:
    """`run_selfcheck(family)`, once per process per transformers version and family (the cache key)."""
    return run_selfcheck(family)


def run_selfcheck(family: str = "llava") -> SelfCheckResult:
    """Run every check on a fresh tiny model of `family` (one of FAMILIES); stops at the first step that raises
    (a failed check)."""
    if family not in FAMILIES:
        raise ValueError(f"self-check family {family!r}; valid: {', '.join(FAMILIES)}")
    import ficoco.models.llava  # noqa: F401 - imported before the clock starts; `seconds` times the checks
    import ficoco.models.qwen_vl  # noqa: F401

    start = time.perf_counter()
    checks: list[Check] = []
    # fork_rng: building the seeded model must not move the caller's global RNG. One thread: on
    # matrices this small, thread start-up dominates (0.2 s on 1 thread, seconds on 2 busy cores).
    # torch.device("cpu"): on the CPU even where the caller set another default device.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), torch.device("cpu"):
            if family == "llava":
                _run_checks(checks)
            else:
                _run_qwen_checks(checks, family)
    except Exception as error:  # noqa: BLE001 - any failure of the adapter is a failed check
        step = CHECK_NAMES[len(checks)] if len(checks) < len(CHECK_NAMES) else "cleanup"
        checks.append(Check(step, False, "runs without an exception", _one_line(f"{type(error).__name__}: {error}")))
    finally:
        torch.set_num_threads(threads)
    import transformers  # here: importing a model class may replace the module object in sys.modules

    return SelfCheckResult(transformers.__version__, METHOD if family == "llava" else QWEN_METHOD, tuple(checks),
                           time.perf_counter() - start, family)


def _run_checks(checks: list[Check]) -> None:
    """Append one Check per entry of CHECK_NAMES, in that order."""
    from ficoco import methods     # the one adapter-side module that runs a registered method
    from ficoco.models.llava import install_llava

    model = tiny_llava()
    pixels = torch.randn(2, 3, _IMAGE_SIZE, _IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    first = torch.tensor([PROMPTS[0]])
    reference_logits = model(input_ids=first, pixel_values=pixels[:1]).logits
    reference_tokens = _generate(model, first, torch.ones_like(first), pixels[:1]).sequences

    handle = install_llava(model, methods.get(METHOD), BUDGET, **OVERRIDES)
    try:
        plan = handle.plan
        # (1) a prefill records exactly the planned schedule
        model(input_ids=first, attention_mask=torch.ones_like(first), pixel_values=pixels[:1])
        prefill = handle.last_counts()
        text = first.shape[1] - _PLACEHOLDERS
        expected = [{"vision": [list(pair) for pair in plan.vision_counts], "visual_delivered": plan.delivered,
                     "llm": [text + visual for visual in plan.llm_visual], "llm_visual": list(plan.llm_visual)}]
        found = [{key: counts.get(key) for key in expected[0]} for counts in prefill]
        checks.append(_compare("prefill_counts", expected, found))

        # (2) decode steps must not be taken for prefills (the 5.24 keyword rename did exactly that)
        out = _generate(model, first, torch.ones_like(first), pixels[:1])
        checks.append(_compare("decode_keeps_counts", prefill, handle.last_counts()))

        # (3) the cache holds each layer's reduced prompt plus one entry per decode step
        decode_steps = out.sequences.shape[1] - first.shape[1] - 1       # the last token is never fed back
        cache = _cache_in(out)
        lengths = [cache.get_seq_length(layer) for layer in range(len(prefill[0]["llm"]))]
        checks.append(_compare("kv_cache_lengths", [n + decode_steps for n in prefill[0]["llm"]], lengths))

        # (4) left padding changes nothing: each row's tokens and counts equal the prompt alone
        ids, mask = _left_padded(PROMPTS)
        batched = _generate(model, ids, mask, pixels)
        batched_counts = handle.last_counts()
        alone_tokens, alone_counts = [], []
        for row, tokens in enumerate(PROMPTS):
            single = torch.tensor([tokens])
            alone_tokens.append(_generate(model, single, torch.ones_like(single), pixels[row:row + 1])
                                .sequences[0, len(tokens):].tolist())
            alone_counts.append(handle.last_counts()[0])
        checks.append(_compare("batch_equals_alone", {"tokens": alone_tokens, "counts": alone_counts},
                               {"tokens": batched.sequences[:, ids.shape[1]:].tolist(), "counts": batched_counts}))
    finally:
        handle.remove()

    # (5) removal restores the model exactly
    logits = model(input_ids=first, pixel_values=pixels[:1]).logits
    tokens = _generate(model, first, torch.ones_like(first), pixels[:1]).sequences
    same = (logits.shape == reference_logits.shape and bool(torch.equal(logits, reference_logits))
            and torch.equal(tokens, reference_tokens))
    found = "bit-identical" if same else (f"logits {tuple(logits.shape)} max |diff| "
                                          f"{_max_diff(logits, reference_logits)}, tokens {tokens.tolist()} vs "
                                          f"{reference_tokens.tolist()}")
    checks.append(Check("remove_restores_model", same, "bit-identical logits and tokens", found))


def _run_qwen_checks(checks: list[Check], model_type: str) -> None:
    """The checks of `_run_checks` on a tiny Qwen2-VL-family model of `model_type`, FiCoCo-L inside its LLM (and,
    in `prefill_counts`, FiCoCo-V inside its tower); the expected counts are the method's plan for the image
    (`ficoco.qwen_dims.qwen_image_plan`), made without the model."""
    from ficoco import methods
    from ficoco.models.qwen_vl import install_qwen_vl
    from ficoco.qwen_dims import QwenVLDims, qwen_image_plan

    model = tiny_qwen(model_type)
    dims = QwenVLDims.from_config(model.config)
    budget = dims.visual_tokens // 2
    generator = torch.Generator().manual_seed(1)
    patches = _QWEN_GRID[0] * _QWEN_GRID[1]
    pixels = [torch.randn(patches, dims.patch_features, generator=generator) for _ in QWEN_PROMPTS]

    def inputs(prompts, rows):
        ids, mask = _left_padded(prompts)
        return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == _IMAGE).int(),
                "pixel_values": torch.cat([pixels[row] for row in rows]),
                "image_grid_thw": torch.tensor([[1, *_QWEN_GRID]] * len(rows))}

    def generate(batch):
        return model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              return_dict_in_generate=True)

    first = inputs(QWEN_PROMPTS[:1], [0])
    reference_logits, reference_tokens = model(**first).logits, generate(first).sequences
    text = len(QWEN_PROMPTS[0]) - _QWEN_SPAN

    def planned(name: str, overrides: dict) -> dict:
        plan = qwen_image_plan(methods.get(name), dims, _QWEN_GRID, budget, **overrides)
        return {"vision": [list(pair) for pair in plan.vision_counts], "vision_grids": [list(_QWEN_GRID)],
                "visual_delivered": plan.delivered, "llm": [text + visual for visual in plan.llm_visual],
                "llm_visual": list(plan.llm_visual)}

    def recorded(counts: list[dict]) -> list[dict]:
        return [{key: row.get(key) for key in ("vision", "vision_grids", "visual_delivered", "llm", "llm_visual")}
                for row in counts]
    # FiCoCo-V inside the tower first (one handle at a time): a prefill, then `generate`, whose failure belongs
    # to check (2)
    tower = install_qwen_vl(model, methods.get(QWEN_TOWER_METHOD), budget, **QWEN_TOWER_OVERRIDES)
    tower_error = None
    try:
        model(**first)
        tower_prefill = recorded(tower.last_counts())
        try:
            generate(first)
            tower_generate = recorded(tower.last_counts())
        except Exception as error:          # noqa: BLE001 - reported as check (2)
            tower_error = error
    finally:
        tower.remove()
    handle = install_qwen_vl(model, methods.get(QWEN_METHOD), budget, **QWEN_OVERRIDES)
    try:
        # (1) a prefill records exactly the planned schedule of its image (in the LLM, and in the tower)
        model(**first)
        prefill = handle.last_counts()
        checks.append(_compare("prefill_counts", [planned(QWEN_METHOD, QWEN_OVERRIDES),
                                                  planned(QWEN_TOWER_METHOD, QWEN_TOWER_OVERRIDES)],
                               recorded(prefill) + tower_prefill))
        # (2) decode steps are not taken for prefills; `generate` encodes the image before the prefill
        out = generate(first)
        if tower_error is not None:
            raise tower_error
        checks.append(_compare("decode_keeps_counts", prefill + tower_prefill,
                               handle.last_counts() + tower_generate))
        # (3) the cache holds each layer's reduced prompt plus one entry per decode step
        decode_steps = out.sequences.shape[1] - first["input_ids"].shape[1] - 1
        cache = _cache_in(out)
        lengths = [cache.get_seq_length(layer) for layer in range(len(prefill[0]["llm"]))]
        checks.append(_compare("kv_cache_lengths", [n + decode_steps for n in prefill[0]["llm"]], lengths))
        # (4) left padding changes nothing: each row's tokens and counts equal the prompt alone
        batch = inputs(QWEN_PROMPTS, [0, 1])
        batched = generate(batch)
        batched_counts = handle.last_counts()
        alone_tokens, alone_counts = [], []
        for row, tokens in enumerate(QWEN_PROMPTS):
            alone_tokens.append(generate(inputs([tokens], [row])).sequences[0, len(tokens):].tolist())
            alone_counts.append(handle.last_counts()[0])
        checks.append(_compare("batch_equals_alone", {"tokens": alone_tokens, "counts": alone_counts},
                               {"tokens": batched.sequences[:, batch["input_ids"].shape[1]:].tolist(),
                                "counts": batched_counts}))
    finally:
        handle.remove()
    # (5) removal restores the model exactly
    logits, tokens = model(**first).logits, generate(first).sequences
    same = bool(torch.equal(logits, reference_logits)) and torch.equal(tokens, reference_tokens)
    found = "bit-identical" if same else (f"logits max |diff| {_max_diff(logits, reference_logits)}, tokens "
                                          f"{tokens.tolist()} vs {reference_tokens.tolist()}")
    checks.append(Check("remove_restores_model", same, "bit-identical logits and tokens", found))


def tiny_qwen(model_type: str):
    """A seeded random Qwen2-VL ("qwen2_vl": 2 tower blocks) or Qwen2.5-VL ("qwen2_5_vl": 3 blocks, the middle one
    full, the others in 16 px windows) with a 4-layer Qwen2 LLM (vocab 64), float32, SDPA, eval; the geometry of
    the test suite's tiny models (tests/helpers_tiny.py) with 4 px patches."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=_BOS, eos_token_id=_EOS,
                pad_token_id=_PAD, initializer_range=0.1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    geometry = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.1)
    if model_type == "qwen2_vl":
        vision = dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, **geometry)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=3, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32, window_size=16,
                      fullatt_block_indexes=[1], **geometry)
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    config = config_class(vision_config=vision, text_config=text, image_token_id=_IMAGE,
                          vision_start_token_id=_QWEN_START, vision_end_token_id=_QWEN_END,
                          video_token_id=_QWEN_VIDEO)
    torch.manual_seed(0)
    model = model_class(config).to(torch.float32).eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = _PAD
    return model


def tiny_llava():
    """A seeded random LlavaForConditionalGeneration (CLIP 4 x 32, Llama 4 x 32, vocab 64), float32, eval.

    The same geometry as the test suite's tiny model; `initializer_range` is raised so attention is
    peaked enough for the methods' scores to differ.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              image_size=_IMAGE_SIZE, patch_size=_PATCH, projection_dim=32, initializer_range=0.1)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=_PAD, bos_token_id=_BOS, eos_token_id=_EOS, initializer_range=0.1)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=_IMAGE,
                         image_seq_length=_PLACEHOLDERS, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = _PAD
    return model


def _generate(model, ids, mask, pixels):
    return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)


def _cache_in(output):
    """The KV cache of a generate output, found by type (its attribute was renamed in 5.24, too)."""
    from transformers.cache_utils import Cache

    caches = [value for value in output.values() if isinstance(value, Cache)]
    if len(caches) != 1:
        raise RuntimeError(f"{len(caches)} KV cache objects in the generate output (fields {list(output.keys())}); "
                           f"expected exactly one")
    return caches[0]


def _left_padded(prompts) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), _PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, tokens in enumerate(prompts):
        ids[row, length - len(tokens):] = torch.tensor(tokens)
        mask[row, length - len(tokens):] = 1
    return ids, mask


def _compare(name: str, expected, found) -> Check:
    return Check(name, expected == found, _one_line(repr(expected)), _one_line(repr(found)))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{(a - b).abs().max().item():.3g}" if a.shape == b.shape else "n/a (shapes differ)"


def _one_line(text: str, limit: int = 400) -> str:
    """Messages built from these go on one line; long reprs are cut."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."

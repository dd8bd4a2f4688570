"""Measured speed of one (model, method, budget): latency, peak memory, throughput.

Speed does not depend on the weights, so the model is built from its config.json alone with random
weights; this runs wherever the config is, weights or not. The prompt is synthetic: BOS and
`prompt_tokens` text tokens around one image's placeholders, and a random image.

Timing. One `generate` call per repeat, greedy, exactly `new_tokens` new tokens. A logits
processor marks the end of every forward pass: the first mark is the time to first token
(prefill: vision tower, projector, LLM prefill, LM head), the later marks are the decode steps.
On GPU the marks are CUDA events on the current stream (read after one synchronize at the end);
on CPU they are `time.perf_counter()` readings (CPU kernels run synchronously). Warm-up runs
are not timed. Every latency is reported as the median over the repeats, with the raw values.

Peak memory. GPU: `torch.cuda.max_memory_allocated` over the timed repeats (weights included;
statistics reset after warm-up). CPU: the process's peak resident set size from
`resource.getrusage(RUSAGE_SELF).ru_maxrss` — a lifetime high-water mark of the whole process
(Python, libraries, model build and the runs), so it only bounds the run's own peak from above.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from ficoco.budget_labels import FULL, RUN_LABELS, ImageTokens, is_run_label, run_label_problem
from ficoco.evaluate import offline_environment
from ficoco.journal import atomic_write_json, remove_stale_temporaries

DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")


def resolve_config_path(model_dir_or_config: str | os.PathLike) -> Path:
    """A model directory (its config.json) or a config.json path."""
    path = Path(model_dir_or_config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no model config at {path}: give a model directory or its config.json")
    return path


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise ValueError(f"device={device!r}: valid choices are {list(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use 'cpu' or 'auto'")
    return device


def random_companion(model, config_path: Path):
    """A random-weight CLIP text tower beside the random model, shaped as the model directory's companion
    (`clip/config.json`) when it has one, else as CLIP ViT-L/14-336's."""
    from transformers import CLIPConfig

    from ficoco.models.companion import COMPANION_DIR, random_text_tower

    clip_config = config_path.parent / COMPANION_DIR / "config.json"
    return random_text_tower(model, CLIPConfig.from_json_file(str(clip_config)) if clip_config.is_file() else None)


def default_image_size(dims) -> tuple[int, int] | None:
    """The image measured unless one is given: LLaVA-NeXT's largest canvas (the most tower passes; 672 × 672
    on LLaVA-NeXT-7B), a Qwen2-VL-family model's nominal image (its largest: 1,280 tokens, 896 × 1120 px, what
    budgets are stated on), and None for LLaVA-1.5 (every image is one size)."""
    from ficoco.qwen_dims import QwenVLDims

    if isinstance(dims, QwenVLDims):
        rows, columns = dims.nominal_grid
        return rows * dims.patch_size, columns * dims.patch_size
    return dims.largest_canvas if dims.image_grid_pinpoints else None


def build_random_model(config_path: Path, dtype: str, device: str, attn_implementation: str, seed: int):
    """The model of config.json's family (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL) with random weights, in eval
    mode on `device`."""
    import torch
    from transformers import AutoConfig

    from ficoco.models import model_class

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: valid choices are {list(DTYPES)}")
    config_dict = json.loads(config_path.read_text())
    model_type = config_dict.pop("model_type", "llava")
    cls = model_class(model_type)
    config = AutoConfig.for_model(model_type, **config_dict)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: a 7B model never passes through host memory
        model = cls._from_config(config, dtype=getattr(torch, dtype), attn_implementation=attn_implementation)
    return model.eval()


def synthetic_inputs(model, batch_size: int, prompt_tokens: int, seed: int,
                     image_size: tuple[int, int] | None = None) -> dict:
    """input_ids = BOS + text + image placeholders + text (prompt_tokens text tokens incl. BOS;
    at least one after the image, as an instruction), attention mask and random pixel values.

    LLaVA-NeXT: an image of `image_size` (height, width) pixels: its AnyRes layout's placeholders, one
    random pixel crop per tower pass, and `image_sizes`. Qwen2-VL family: `qwen_synthetic_inputs`."""
    import torch

    from ficoco.dims import dims_from_config
    from ficoco.qwen_dims import QwenVLDims

    if prompt_tokens < 2:
        raise ValueError(f"prompt_tokens={prompt_tokens}: need >= 2 (BOS and one instruction token after the image)")
    config = model.config
    dims = dims_from_config(config)
    if isinstance(dims, QwenVLDims):
        return qwen_synthetic_inputs(model, dims, batch_size, prompt_tokens, seed, image_size)
    if dims.image_grid_pinpoints and image_size is None:
        raise ValueError("image_size: a LLaVA-NeXT model's prompt depends on the image's (height, width); pass it")
    if not dims.image_grid_pinpoints and image_size is not None:
        raise ValueError(f"image_size={image_size}: this model encodes every image at {dims.image_size} px; "
                         f"image sizes are for LLaVA-NeXT and Qwen2-VL-family models")
    layout = dims.anyres_layout(*image_size) if image_size is not None else None
    text_config = config.text_config
    generator = torch.Generator().manual_seed(seed)
    reserved = {config.image_token_id, text_config.pad_token_id, text_config.bos_token_id, text_config.eos_token_id}
    allowed = torch.tensor([i for i in range(text_config.vocab_size) if i not in reserved])
    before = prompt_tokens // 2 - 1          # text between BOS and the image
    after = prompt_tokens - 1 - before       # instruction after the image (>= 1)
    bos = text_config.bos_token_id if text_config.bos_token_id is not None else int(allowed[0])

    def text(n: int) -> torch.Tensor:
        return allowed[torch.randint(len(allowed), (batch_size, n), generator=generator)]

    input_ids = torch.cat([
        torch.full((batch_size, 1), bos),
        text(before),
        torch.full((batch_size, dims.visual_tokens if layout is None else layout.delivered), config.image_token_id),
        text(after),
    ], dim=1)
    crops = () if layout is None else (layout.tower_passes,)                   # LLaVA-NeXT: (B, passes, 3, S, S)
    pixel_values = torch.randn(batch_size, *crops, 3, dims.image_size, dims.image_size, generator=generator)
    inputs = {
        "input_ids": input_ids.to(model.device),
        "attention_mask": torch.ones_like(input_ids).to(model.device),
        "pixel_values": pixel_values.to(model.device, model.dtype),
    }
    if layout is not None:
        inputs["image_sizes"] = torch.tensor([list(image_size)] * batch_size, device=model.device)
    return inputs


def qwen_synthetic_inputs(model, dims, batch_size: int, prompt_tokens: int, seed: int,
                          image_size: tuple[int, int] | None) -> dict:
    """A Qwen2-VL-family prompt as its processor gives one: text, the vision start marker, the placeholders of
    an image of `image_size` (height, width; required), the end marker, text (`prompt_tokens` text tokens, the
    markers among them, at least one after the image); random patches, `image_grid_thw`, `mm_token_type_ids`."""
    import torch

    if image_size is None:
        raise ValueError("image_size: a Qwen2-VL-family model's prompt depends on the image's (height, width); pass it")
    if prompt_tokens < 3:
        raise ValueError(f"prompt_tokens={prompt_tokens}: need >= 3 (the vision start and end markers and one "
                         f"instruction token after the image)")
    config = model.config
    markers = (config.vision_start_token_id, config.vision_end_token_id)
    reserved = {config.image_token_id, config.video_token_id, *markers, config.text_config.pad_token_id,
                config.text_config.eos_token_id}
    allowed = torch.tensor([i for i in range(config.text_config.vocab_size) if i not in reserved])
    generator = torch.Generator().manual_seed(seed)
    before = prompt_tokens // 2 - 1          # text before the image's start marker
    after = prompt_tokens - 2 - before       # instruction after its end marker (>= 1)
    grid = dims.patch_grid(*image_size)

    def text(n: int) -> torch.Tensor:
        return allowed[torch.randint(len(allowed), (batch_size, n), generator=generator)]

    input_ids = torch.cat([
        text(before), torch.full((batch_size, 1), markers[0]),
        torch.full((batch_size, dims.image_tokens(*image_size)), config.image_token_id),
        torch.full((batch_size, 1), markers[1]), text(after),
    ], dim=1)
    pixel_values = torch.randn(batch_size * grid[0] * grid[1], dims.patch_features, generator=generator)
    return {
        "input_ids": input_ids.to(model.device),
        "attention_mask": torch.ones_like(input_ids).to(model.device),
        "mm_token_type_ids": (input_ids == config.image_token_id).int().to(model.device),
        "pixel_values": pixel_values.to(model.device, model.dtype),
        "image_grid_thw": torch.tensor([[1, *grid]] * batch_size, device=model.device),
    }


class _StepClock:
    """Marks the end of every forward pass of `generate` (called as a logits processor)."""

    def __init__(self, cuda: bool):
        import torch

        self.cuda = cuda
        self._event = (lambda: torch.cuda.Event(enable_timing=True)) if cuda else None
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = self._event()
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def __call__(self, input_ids, scores):
        self.mark()
        return scores

    def seconds(self) -> list[float]:
        """Seconds from the first mark (the start) to every later mark."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return [self.marks[0].elapsed_time(mark) / 1000.0 for mark in self.marks[1:]]
        return [mark - self.marks[0] for mark in self.marks[1:]]


def _timed_generate(model, inputs: dict, new_tokens: int, cuda: bool) -> dict:
    """One generate call: prefill (time to first token), per decode token and end-to-end seconds."""
    import torch
    from transformers import LogitsProcessorList

    clock = _StepClock(cuda)
    clock.mark()                                                   # start
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, num_beams=1, logits_processor=LogitsProcessorList([clock]))
    clock.mark()                                                   # end
    marks = clock.seconds()                                        # [step 1, ..., step G, end]
    generated = output.shape[1] - inputs["input_ids"].shape[1]
    if generated != new_tokens or len(marks) != new_tokens + 1:
        raise RuntimeError(f"generate produced {generated} tokens in {len(marks) - 1} steps; expected {new_tokens}")
    prefill, end = marks[0], marks[-1]
    per_token = (marks[new_tokens - 1] - prefill) / (new_tokens - 1) if new_tokens > 1 else None  # no decode step
    return {"prefill_s": prefill, "per_token_s": per_token, "end_to_end_s": end}


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def measure(
    model_dir_or_config,
    method: str = "vanilla",
    budget: int | ImageTokens | None = None,
    overrides: dict | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 1,
    warmup: int = 2,
    repeats: int = 5,
    prompt_tokens: int = 60,
    new_tokens: int = 16,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    model_name: str | None = None,
    progress: bool = True,
    image_size: tuple[int, int] | None = None,
) -> dict:
    """Latency (prefill, per decode token, end-to-end; medians), peak memory and throughput.

    budget None = unreduced (method "vanilla"), or the adaptive reduction of an adaptive method (job
    budget "adaptive"; its costs come from the realised counts). `image_size` (height, width): the
    image of a LLaVA-NeXT or Qwen2-VL-family model (default: `default_image_size`). Returns a JSON-able dict (see
    docs/flops.md).
    """
    import torch
    import transformers
    from tqdm import tqdm

    import ficoco
    from ficoco.dims import dims_from_config
    from ficoco.flops import sample_cost
    from ficoco.invariants import check_cost, checked_counts
    from ficoco import methods
    from ficoco.methods import budget_label

    if repeats < 1 or warmup < 0 or batch_size < 1 or new_tokens < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, batch_size >= 1, new_tokens >= 1; got "
                         f"repeats={repeats}, warmup={warmup}, batch_size={batch_size}, new_tokens={new_tokens}")
    overrides = dict(overrides or {})
    config_path = resolve_config_path(model_dir_or_config)
    device = resolve_device(device)
    cuda = device == "cuda"
    model = build_random_model(config_path, dtype, device, attn_implementation, seed)
    dims = dims_from_config(model.config)
    text_tower = random_companion(model, config_path) if methods.get(method).needs_text_tower else None
    handle = ficoco.apply(model, method, budget, text_tower=text_tower, **overrides)
    if image_size is None:
        image_size = default_image_size(dims)
    inputs = synthetic_inputs(model, batch_size, prompt_tokens, seed, image_size)

    for _ in range(warmup):
        _timed_generate(model, inputs, new_tokens, cuda)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    runs = [_timed_generate(model, inputs, new_tokens, cuda)
            for _ in tqdm(range(repeats), desc=f"measure {method} b{budget_label(method, budget)}",
                          disable=not progress)]
    if cuda:
        peak_memory, peak_source = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        peak_memory, peak_source = _peak_rss_bytes(), "resource.getrusage(RUSAGE_SELF).ru_maxrss (process lifetime)"

    # numbers that cannot be true fail the job here, as an evaluate job's do (ficoco.invariants): every row's
    counts, plan = checked_counts(handle, inputs)[0], handle.row_plans()[0]
    handle.remove()
    cost = sample_cost(dims, counts, new_tokens)
    check_cost(method, cost, has_image=True)
    medians = {key: None if runs[0][key] is None else statistics.median(run[key] for run in runs)
               for key in ("prefill_s", "per_token_s", "end_to_end_s")}
    return {
        "job": {"model": model_name or config_path.parent.name, "method": method,
                "budget": int(budget) if isinstance(budget, int) else budget_label(method, budget)},
        **medians,
        "throughput": batch_size / medians["end_to_end_s"],
        "throughput_unit": "samples/s (one image per sample)",
        "latency": {key: [run[key] for run in runs] for key in medians},
        "peak_memory_bytes": int(peak_memory),
        "peak_memory_source": peak_source,
        "timer": "cuda events" if cuda else "time.perf_counter",
        "model_config": str(config_path),
        "overrides": overrides,
        "device": device,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": dtype,
        "attn_implementation": attn_implementation,
        "batch_size": batch_size,
        "warmup": warmup,
        "repeats": repeats,
        "prompt_tokens": prompt_tokens,
        "visual_tokens": dims.visual_tokens,
        "image_size": None if image_size is None else list(image_size),
        "input_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": new_tokens,
        "adapter": "ficoco.apply",
        "plan": plan.to_dict(),
        "counts": counts,
        "cost": cost,
        "versions": {"ficoco": ficoco.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }


def _budget(text: str) -> str:
    """The budget label as given: 'full' ('none'), 'adaptive', a positive integer or n<tokens> (checked against the
    method in `main`)."""
    if text == "none":
        return FULL
    if is_run_label(text):
        return text
    raise argparse.ArgumentTypeError(f"budget {text!r}: valid values are {RUN_LABELS}")


def _overrides(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"overrides {text!r} is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"overrides {text!r}: expected a JSON object")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ficoco measure",
        description="Latency (prefill, per decode token, end-to-end), peak memory and throughput of one "
                    "(model, method, budget), with random weights built from the model's config.json.")
    parser.add_argument("--model-config", required=True, help="a model directory or its config.json")
    parser.add_argument("--model-name", default=None, help="name recorded in the JSON (default: the config's folder)")
    parser.add_argument("--method", default="vanilla")
    parser.add_argument("--budget", type=_budget, default=FULL,
                        help="visual-token budget, 'full' (unreduced) or 'adaptive' (an adaptive method's own counts)")
    parser.add_argument("--budget-label", help="the grid's label for this budget, when it differs: a TFLOPs "
                                               "target ('t2.4') that the grid solved into --budget")
    parser.add_argument("--overrides", type=_overrides, default={}, help="method overrides as a JSON object")
    parser.add_argument("--calibration", help="a calibrated method's fitted parameters (`ficoco calibrate`'s JSON)")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--attn-implementation", default="sdpa", help="the same kernel for every method (sdpa)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=60, help="text tokens around the image, BOS included")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="LLaVA-NeXT, Qwen2-VL family: the image's size in pixels (default: LLaVA-NeXT's "
                             "largest canvas, Qwen's nominal 1,280-token image)")
    parser.add_argument("--out", required=True, help="results/measure/{model}/{method}/b{budget}.json")
    args = parser.parse_args(argv)
    offline_environment()                       # random weights from config.json: nothing to download
    if args.method == "vanilla" and args.budget != FULL:
        parser.error(f"--method vanilla takes --budget full; got {args.budget}")
    problem = run_label_problem(args.budget_label, args.budget)
    if problem:
        parser.error(problem)
    from ficoco.calibrate import with_calibration
    from ficoco.methods import budget_from_label

    try:
        budget = budget_from_label(args.method, args.budget)
        overrides = with_calibration(args.method, budget, args.overrides, args.calibration,
                                     resolve_config_path(args.model_config).parent)
    except ValueError as error:
        parser.error(str(error))
    result = measure(args.model_config, args.method, budget, overrides, args.device, args.dtype,
                     args.batch_size, args.warmup, args.repeats, args.prompt_tokens, args.new_tokens,
                     args.attn_implementation, args.seed, args.model_name,
                     image_size=None if args.image_size is None else tuple(args.image_size))
    result["job"].update(budget=args.budget_label or result["job"]["budget"], run_budget=args.budget)
    remove_stale_temporaries(args.out)             # what a killed earlier attempt's atomic write left
    atomic_write_json(args.out, result)
    per_token = "n/a" if result["per_token_s"] is None else f"{result['per_token_s'] * 1e3:.2f} ms"
    print(f"{args.out}: prefill {result['prefill_s'] * 1e3:.2f} ms, per decode token {per_token}, "
          f"end-to-end {result['end_to_end_s'] * 1e3:.2f} ms, peak {result['peak_memory_bytes'] / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

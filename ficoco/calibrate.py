"""Calibration: what a `calibrated` method fits on calibration prompts before its jobs run.

FitPrune's deletion schedule (ficoco/methods/fitprune.py) is fitted per model and budget on a
calibration set (config `calibration`: a registered benchmark that is not evaluated, e.g. the toy
world's train split), as the pipeline's `calibrate` rule:

    ficoco calibrate --model-dir DIR --benchmark-dir DIR --benchmark-module NAME --method fitprune
                     --budget B --rows N --out results/calibration/{model}/{method}/b{budget}.json

The artifact records the fit (α, the deletions per layer, their layer average, each bisection trial)
and what it was fitted for: method, budget, parameters, model and calibration-set revisions. An
evaluate or measure job reads it (`ficoco run --calibration FILE`) through `fitted_overrides`, which
refuses an artifact made for another model revision, budget or parameters: nothing stale is used.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ficoco.evaluate import offline_environment
from ficoco.journal import atomic_write_json

FITTED = ("deletions",)          # the parameters a fit sets (FitPrune's schedule)


@dataclass(frozen=True)
class FitResult:
    alpha: float                  # the smallest share of attention mass (to ε) whose schedule meets the budget
    deletions: list[int]          # visual tokens deleted after the attention of each LLM layer
    layer_average: float          # the realised layer average of visual tokens (<= budget)
    trials: list[dict]            # every α tried: {"alpha", "layer_average" (None: budget not met)}


def fit_fitprune(model, prompts: list[dict], budget: int, epsilon: float, progress: bool = True) -> FitResult:
    """Fit FitPrune's deletion schedule for `budget` on `prompts` (model inputs, one prompt each).

    One unreduced prefill per prompt records each layer's self and cross mass; then α is bisected on
    [0, 1] to `epsilon`, each trial a prefill per prompt deleting what α allows (methods/fitprune.py).
    Raises InfeasibleBudget when even α = 1 does not meet the budget.
    """
    import torch
    from tqdm import tqdm

    import ficoco
    from ficoco.budget import InfeasibleBudget, layer_average
    from ficoco.dims import dims_from_config
    from ficoco.methods import fitprune

    dims = dims_from_config(model.config)
    n_layers, n0 = dims.llm_layers, dims.visual_tokens
    bisections = math.ceil(math.log2(1 / epsilon))                # trials after α = 1
    bar = tqdm(total=len(prompts) * (2 + bisections),
               desc=f"fit fitprune b{budget}", unit="prefill", disable=not progress)

    def prefill(step, inputs) -> None:
        with ficoco.apply(model, fitprune.fit_method(step)), torch.inference_mode():
            model(**inputs)
        bar.update(1)

    masses = []
    for inputs in prompts:
        recorded: dict = {}
        prefill(fitprune.statistics_step(n_layers, recorded), inputs)
        masses.append(recorded)

    trials: list[dict] = []

    # each prompt's image span: the nominal image's on LLaVA-1.5; on LLaVA-NeXT its own, so its deletions
    # count for the nominal image in proportion (n0 / span), as the fitted schedule is scaled back per span
    scales = [n0 / int((inputs["input_ids"] == model.config.image_token_id).sum()) for inputs in prompts]

    def deletions_at(alpha: float) -> list[list[float]]:
        """Each prompt's deletions per layer when a layer may lose the share α of its mass, for the nominal image."""
        deleted = []
        for inputs, prompt_masses, scale in zip(prompts, masses, scales):
            counts: dict = {}
            prefill(fitprune.fitting_step(n_layers, alpha, prompt_masses, counts), inputs)
            deleted.append([counts.get(layer, 0) * scale for layer in range(n_layers)])
        return deleted

    def schedule_at(alpha: float, deleted: list[list[int]] | None = None) -> list[int] | None:
        cut = fitprune.fitted_schedule(deleted or deletions_at(alpha), n0, budget)
        average = None if cut is None else layer_average(fitprune.schedule_counts(cut, n0))
        trials.append({"alpha": alpha, "layer_average": average})
        return cut

    low, high = 0.0, 1.0
    deleted = deletions_at(high)
    best = schedule_at(high, deleted)
    if best is None:
        bar.close()
        fewest = layer_average(fitprune.schedule_counts(fitprune.mean_deletions(deleted), n0))
        raise InfeasibleBudget(f"fitprune: budget {budget} is out of reach even when every layer may lose all its "
                               f"attention mass (α = 1): the fewest visual tokens it reaches are a layer average of "
                               f"{fewest:.2f} on this calibration set; raise the budget")
    best_alpha = high
    while high - low > epsilon:
        middle = (low + high) / 2
        cut = schedule_at(middle)
        if cut is None:
            low = middle
        else:
            high, best, best_alpha = middle, cut, middle
    bar.close()
    average = layer_average(fitprune.schedule_counts(best, n0))
    return FitResult(alpha=best_alpha, deletions=best, layer_average=average, trials=trials)


def fitted_overrides(path: str | Path, *, method: str, budget: int, params: dict, model_dir: str | Path) -> dict:
    """The fitted parameters of a calibration artifact, after checking it was made for this job: the
    same method, budget, parameters (other than the fitted ones) and model revision."""
    from ficoco.fingerprint import read_manifest

    artifact = json.loads(Path(path).read_text(encoding="utf-8"))
    model = read_manifest(model_dir)
    expected = {"method": method, "budget": budget, "model_revision": model.get("revision"),
                "params": {key: value for key, value in params.items() if key not in FITTED}}
    stale = [f"{key} {artifact.get(key)!r} (this job: {value!r})" for key, value in expected.items()
             if json.dumps(artifact.get(key), sort_keys=True) != json.dumps(value, sort_keys=True)]
    if stale:
        raise ValueError(f"{path}: this calibration was fitted for another job: {'; '.join(stale)}; fit it again "
                         f"(`ficoco calibrate`, or let Snakemake rerun the calibrate rule)")
    return {key: artifact["fit"][key] for key in FITTED}


def with_calibration(method: str, budget: int | None, overrides: dict, calibration: str | Path | None,
                     model_dir: str | Path) -> dict:
    """A job's method overrides with its calibration's fitted parameters merged in (evaluate, measure).

    A calibrated method at a budget needs its artifact; any other job must not be given one."""
    from ficoco import methods as method_registry

    registered = method_registry.get(method)
    if calibration is None:
        if registered.calibrated and budget is not None and not set(FITTED) <= set(overrides):
            raise ValueError(f"{method} at budget {budget} needs its fitted calibration: pass --calibration FILE "
                             f"(written by `ficoco calibrate`, the pipeline's calibrate rule)")
        return dict(overrides)
    if not registered.calibrated or budget is None:
        raise ValueError(f"--calibration {calibration}: {method} at budget {budget} fits nothing; a calibration "
                         f"belongs to a calibrated method at a token budget")
    params = registered.resolve(overrides)
    return {**overrides, **fitted_overrides(calibration, method=method, budget=budget, params=params,
                                            model_dir=model_dir)}


def calibrate(*, model_dir, benchmark_dir, benchmark_module: str, method: str, budget: int, rows: int, out,
              overrides: dict | None = None, options: dict | None = None,
              template: str = "USER: <image>\n{prompt} ASSISTANT:", dtype: str = "float32",
              image_preprocessing: str = "none", device: str = "auto", progress: bool = True) -> dict:
    """Fit `method` at `budget` on the first `rows` image rows of the calibration benchmark; write `out`."""
    from ficoco import benchmarks as benchmark_registry
    from ficoco import methods as method_registry
    from ficoco.benchmarks.fetch import load_local
    from ficoco.benchmarks.rows import check_row
    from ficoco.dims import dims_from_config
    from ficoco.evaluate import Generator, load_model, pick_device
    from ficoco.fingerprint import library_versions, read_manifest

    offline_environment()
    registered = method_registry.get(method)
    if not registered.calibrated:
        calibrated = [name for name in method_registry.names() if method_registry.get(name).calibrated]
        raise ValueError(f"{method}: nothing to calibrate (it fits no parameters); calibrated methods: {calibrated}")
    params = registered.resolve(overrides or {})
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget={budget!r}: a calibration fits a token budget, an integer >= 1")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows={rows!r}: the calibration set needs at least one row")
    bench = benchmark_registry.get(benchmark_module)
    dataset, _ = load_local(benchmark_dir, expected_options=options or {}, module=benchmark_module, safe=True)
    chosen, skipped = [], 0            # the first `rows` good rows with an image; bad ones are counted
    for index in range(len(dataset)):
        if len(chosen) == rows:
            break
        row = check_row(dataset[index], bench)
        if json.loads(row["meta"]).get("bad_row") or row["image"] is None:
            skipped += 1
        else:
            chosen.append(row)
    if len(chosen) < rows:
        raise ValueError(f"{benchmark_dir}: {len(chosen)} good rows with an image ({skipped} skipped); the "
                         f"calibration asks for {rows}: lower calibration.rows or choose a larger set")
    device = pick_device(device)
    model, processor = load_model(model_dir, device, dtype)
    generator = Generator(model, processor, None, bench, options or {}, template, image_preprocessing, None)
    prompts = [generator.inputs([row]) for row in chosen]
    start = time.perf_counter()
    fit = fit_fitprune(model, prompts, budget, params["epsilon"], progress=progress)
    registered.plan(dims_from_config(model.config), budget,
                    **{**(overrides or {}), "deletions": fit.deletions})             # the fit plans, or fails here
    artifact = {
        "method": method, "budget": budget, "params": {k: v for k, v in params.items() if k not in FITTED},
        "model_revision": read_manifest(model_dir).get("revision"),
        "calibration": {"benchmark_dir": str(benchmark_dir), "benchmark_module": benchmark_module,
                        "benchmark_checksum": read_manifest(benchmark_dir).get("checksum"),
                        "rows": rows, "ids": [str(row["id"]) for row in chosen], "skipped_rows": skipped},
        "fit": asdict(fit), "seconds": round(time.perf_counter() - start, 1), "versions": library_versions(),
    }
    atomic_write_json(Path(out), artifact)
    return artifact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ficoco calibrate",
                                     description="Fit a calibrated method's parameters (FitPrune's deletion "
                                                 "schedule) for one model and budget on a calibration set.")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--benchmark-dir", required=True, help="the calibration set (a fetched or built benchmark)")
    parser.add_argument("--benchmark-module", required=True, help="its registered prompt module")
    parser.add_argument("--method", required=True)
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--rows", type=int, required=True, help="calibration prompts (the first rows with an image)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--overrides", default="{}", help="method hyperparameters as JSON")
    parser.add_argument("--options", default="{}", help="benchmark options as JSON")
    parser.add_argument("--template", default=json.dumps("USER: <image>\n{prompt} ASSISTANT:"),
                        help="the prompt template as a JSON string (as `ficoco run` takes it)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--image-preprocessing", default="none", choices=["none", "pad"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    offline_environment()                       # before the first Hugging Face import
    try:
        overrides, options, template = json.loads(args.overrides), json.loads(args.options), json.loads(args.template)
        artifact = calibrate(model_dir=args.model_dir, benchmark_dir=args.benchmark_dir,
                             benchmark_module=args.benchmark_module, method=args.method, budget=args.budget,
                             rows=args.rows, out=args.out, overrides=overrides, options=options,
                             template=template, dtype=args.dtype, image_preprocessing=args.image_preprocessing,
                             device=args.device, progress=not args.no_progress)
    except (ValueError, json.JSONDecodeError) as error:
        print(f"ficoco calibrate: {error}", file=sys.stderr)
        return 2
    fit = artifact["fit"]
    print(f"{args.method} b{args.budget}: α = {fit['alpha']:.4f}, deletions {fit['deletions']}, layer average "
          f"{fit['layer_average']:.2f} -> {args.out}")
    return 0

"""`ficoco toy ...`: build the embedded toy world.

    ficoco toy build-benchmark --out DIR [--seed 1234] [--rows 500] [--split test | val | train]
    ficoco toy build-model --out DIR [--seed 0] [--train | --no-train] [--steps N] [--size default]
                           [--recipe end-to-end | staged]
    ficoco toy measure --model DIR --benchmark DIR [--keep 48 32 16] [--rows N]
    ficoco toy pretrain-clip --out DIR [--seed 0] [--steps 300] [--batch-size 64]
    ficoco toy inspect-tower --model DIR [--rows 256]

Both builders write to a temporary directory next to DIR and rename it into place, and both are
idempotent: when DIR's manifest records the same request (and, for the model, the same config
hash), they print "up to date" and change nothing.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import sys
from pathlib import Path

from ficoco.journal import staged_directory
from ficoco.models.companion import COMPANION_DIR as CLIP_DIR   # a staged toy model's pretrained CLIPModel
from ficoco.toy import model_code_digest

GENERATOR_VERSION = 1           # bump when shapes.py changes what a (seed, index) renders


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_manifest(directory: Path) -> dict | None:
    path = directory / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _built_for(out: Path, request: dict) -> dict | None:
    """The manifest of the model directory `out` when it was built for exactly `request`, else None."""
    existing = _read_manifest(out)
    if existing and existing.get("request") == request and (out / "config.json").is_file():
        return existing
    return None


def _use_available_cores() -> None:
    """torch's thread count, capped at the CPUs there are (OMP_NUM_THREADS, set by the rules, lowers it)."""
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))


def _training_summary(result: dict) -> dict:
    """Seconds, threads and the mean loss at the start and the end of a training run."""
    import torch

    losses = result["losses"]
    return {"seconds": round(result["seconds"], 1), "threads": torch.get_num_threads(),
            "loss_first_10": round(float(sum(losses[:10]) / len(losses[:10])), 4),
            "loss_last_50": round(float(sum(losses[-50:]) / len(losses[-50:])), 4)}


# --------------------------------------------------------------------------------------------
# benchmark

def build_benchmark(out, seed: int = 1234, rows: int = 500, split: str = "test") -> dict:
    """Render `rows` samples of a split into `out` (contracts §5 benchmark directory); returns the manifest.

    split: "test" (held out: what the grid evaluates), "val", or "train" (the training stream, e.g. as
    the calibration set of FitPrune's fit, which the authors draw from LLaVA's training data)."""
    from datasets import Dataset, Features, Image, List, Value

    from ficoco.toy import shapes

    if rows < 1:
        raise ValueError(f"rows={rows}: must be at least 1")
    out = Path(out)
    request = {"seed": int(seed), "rows": int(rows), "generator_version": GENERATOR_VERSION,
               **({"split": split} if split != "test" else {})}   # a test manifest reads as before
    existing = _read_manifest(out)
    if existing and existing.get("config") == request and (out / "data").is_dir():
        print(f"toy benchmark {out} is up to date ({rows} rows, seed {seed})")
        return existing

    samples = shapes.samples(seed, split, rows)
    features = Features({
        "id": Value("string"), "image": Image(), "question": Value("string"),
        "answers": List(Value("string")), "choices": List(Value("string")), "meta": Value("string"),
    })
    dataset = Dataset.from_dict({
        "id": [s.id for s in samples],
        "image": [{"bytes": shapes.png_bytes(s.image()), "path": None} for s in samples],
        "question": [s.question for s in samples],
        "answers": [[s.answer] for s in samples],
        "choices": [[] for _ in samples],
        "meta": [json.dumps(s.meta(), sort_keys=True) for s in samples],
    }, features=features)
    checksum = shapes.checksum(samples)
    manifest = {
        "benchmark": "toy", "id": "ficoco/toy-shapes", "config": request, "split": split,
        "revision": checksum[:16], "resolved_revision": checksum[:16], "rows": len(samples),
        "checksum": checksum, "bad_rows": 0, "fetched_at": _now(), "source": "toy",
    }
    with staged_directory(out) as staging:
        dataset.save_to_disk(str(staging / "data"))
        _write_json(staging / "manifest.json", manifest)
    print(f"toy benchmark: {rows} rows of the {split} split (seed {seed}) -> {out}")
    return manifest


# --------------------------------------------------------------------------------------------
# model

def _files_hash(directory: Path, names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0")
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()


def build_model(out, seed: int = 0, train: bool = True, steps: int | None = None, size: str = "default",
                progress: bool = True, eval_rows: int = 200, recipe: str = "end-to-end",
                overrides: dict | None = None) -> dict:
    """Build (and by default train) the toy LLaVA into `out`; returns the manifest.

    recipe: "end-to-end" or "staged" (ficoco/toy/train.py); overrides: TrainSettings fields on top
    of the recipe's defaults (tests use them for short runs). A staged build also writes its
    pretrained CLIP model (tower + text encoder) to `out/clip/`; untrained, a random CLIP model
    whose tower the LLaVA takes (so CDPruner's text tower is there on random weights too).
    """
    from ficoco.toy import model as toy_model
    from ficoco.toy import shapes
    from ficoco.toy import train as toy_train

    out = Path(out)
    config = toy_model.toy_llava_config(size)
    settings = toy_train.TrainSettings.for_recipe(
        recipe, seed=int(seed), size=size, **({"steps": int(steps)} if steps is not None else {}), **(overrides or {}))
    if settings.steps < 1:
        raise ValueError(f"steps={settings.steps}: must be at least 1")
    request = {"seed": int(seed), "train": bool(train), "size": size,
               "config_hash": toy_model.config_hash(config), "code": model_code_digest(),
               "training": settings.to_dict() if train else None,
               **({} if train else {"recipe": settings.recipe})}   # untrained staged: a random CLIP companion
    existing = _built_for(out, request)
    if existing:
        print(f"toy model {out} is up to date ({'trained' if train else 'random weights'}, seed {seed})")
        return existing

    _use_available_cores()
    processor = toy_model.build_processor()
    model = toy_model.build_model(seed, size)
    training, clip = None, None
    if not train and settings.recipe == "staged":     # the tower is its CLIP's, as when trained: random weights
        clip, clip_processor = toy_model.build_clip(settings.clip.seed, size), toy_model.build_clip_processor()
        model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    if train:
        stages = {}
        if settings.recipe == "staged":
            clip, clip_processor, stages["clip"] = _pretrained_clip(settings.clip, size, eval_rows, progress)
            model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
            if settings.align_steps > 0:
                stages["align"] = _training_summary(toy_train.align_projector(model, processor, settings, progress))
        training = _training_summary(toy_train.train(model, processor, settings, progress=progress))
        if stages:
            _require_same_tower(model.model.vision_tower, clip.vision_model)
            stages["instruct"] = dict(training)
            training["stages"] = stages
            training["seconds"] = round(sum(stage["seconds"] for stage in stages.values()), 1)
        if eval_rows > 0:
            rows = shapes.samples(seed, "val", eval_rows)
            predictions = toy_train.generate_answers(model, processor, rows)
            training["val_accuracy"] = round(100 * toy_train.accuracy(predictions, [r.answer for r in rows]), 2)
            training["val_rows"] = eval_rows
            training["cls"] = _cls_share(model.model.vision_tower, processor, rows, config.vision_feature_layer)

    with staged_directory(out) as staging:
        model.save_pretrained(str(staging))
        processor.save_pretrained(str(staging))
        files = sorted(p.name for p in staging.iterdir() if p.is_file())
        revision = _files_hash(staging, files)[:16]
        manifest = {
            "id": toy_model.MODEL_ID, "revision": revision, "resolved_revision": revision, "source": "toy",
            "files": files, "fetched_at": _now(), "request": request, "training_result": training,
            "prompt_template": toy_model.PROMPT_TEMPLATE,
            "visual_tokens": config.image_seq_length,
        }
        if clip is not None:
            clip.save_pretrained(str(staging / CLIP_DIR))
            clip_processor.save_pretrained(str(staging / CLIP_DIR))
            clip_files = sorted(p.name for p in (staging / CLIP_DIR).iterdir())
            manifest["clip"] = {"dir": CLIP_DIR, "revision": _files_hash(staging / CLIP_DIR, clip_files)[:16]}
        _write_json(staging / "manifest.json", manifest)
    print(f"toy model ({'trained' if train else 'random weights'}, seed {seed}, revision {revision}) -> {out}")
    return manifest


def _require_same_tower(tower, pretrained) -> None:
    """Stages 2 and 3 keep the pretrained tower frozen; a changed weight means they did not."""
    import torch

    weights = pretrained.state_dict()
    changed = [name for name, value in tower.state_dict().items() if not torch.equal(value, weights[name])]
    if changed:
        raise RuntimeError(f"the vision tower changed after its pretraining ({len(changed)} tensors, e.g. "
                           f"{changed[0]}); stages 2 and 3 must keep it frozen")


# --------------------------------------------------------------------------------------------
# CLIP-style tower (stage 1 of a LLaVA-style build)

def pretrain_clip(out, seed: int = 0, steps: int | None = None, batch_size: int | None = None,
                  eval_rows: int = 256, progress: bool = True) -> dict:
    """Pretrain the toy tower + text encoder contrastively into `out` (a `CLIPModel` directory).

    Returns the manifest."""
    from ficoco.toy import clip as toy_clip
    from ficoco.toy import model as toy_model

    out = Path(out)
    overrides = {key: int(value) for key, value in (("steps", steps), ("batch_size", batch_size)) if value is not None}
    settings = toy_clip.ClipSettings(seed=int(seed), **overrides)
    request = {"seed": int(seed), "config_hash": toy_model.config_hash(toy_model.toy_clip_config()),
               "training": settings.to_dict(), "eval_rows": int(eval_rows), "generator_version": GENERATOR_VERSION}
    existing = _built_for(out, request)
    if existing:
        print(f"toy CLIP {out} is up to date (seed {seed})")
        return existing

    _use_available_cores()
    clip_model, processor, training = _pretrained_clip(settings, "default", eval_rows, progress)
    with staged_directory(out) as staging:
        clip_model.save_pretrained(str(staging))
        processor.save_pretrained(str(staging))
        manifest = {"id": "ficoco/toy-clip", "source": "toy", "fetched_at": _now(), "request": request,
                    "training_result": training}
        _write_json(staging / "manifest.json", manifest)
    print(f"toy CLIP (seed {seed}) -> {out}: {json.dumps(training)}")
    return manifest


def _pretrained_clip(settings, size: str, eval_rows: int, progress: bool):
    """Stage 1: (CLIPModel pretrained with `settings`, its processor, a summary with retrieval and CLS share)."""
    from ficoco.toy import clip as toy_clip
    from ficoco.toy import model as toy_model
    from ficoco.toy import shapes

    processor = toy_model.build_clip_processor()
    clip_model = toy_model.build_clip(settings.seed, size)
    summary = _training_summary(toy_clip.pretrain(clip_model, processor, settings, progress=progress))
    if eval_rows > 0:
        rows = shapes.samples(settings.seed, "val", eval_rows)
        summary["retrieval_accuracy"] = round(100 * toy_clip.retrieval_accuracy(clip_model, processor, rows), 2)
        summary["cls"] = _cls_share(clip_model.vision_model, processor, rows, -2)
    return clip_model, processor, summary


def _cls_share(tower, processor, rows, feature_layer: int) -> dict:
    """`clip.cls_object_share`, rounded for a manifest."""
    from ficoco.toy import clip as toy_clip

    share = toy_clip.cls_object_share(tower, processor, rows, feature_layer)
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in share.items()}


def inspect_tower(model_dir, rows: int = 256, seed: int = 0) -> dict:
    """CLS attention on object patches of a built toy LLaVA's tower or a pretrained toy CLIP's tower."""
    from transformers import AutoConfig, AutoProcessor, CLIPModel, LlavaForConditionalGeneration

    from ficoco.toy import clip as toy_clip
    from ficoco.toy import shapes

    model_type = AutoConfig.from_pretrained(str(model_dir)).model_type
    processor = AutoProcessor.from_pretrained(str(model_dir))
    if model_type == "llava":
        model = LlavaForConditionalGeneration.from_pretrained(str(model_dir)).eval()
        tower, feature_layer = model.model.vision_tower, model.config.vision_feature_layer
    elif model_type == "clip":
        tower, feature_layer = CLIPModel.from_pretrained(str(model_dir)).eval().vision_model, -2
    else:
        raise ValueError(f"{model_dir}: model_type {model_type!r}; "
                         "valid: a toy LLaVA (llava) or toy CLIP (clip) directory")
    result = toy_clip.cls_object_share(tower, processor, shapes.samples(seed, "val", rows), feature_layer)
    print(f"{model_dir}: CLS attention on object patches {100 * result['cls_share_on_objects']:.1f}% "
          f"(objects are {100 * result['object_patch_share']:.1f}% of the patches: {result['ratio']:.1f}x), "
          f"{rows} validation scenes")
    return result


# --------------------------------------------------------------------------------------------
# measure

def measure(model_dir, benchmark_dir, keep: list[int], rows: int | None = None, seed: int = 0) -> dict:
    """Accuracy (%) of a built model on a built benchmark, unreduced and with random dropping."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ficoco.toy import train as toy_train

    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    dataset = load_from_disk(str(Path(benchmark_dir) / "data"))
    if rows is not None:
        dataset = dataset.select(range(min(rows, len(dataset))))
    records = list(dataset)
    answers = [r["answers"][0] for r in records]
    result = {"rows": len(records), "visual_tokens": model.config.image_seq_length, "accuracy": {}}
    for k in [None, *keep]:
        with torch.no_grad():
            predictions = toy_train.generate_answers(model, processor, records, keep_visual=k, seed=seed)
        label = "all" if k is None else str(k)
        result["accuracy"][label] = round(100 * toy_train.accuracy(predictions, answers), 2)
        print(f"keep {label:>4} visual tokens: accuracy {result['accuracy'][label]:.1f}%", flush=True)
    return result


# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from ficoco.toy import shapes

    parser = argparse.ArgumentParser(prog="ficoco toy", description="Build the embedded toy world.")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("build-benchmark", help="render the held-out split as a benchmark directory")
    bench.add_argument("--out", required=True, help="benchmark directory to write")
    bench.add_argument("--seed", type=int, default=1234)
    bench.add_argument("--rows", type=int, default=500)
    bench.add_argument("--split", default="test", choices=list(shapes.SPLITS),
                       help="the toy world's split (default: test, held out)")

    model = commands.add_parser("build-model", help="build (and train) the tiny LLaVA into a model directory")
    model.add_argument("--out", required=True, help="model directory to write")
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                       help="train on the toy train split (default) or keep random weights (--no-train)")
    model.add_argument("--steps", type=int, default=None, help="training steps (default: TrainSettings.steps)")
    model.add_argument("--size", default="default", help="architecture: default or small")
    model.add_argument("--recipe", default="end-to-end",
                       help="end-to-end (default) or staged: LLaVA-1.5's stages on a CLIP-style tower (docs/toy.md)")
    model.add_argument("--eval-rows", type=int, default=200, help="validation rows scored after training")

    meas = commands.add_parser("measure", help="accuracy unreduced and with random visual-token dropping")
    meas.add_argument("--model", required=True)
    meas.add_argument("--benchmark", required=True)
    meas.add_argument("--keep", type=int, nargs="*", default=[48, 32, 16])
    meas.add_argument("--rows", type=int, default=None)
    meas.add_argument("--json", default=None, help="also write the result here")

    clip = commands.add_parser("pretrain-clip", help="pretrain the toy vision tower and a text encoder CLIP-style")
    clip.add_argument("--out", required=True, help="CLIPModel directory to write")
    clip.add_argument("--seed", type=int, default=0)
    clip.add_argument("--steps", type=int, default=None, help="training steps (default: ClipSettings.steps)")
    clip.add_argument("--batch-size", type=int, default=None, help="images per step (default: ClipSettings.batch_size)")
    clip.add_argument("--eval-rows", type=int, default=256, help="validation scenes for retrieval and CLS share")

    tower = commands.add_parser("inspect-tower", help="CLS attention on object patches of a toy tower")
    tower.add_argument("--model", required=True, help="a toy LLaVA or toy CLIP directory")
    tower.add_argument("--rows", type=int, default=256, help="validation scenes")

    args = parser.parse_args(argv)
    if args.command == "pretrain-clip":
        pretrain_clip(args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                      eval_rows=args.eval_rows)
    elif args.command == "inspect-tower":
        inspect_tower(args.model, rows=args.rows)
    elif args.command == "build-benchmark":
        build_benchmark(args.out, seed=args.seed, rows=args.rows, split=args.split)
    elif args.command == "build-model":
        build_model(args.out, seed=args.seed, train=args.train, steps=args.steps, size=args.size,
                    eval_rows=args.eval_rows, recipe=args.recipe)
    else:
        result = measure(args.model, args.benchmark, args.keep, rows=args.rows)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

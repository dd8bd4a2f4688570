"""`ficoco toy ...`: build the embedded toy world.

    ficoco toy build-benchmark --out DIR [--seed 1234] [--rows 500]
    ficoco toy build-model --out DIR [--seed 0] [--train | --no-train] [--steps N] [--size default]
    ficoco toy measure --model DIR --benchmark DIR [--keep 48 32 16] [--rows N]

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


# --------------------------------------------------------------------------------------------
# benchmark

def build_benchmark(out, seed: int = 1234, rows: int = 500) -> dict:
    """Render `rows` held-out samples into `out` (contracts §5 benchmark directory); returns the manifest."""
    from datasets import Dataset, Features, Image, List, Value

    from ficoco.toy import shapes

    if rows < 1:
        raise ValueError(f"rows={rows}: must be at least 1")
    out = Path(out)
    request = {"seed": int(seed), "rows": int(rows), "generator_version": GENERATOR_VERSION}
    existing = _read_manifest(out)
    if existing and existing.get("config") == request and (out / "data").is_dir():
        print(f"toy benchmark {out} is up to date ({rows} rows, seed {seed})")
        return existing

    samples = shapes.samples(seed, "test", rows)
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
        "benchmark": "toy", "id": "ficoco/toy-shapes", "config": request, "split": "test",
        "revision": checksum[:16], "resolved_revision": checksum[:16], "rows": len(samples),
        "checksum": checksum, "bad_rows": 0, "fetched_at": _now(), "source": "toy",
    }
    with staged_directory(out) as staging:
        dataset.save_to_disk(str(staging / "data"))
        _write_json(staging / "manifest.json", manifest)
    print(f"toy benchmark: {rows} rows (seed {seed}) -> {out}")
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
                progress: bool = True, eval_rows: int = 200) -> dict:
    """Build (and by default train) the toy LLaVA into `out`; returns the manifest."""
    import torch

    from ficoco.toy import model as toy_model
    from ficoco.toy import train as toy_train

    out = Path(out)
    config = toy_model.toy_llava_config(size)
    settings = toy_train.TrainSettings(seed=int(seed), size=size,
                                       **({"steps": int(steps)} if steps is not None else {}))
    if settings.steps < 1:
        raise ValueError(f"steps={settings.steps}: must be at least 1")
    request = {"seed": int(seed), "train": bool(train), "size": size,
               "config_hash": toy_model.config_hash(config),
               "training": settings.to_dict() if train else None}
    existing = _read_manifest(out)
    if existing and existing.get("request") == request and (out / "config.json").is_file():
        print(f"toy model {out} is up to date ({'trained' if train else 'random weights'}, seed {seed})")
        return existing

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    processor = toy_model.build_processor()
    model = toy_model.build_model(seed, size)
    training = None
    if train:
        result = toy_train.train(model, processor, settings, progress=progress)
        losses = result["losses"]
        training = {"seconds": round(result["seconds"], 1), "threads": torch.get_num_threads(),
                    "loss_first_10": round(sum(losses[:10]) / len(losses[:10]), 4),
                    "loss_last_50": round(sum(losses[-50:]) / len(losses[-50:]), 4)}
        if eval_rows > 0:
            from ficoco.toy import shapes
            rows = shapes.samples(seed, "val", eval_rows)
            predictions = toy_train.generate_answers(model, processor, rows)
            training["val_accuracy"] = round(100 * toy_train.accuracy(predictions, [r.answer for r in rows]), 2)
            training["val_rows"] = eval_rows

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
        _write_json(staging / "manifest.json", manifest)
    print(f"toy model ({'trained' if train else 'random weights'}, seed {seed}, revision {revision}) -> {out}")
    return manifest


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
    parser = argparse.ArgumentParser(prog="ficoco toy", description="Build the embedded toy world.")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("build-benchmark", help="render the held-out split as a benchmark directory")
    bench.add_argument("--out", required=True, help="benchmark directory to write")
    bench.add_argument("--seed", type=int, default=1234)
    bench.add_argument("--rows", type=int, default=500)

    model = commands.add_parser("build-model", help="build (and train) the tiny LLaVA into a model directory")
    model.add_argument("--out", required=True, help="model directory to write")
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                       help="train on the toy train split (default) or keep random weights (--no-train)")
    model.add_argument("--steps", type=int, default=None, help="training steps (default: TrainSettings.steps)")
    model.add_argument("--size", default="default", help="architecture: default or small")
    model.add_argument("--eval-rows", type=int, default=200, help="validation rows scored after training")

    meas = commands.add_parser("measure", help="accuracy unreduced and with random visual-token dropping")
    meas.add_argument("--model", required=True)
    meas.add_argument("--benchmark", required=True)
    meas.add_argument("--keep", type=int, nargs="*", default=[48, 32, 16])
    meas.add_argument("--rows", type=int, default=None)
    meas.add_argument("--json", default=None, help="also write the result here")

    args = parser.parse_args(argv)
    if args.command == "build-benchmark":
        build_benchmark(args.out, seed=args.seed, rows=args.rows)
    elif args.command == "build-model":
        build_model(args.out, seed=args.seed, train=args.train, steps=args.steps, size=args.size,
                    eval_rows=args.eval_rows)
    else:
        result = measure(args.model, args.benchmark, args.keep, rows=args.rows)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

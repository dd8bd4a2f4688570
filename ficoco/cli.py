"""The `ficoco` command. Each subcommand lives in the module that owns its logic.

Subcommands are looked up lazily so `ficoco --help` stays fast (no torch/transformers import).
Every target is a `main(argv: list[str]) -> int | None` that parses its own arguments.
"""
from __future__ import annotations

import importlib
import os
import sys

from ficoco.warm import DELEGATED, SOCKET_ENV, delegate

# name -> (module:function, one-line description)
COMMANDS = {
    "run": ("ficoco.evaluate:main", "run one evaluate job (model + method + budget + benchmark [+ shard])"),
    "score": ("ficoco.evaluate:main_score", "merge the shards of one run into metrics.json"),
    "calibrate": ("ficoco.calibrate:main", "fit a calibrated method (FitPrune's schedule) for a model and budget"),
    "fetch-model": ("ficoco.fetch:main_model", "download a model snapshot at a pinned revision"),
    "fetch-benchmark": ("ficoco.benchmarks.fetch:main", "download and normalise a benchmark at a pinned revision"),
    "toy": ("ficoco.toy.cli:main", "build the embedded toy world (synthetic benchmark, tiny LLaVA)"),
    "methods": ("ficoco.methods.cli:main", "list every token-reduction method: where it acts, stages, parameters"),
    "flops": ("ficoco.flops:main", "FLOPs / memory tables for a model, method and budget (--paper: the paper's labels)"),
    "measure": ("ficoco.measure:main", "measure latency, peak memory and throughput with random weights"),
    "bench": ("ficoco.bench:main", "prefill speed benchmark: vanilla vs every method at several budgets"),
    "gpu-bench": ("ficoco.gpu_bench:main", "LLaVA-1.5-7B's shape on a GPU: prefill, throughput at batch 1 / 16, memory"),
    "bench-tome": ("ficoco.bench_tome:main", "our ToMe step against the authors' merge, same inputs, LLaVA-1.5 size"),
    "aggregate": ("ficoco.report:main_aggregate", "collect every metrics.json into the tidy results table"),
    "report": ("ficoco.report:main_report", "render the HTML report from the results table"),
    "grid": ("ficoco.config:main", "validate a config and print its job grid"),
    "doctor": ("ficoco.doctor:main", "check the environment: versions, CUDA, adapter self-check, W&B mode, HF caches"),
    "warm": ("ficoco.warm:main", "run a command (e.g. snakemake) whose local jobs fork a warm interpreter: no imports"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: ficoco <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`ficoco <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ficoco: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if name in DELEGATED and os.environ.get(SOCKET_ENV):    # under `ficoco warm`: a warm child runs it
        code = delegate(argv)
        if code is not None:
            return code
    module_name, function_name = COMMANDS[name][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmarks: loading through `datasets` at pinned revisions, LLaVA-1.5 prompts, scoring.

`get(name)` returns the benchmark object (contracts §5): attributes `name`, `max_new_tokens`;
methods `prompt(row, options)`, `score_sample(prediction, row)`, `aggregate(records)`,
`fetch(out_dir, revision, options)`. `names()` lists every registered name.

Modules are imported lazily (on `get`), so listing names costs nothing. A registry entry is
"module:ATTRIBUTE" (an instance in that module) or "module" (a module that is itself the
benchmark, or that exposes one as `BENCHMARK`).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import MappingProxyType

from ficoco.benchmarks.base import merge_records, shard_rows  # noqa: F401  (public API)
from ficoco.fingerprint import source_digest

#: name -> where the benchmark object lives. Built once, never mutated.
_REGISTRY = MappingProxyType({
    "gqa": "ficoco.benchmarks.gqa:GQA",
    "scienceqa_img": "ficoco.benchmarks.scienceqa:SCIENCEQA_IMG",
    "scienceqa_full": "ficoco.benchmarks.scienceqa:SCIENCEQA_FULL",
    "textvqa": "ficoco.benchmarks.textvqa:TEXTVQA",
    "pope": "ficoco.benchmarks.pope:POPE",
    "mme": "ficoco.benchmarks.mme:MME",
    "mmbench": "ficoco.benchmarks.mmbench:MMBENCH_EN",
    "mmbench_cn": "ficoco.benchmarks.mmbench:MMBENCH_CN",
    "seed_image": "ficoco.benchmarks.seed:SEED_IMAGE",
    "vizwiz": "ficoco.benchmarks.vizwiz:VIZWIZ",
    "vqav2": "ficoco.benchmarks.vqav2:VQAV2",
    "mmvet": "ficoco.benchmarks.mmvet:MMVET",
    "llava_wild": "ficoco.benchmarks.llava_wild:LLAVA_WILD",
    "mmmu": "ficoco.benchmarks.mmmu:MMMU",
    "toy-shapes": "ficoco.benchmarks.toy",
})


#: The modules every benchmark's score goes through besides its own: the aggregate and its bad-row rules (base.py,
#: rows.py) and the shared parsers (scoring.py). No benchmark module imports another's scoring.
SHARED_SCORING_MODULES = ("base.py", "rows.py", "scoring.py")


def scoring_code_digest(name: str) -> str:
    """16 hex digits of sha256 over the source that turns the benchmark's predictions into its metrics (its own
    module and SHARED_SCORING_MODULES): recorded in metrics.json and a param of the Snakemake `score` rule, so a
    change to the scoring reruns the score jobs on the existing predictions instead of keeping stale metrics."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(names())}")
    module = _REGISTRY[name].partition(":")[0]
    folder = Path(__file__).parent
    return source_digest(folder, sorted({*SHARED_SCORING_MODULES, f"{module.rpartition('.')[2]}.py"}))


def names() -> list[str]:
    """Every registered benchmark name, sorted."""
    return sorted(_REGISTRY)


def get(name: str):
    """The benchmark object registered as `name`; ValueError naming the valid choices otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(names())}")
    module_name, _, attribute = _REGISTRY[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        raise ImportError(f"benchmark {name!r} is registered in {module_name}, which is not available") from error
    if attribute:
        return getattr(module, attribute)
    return getattr(module, "BENCHMARK", module)

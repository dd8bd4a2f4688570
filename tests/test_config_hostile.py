"""Hostile configs: every one is refused before any job, with one line naming the file (and the
line, for YAML errors), the key, the bad value and what would be valid.

Each case is a config file's text (plus, for some, Snakemake's parsed `--config` overrides or an
extra registry file). `test_refused_with_one_clear_line` runs every case through
`ficoco.config.load_config`, the function the Snakefile and `ficoco grid` call; a representative
few also go through a real `snakemake -n` and through `ficoco grid`.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from snakemake.cli import parse_config

from ficoco.config import ConfigError, job_grid, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]

# A small valid config; each case below changes one thing. (LLaVA-1.5's shape is known without
# importing transformers, and the toy benchmark's 16 rows are in the benchmark registry.)
BASE = """\
models: [llava-1.5-7b]
methods: [vanilla, fastv]
budgets: [64]
benchmarks: [toy-shapes-mini]
"""


@dataclass(frozen=True)
class Hostile:
    """One bad config and what its one-line refusal must contain."""

    name: str
    text: str | None                      # the config file ("bad.yaml"); None: the file does not exist
    expect: tuple[str, ...]               # the key, the bad value, the valid alternatives (substrings)
    where: str = "bad.yaml"               # the source the line must name
    config: tuple[str, ...] = ()          # --config KEY=VALUE arguments, parsed as Snakemake parses them
    files: dict = field(default_factory=dict)   # extra files written next to bad.yaml (name -> text)


def base(*lines: str, drop: str = "") -> str:
    """BASE without the line that starts with `drop`, plus `lines`."""
    kept = [line for line in BASE.splitlines() if not (drop and line.startswith(drop))]
    return "\n".join(kept + list(lines)) + "\n"


HOSTILE = [
    # ---- the file itself: YAML syntax, empty, not a mapping, a key given twice, missing ----
    Hostile("yaml-unclosed-bracket", "models: [toy-llava\nmethods: [vanilla]\nbudgets: [36]\n",
            ("bad.yaml:2:", "YAML syntax error", "valid: YAML syntax")),
    Hostile("yaml-bad-indentation", "models:\n  - toy-llava\n methods: [vanilla]\nbudgets: [36]\n",
            ("bad.yaml:3:", "YAML syntax error", "valid: YAML syntax")),
    Hostile("yaml-tab-indentation", "models:\n\t- toy-llava\nmethods: [vanilla]\n",
            ("bad.yaml:2:1", "'\\t'", "valid: indentation with spaces")),
    Hostile("yaml-colon-in-value", base("wandb:\n  project: a: b"),
            ("bad.yaml:6:", "mapping values are not allowed", "valid: YAML syntax")),
    Hostile("yaml-two-documents", base() + "---\n" + base(),
            ("bad.yaml:5:", "expected a single document", "valid: YAML syntax")),
    Hostile("yaml-unclosed-quote", base('report: {html: "report/x.html}'),
            ("bad.yaml:", "YAML syntax error", "valid: YAML syntax")),
    Hostile("empty-file", "", ("the file is empty", "valid: a YAML mapping", "models, methods, budgets, benchmarks")),
    Hostile("comments-only", "# models: [toy-llava]\n", ("the file is empty", "valid: a YAML mapping")),
    Hostile("top-level-list", "- models\n- methods\n", ("top level is list", "[models, methods]", "valid: a YAML mapping")),
    Hostile("top-level-scalar", "toy-llava\n", ("top level is str", "'toy-llava'", "valid: a YAML mapping")),
    Hostile("duplicate-top-level-key", base("budgets: [72]"),
            ("bad.yaml:5:1", "budgets", "'budgets' is given twice", "first at line 3", "valid: each key once")),
    Hostile("duplicate-nested-key", base("measure:", "  warmup: 1", "  repeats: 3", "  warmup: 2"),
            ("bad.yaml:8:3", "measure.warmup", "'warmup' is given twice", "first at line 6", "valid: each key once")),
    Hostile("duplicate-flow-key", base("method_params: {fastv: {layer: 1, layer: 2}}"),
            ("bad.yaml:5:", "method_params.fastv.layer", "given twice", "of this line", "valid: each key once")),
    Hostile("json-duplicate-key", '{"models": ["toy-llava"], "methods": ["vanilla"], "budgets": [36], '
            '"budgets": [72], "benchmarks": ["toy-shapes-mini"]}',
            ("budgets", "given twice in the same JSON object", "[36] and [72]", "valid: each key once")),
    Hostile("missing-config-file", None, ("config file not found", "valid: an existing file")),

    # ---- unknown keys at every level ----
    Hostile("unknown-top-level-key", base("budget: [64]"),
            ("budget", "unknown key 'budget'", "did you mean 'budgets'", "valid keys:", "budgets")),
    Hostile("unknown-measure-key", base("measure: {repeat: 3}"),
            ("measure.repeat", "unknown key 'repeat'", "valid keys:", "repeats")),
    Hostile("unknown-wandb-key", base("wandb: {team: me}"),
            ("wandb.team", "unknown key 'team'", "valid keys:", "entity, project")),
    Hostile("unknown-registries-key", base("registries: {model: config/models.yaml}"),
            ("registries.model", "unknown key 'model'", "valid keys:", "benchmarks, models")),
    Hostile("unknown-report-key", base("report: {pdf: report/report.pdf}"),
            ("report.pdf", "unknown key 'pdf'", "valid keys: html")),
    Hostile("unknown-budget-key", base("budgets: [{ratio: 0.5}]", drop="budgets"),
            ("budgets[0]", "{ratio: 0.5}", "valid:", "reduction")),
    Hostile("non-string-top-level-key", base("1: toy"), ("unknown key 1", "valid keys:", "budgets")),

    # ---- schema: types, ranges, required keys ----
    Hostile("missing-required-key", base(drop="benchmarks"), ("benchmarks: missing required key", "valid:", "benchmark registry")),
    Hostile("batch-size-negative", base("batch_size: -1"), ("batch_size", "-1", "valid: an integer >= 1")),
    Hostile("batch-size-text", base("batch_size: '8'"), ("batch_size", "'8'", "wrong type", "valid: an integer >= 1")),
    Hostile("device-unknown", base("device: gpu"), ("device", "'gpu'", "valid: one of auto, cpu, cuda")),
    Hostile("seed-negative", base("seed: -1"), ("seed", "-1", "valid: an integer >= 0")),
    Hostile("limit-zero", base("limit: 0"), ("limit", "0 is not valid", "valid: an integer >= 1 or null")),
    Hostile("shards-zero", base("shards: 0"), ("shards", "0 is not valid", "valid: an integer >= 1")),
    Hostile("shards-mapping-zero", base("shards: {toy-shapes-mini: 0}"),
            ("shards.toy-shapes-mini", "0 is not valid", "valid: an integer >= 1")),
    Hostile("budgets-empty", base("budgets: []", drop="budgets"), ("budgets", "[] is empty", "valid: a non-empty list")),
    Hostile("models-empty", base("models: []", drop="models"), ("models", "[] is empty", "valid: a non-empty list")),
    Hostile("methods-not-a-list", base("methods: fastv", drop="methods"),
            ("methods", "'fastv' has the wrong type", "valid: a non-empty list")),
    Hostile("budget-fraction", base("budgets: [36, 12.5]", drop="budgets"),
            ("budgets[1]", "12.5", "valid: an integer >= 1 or a mapping with keys reduction")),
    Hostile("reduction-one", base("budgets: [{reduction: 1.0}]", drop="budgets"),
            ("budgets[0].reduction", "1.0", "valid: a number >= 0 and < 1")),
    Hostile("measure-enabled-number", base("measure: {enabled: 1}"),
            ("measure.enabled", "1 has the wrong type", "valid: true or false")),
    Hostile("measure-methods-empty", base("measure: {methods: []}"),
            ("measure.methods", "[] is empty", "valid: a non-empty list", "or null")),
    Hostile("method-params-not-a-mapping", base("method_params: {fastv: 3}"),
            ("method_params.fastv", "3 has the wrong type", "valid: a mapping")),
    Hostile("benchmark-options-not-a-mapping", base("benchmark_options: {toy-shapes-mini: [1]}"),
            ("benchmark_options.toy-shapes-mini", "[1] has the wrong type", "valid: a mapping")),
    Hostile("wandb-project-empty", base("wandb: {project: ''}"), ("wandb.project", "''", "valid: a non-empty string")),

    # ---- names: unknown, listed twice, not in the grid ----
    Hostile("unknown-model", base("models: [toy-llama]", drop="models"),
            ("models[0]", "'toy-llama'", "did you mean 'toy-llava'", "valid:", "llava-1.5-7b")),
    Hostile("unknown-method", base("methods: [vanilla, fastv2]", drop="methods"),
            ("methods[1]", "'fastv2'", "valid:", "fastv-keepb")),
    Hostile("unknown-benchmark", base("benchmarks: [toy-shape]", drop="benchmarks"),
            ("benchmarks[0]", "'toy-shape'", "valid:", "toy-shapes-mini")),
    Hostile("method-listed-twice", base("methods: [vanilla, fastv, vanilla]", drop="methods"),
            ("methods[2]", "'vanilla' is listed twice", "also methods[0]", "valid: each name once")),
    Hostile("benchmark-listed-twice", base("benchmarks: [toy-shapes-mini, toy-shapes-mini]", drop="benchmarks"),
            ("benchmarks[1]", "'toy-shapes-mini' is listed twice", "valid: each name once")),
    Hostile("measure-method-not-in-grid", base("measure: {methods: [ficoco-v]}"),
            ("measure.methods[0]", "'ficoco-v'", "'ficoco-v' is not in methods", "valid: methods of the grid (vanilla, fastv)")),

    # ---- method parameters: unknown method, not in the grid, none to give, unknown or bad ----
    Hostile("params-for-unknown-method", base("method_params: {fastvv: {layer: 2}}"),
            ("method_params.fastvv", "'fastvv'", "valid:", "fastv")),
    Hostile("params-for-method-not-in-grid", base("method_params: {ficoco-v: {start: 2}}"),
            ("method_params.ficoco-v", "{start: 2}", "not in methods", "valid: parameters for methods in the grid "
             "(vanilla, fastv)")),
    Hostile("params-for-vanilla", base("method_params: {vanilla: {layer: 2}}"),
            ("method_params.vanilla", "{layer: 2}", "vanilla has no parameters", "valid: no method_params entry")),
    Hostile("unknown-parameter", base("method_params: {fastv: {layr: 2}}"),
            ("method_params.fastv.layr", "'layr' is not a parameter of fastv", "did you mean 'layer'", "valid: layer")),
    Hostile("bad-parameter-value", base("method_params: {fastv: {layer: -1}}"),
            ("method_params.fastv.layer", "layer=-1", "valid: an integer")),
    Hostile("per-budget-not-in-grid", base("method_params: {fastv: {per_budget: {48: {layer: 2}}}}"),
            ("method_params.fastv.per_budget.48", "48 is not a budget of the grid", "valid:", "(an integer, or a TFLOPs target's or per-image count's label): 64")),
    Hostile("per-budget-text-key", base("method_params: {fastv: {per_budget: {'64': {layer: 2}}}}"),
            ("method_params.fastv.per_budget.64", "'64' is not a budget of the grid", "valid:", "(an integer, or a TFLOPs target's or per-image count's label): 64")),
    Hostile("per-budget-unknown-parameter", base("method_params: {fastv: {per_budget: {64: {layers: 2}}}}"),
            ("method_params.fastv.per_budget.64.layers", "'layers' is not a parameter", "valid: layer")),

    # ---- benchmark options: not in the grid, none to give, unknown, bad ----
    Hostile("options-for-benchmark-not-in-grid", base("benchmark_options: {textvqa: {ocr: true}}"),
            ("benchmark_options.textvqa", "{ocr: true}", "not in benchmarks", "valid: options for benchmarks in the "
             "grid (toy-shapes-mini)")),
    Hostile("options-for-toy-benchmark", base("benchmark_options: {toy-shapes-mini: {rows: 8}}"),
            ("benchmark_options.toy-shapes-mini", "{rows: 8}", "takes no options", "valid: no benchmark_options entry")),
    Hostile("options-for-unknown-benchmark", base("benchmark_options: {imagenet: {subset_size: 10}}"),
            ("benchmark_options.imagenet", "'imagenet'", "valid:", "vqav2")),
    Hostile("unknown-benchmark-option",
            "models: [llava-1.5-7b]\nmethods: [vanilla]\nbudgets: [64]\nbenchmarks: [textvqa]\n"
            "benchmark_options: {textvqa: {ocrr: true}}\n",
            ("benchmark_options.textvqa.ocrr", "'ocrr' is not an option", "did you mean 'ocr'", "valid: ocr")),
    Hostile("benchmark-option-wrong-kind",
            "models: [llava-1.5-7b]\nmethods: [vanilla]\nbudgets: [64]\nbenchmarks: [textvqa]\n"
            "benchmark_options: {textvqa: {ocr: 'yes please'}}\n",
            ("benchmark_options.textvqa.ocr", "'yes please'", "valid: true or false")),
    Hostile("benchmark-option-bad-choice",
            "models: [llava-1.5-7b]\nmethods: [vanilla]\nbudgets: [64]\nbenchmarks: [pope]\n"
            "benchmark_options: {pope: {categories: [random, hard]}}\n",
            ("benchmark_options.pope.categories", "[random, hard]", "valid: a non-empty list drawn from adversarial, "
             "popular, random")),
    Hostile("benchmark-option-unknown-question-set",
            "models: [llava-1.5-7b]\nmethods: [vanilla]\nbudgets: [64]\nbenchmarks: [pope]\n"
            "benchmark_options: {pope: {question_set: llava-9000}}\n",
            ("benchmark_options.pope", "'llava-9000' is not a question set", "valid: llava, full")),
    Hostile("subset-size-above-rows",
            "models: [llava-1.5-7b]\nmethods: [vanilla]\nbudgets: [64]\nbenchmarks: [vqav2]\n"
            "benchmark_options: {vqav2: {subset_size: 300000}}\n",
            ("benchmark_options.vqav2.subset_size", "300000", "valid: 1..214354")),

    # ---- shards: not in the grid, above the rows or the limit ----
    Hostile("shards-for-benchmark-not-in-grid", base("shards: {vqav2: 8}"),
            ("shards.vqav2", "8 shards for benchmark 'vqav2'", "valid: shards for benchmarks in the grid")),
    Hostile("shards-above-limit", base("limit: 8", "shards: 300"),
            ("shards", "300 shards", "limit 8", "valid: 1..8")),
    Hostile("shards-above-rows", base("shards: {toy-shapes-mini: 17}"),
            ("shards.toy-shapes-mini", "17 shards", "16 rows in the benchmark registry", "valid: 1..16")),
    Hostile("shards-above-subset",
            "models: [llava-1.5-7b]\nmethods: [vanilla]\nbudgets: [64]\nbenchmarks: [vqav2]\n"
            "benchmark_options: {vqav2: {subset_size: 4}}\nshards: {vqav2: 8}\n",
            ("shards.vqav2", "8 shards", "subset_size 4", "valid: 1..4")),

    # ---- budgets against the models and methods ----
    Hostile("reduction-rounds-to-zero", base("budgets: [{reduction: 0.9995}]", drop="budgets"),
            ("budgets[0]", "{reduction: 0.9995}", "leaves no visual token of the 576", "valid: a reduction <= 0.9991")),
    Hostile("budget-above-visual-tokens", base("budgets: [600]", drop="budgets"),
            ("budgets[0]", "600 is above the 576 visual tokens", "valid: 1..576")),
    Hostile("budget-infeasible-for-method", base("method_params: {fastv: {layer: 30}}"),
            ("budgets[0]", "64 for method fastv", "layer K=30", "valid: a budget of at least")),

    # ---- registries ----
    Hostile("missing-model-registry", base("registries: {models: config/no-such-models.yaml}"),
            ("registries.models", "'config/no-such-models.yaml'", "does not exist", "valid: a registry file path")),
    Hostile("registry-duplicate-entry", base("models: [toy-llava]", "registries: {models: REGISTRY}", drop="models"),
            ("models.yaml:4", "'toy-llava' is given twice", "valid: each key once"), where="models.yaml",
            files={"models.yaml": "toy-llava:\n  source: toy\n  shape: toy\ntoy-llava:\n  source: hub\n"}),
    Hostile("registry-bad-shape", base("models: [toy-llava]", "registries: {models: REGISTRY}", drop="models"),
            ("toy-llava.shape", "'toy2'", "valid: llava-1.5-7b, llava-1.5-13b, llava-next-7b, qwen2-vl-7b, qwen2.5-vl-7b, toy, source-dir"),
            where="models.yaml",
            files={"models.yaml": "toy-llava:\n  source: toy\n  shape: toy2\n  prompt_template: 'USER: <image>\\n{prompt}'\n"}),
    Hostile("registry-bad-toy-recipe", base("models: [toy-llava]", "registries: {models: REGISTRY}", drop="models"),
            ("toy-llava.recipe", "'clip'", "valid: end-to-end, staged"), where="models.yaml",
            files={"models.yaml": "toy-llava:\n  source: toy\n  shape: toy\n  recipe: clip\n"
                                  "  prompt_template: 'USER: <image>\\n{prompt}'\n"}),
    Hostile("registry-bad-toy-size", base("models: [toy-llava]", "registries: {models: REGISTRY}", drop="models"),
            ("toy-llava.size", "'huge'", "valid: default, small"), where="models.yaml",
            files={"models.yaml": "toy-llava:\n  source: toy\n  shape: toy\n  size: huge\n"
                                  "  prompt_template: 'USER: <image>\\n{prompt}'\n"}),

    Hostile("registry-bad-text-tokens", base("models: [toy-llava]", "registries: {models: REGISTRY}", drop="models"),
            ("toy-llava.text_tokens", "0 is not a number of text tokens", "valid: an integer >= 1"), where="models.yaml",
            files={"models.yaml": "toy-llava:\n  source: toy\n  shape: toy\n  text_tokens: 0\n"
                                  "  prompt_template: 'USER: <image>\\n{prompt}'\n"}),
    Hostile("registry-per-budget-key-as-text", base("models: [toy-llava]", "registries: {models: REGISTRY}",
                                                    drop="models"),
            ("toy-llava.method_params.ficoco-l.per_budget.48", "'48' is not a budget", "valid: an integer token "
             "budget"), where="models.yaml",
            files={"models.yaml": "toy-llava:\n  source: toy\n  shape: toy\n  prompt_template: 'USER: <image>\\n{prompt}'\n"
                                  "  method_params: {ficoco-l: {per_budget: {'48': {window: 1}}}}\n"}),
    Hostile("registry-method-parameter-typo", base("models: [toy-llava]", "registries: {models: REGISTRY}",
                                                   drop="models"),
            ("toy-llava.method_params.fastv.layr", "'layr' is not a parameter of fastv (did you mean 'layer'?)",
             "valid:"), where="models.yaml",
            files={"models.yaml": "toy-llava:\n  source: toy\n  shape: toy\n  prompt_template: 'USER: <image>\\n{prompt}'\n"
                                  "  method_params: {fastv: {layr: 1}}\n"}),
    Hostile("registry-missing-source-dir", base("models: [mirror]", "registries: {models: REGISTRY}", drop="models"),
            ("mirror.source_dir", "'/no/such/mirror' is not a source directory", "valid: on a hub model, a local "
             "directory holding the model"), where="models.yaml",
            files={"models.yaml": "mirror:\n  source: hub\n  id: a/b\n  shape: llava-1.5-7b\n"
                                  "  source_dir: /no/such/mirror\n  prompt_template: 'USER: <image>\\n{prompt}'\n"}),
    Hostile("registry-source-dir-shape-without-one", base("models: [mirror]", "registries: {models: REGISTRY}",
                                                          drop="models"),
            ("mirror.shape", "shape source-dir reads the model's dimensions from its source_dir",
             "valid: a known shape, or a source_dir"), where="models.yaml",
            files={"models.yaml": "mirror:\n  source: hub\n  id: a/b\n  shape: source-dir\n"
                                  "  prompt_template: 'USER: <image>\\n{prompt}'\n"}),
    Hostile("fitted-method-on-llava-next-without-calibration-set",
            "models: [llava-next-7b]\nmethods: [vanilla, fitprune]\nbudgets: [160]\nbenchmarks: [toy-shapes-mini]\n",
            ("calibration.benchmark", "methods ['fitprune'] fit their parameters on a calibration set first",
             "valid: a registered benchmark the grid does not evaluate")),
    Hostile("fitted-parameter-given-in-the-config",
            "models: [toy-llava]\nmethods: [vanilla, fitprune]\nbudgets: [36]\nbenchmarks: [toy-shapes-mini]\n"
            "calibration: {benchmark: toy-shapes-train, rows: 8}\nmethod_params: {fitprune: {deletions: [1, 2]}}\n",
            ("method_params.fitprune.deletions", "deletions of fitprune is what its calibration fits for each budget",
             "valid: the calibration settings")),
    Hostile("calibration-set-of-the-evaluated-rows",
            "models: [toy-llava]\nmethods: [vanilla, fitprune]\nbudgets: [36]\nbenchmarks: [toy-shapes]\n"
            "calibration: {benchmark: toy-shapes-mini, rows: 8}\n",
            ("calibration.benchmark", "'toy-shapes-mini' draws its rows from the same data as the evaluated "
             "toy-shapes", "valid: a benchmark of other data")),
    Hostile("calibration-set-evaluated-in-a-sub-grid",
            "models: [toy-llava]\nmethods: [vanilla, fitprune]\nbudgets: [36]\nbenchmarks: [toy-shapes-mini]\n"
            "grids: [{models: [llava-1.5-7b], methods: [vanilla], budgets: [64], benchmarks: [toy-shapes-train]}]\n"
            "calibration: {benchmark: toy-shapes-train, rows: 8}\n",
            ("calibration.benchmark", "'toy-shapes-train' is also evaluated", "valid: a benchmark the grid does not "
             "evaluate")),
    Hostile("fitted-budget-below-layer-0",
            "models: [toy-llava]\nmethods: [vanilla, fitprune]\nbudgets: [1]\nbenchmarks: [toy-shapes-mini]\n"
            "calibration: {benchmark: toy-shapes-train, rows: 8}\n",
            ("budgets[0]", "1 for method fitprune on model toy-llava", "no fitted schedule averages below 24.83",
             "valid: a budget of at least 25")),
    Hostile("fitted-method-with-a-count-for-every-image",
            "models: [qwen2-vl-7b]\nmethods: [vanilla, fitprune]\nbudgets: [{image_tokens: 600}]\n"
            "benchmarks: [toy-shapes-mini]\ncalibration: {benchmark: toy-shapes-train, rows: 8}\n",
            ("budgets[0]", "'n600' for method fitprune on model qwen2-vl-7b", "not for a count of every image",
             "valid for fitprune: token budgets")),
    Hostile("tower-budget-on-llava-next", base("models: [llava-next-7b]", "methods: [vanilla, tome]", drop="m"),
            ("budgets[0]", "64 for method tome on model llava-next-7b", "budget B=13 is infeasible",
             "budget 64 of the nominal 2880-token image is 13 a tower pass", "valid: a budget of at least 118")),
    Hostile("tflops-budget-on-llava-next", "models: [llava-next-7b]\nmethods: [vanilla, pdrop]\n"
                                           "budgets: [{tflops: 5}]\nbenchmarks: [toy-shapes-mini]\n",
            ("budgets[0]", "{tflops: 5}: a TFLOPs target is solved for one image shape", "model llava-next-7b costs "
             "differently per image size", "valid: a token budget of its nominal 2880-token image")),
    Hostile("tflops-budget-out-of-reach", base("budgets: [{tflops: 50}]", drop="budgets"),
            ("budgets[0]", "model llava-1.5-7b: 50 TFLOPs (exact) is out of reach for", "cost", "valid: a target in "
             "that range")),

    # ---- --config overrides, as Snakemake parses them ----
    Hostile("config-option-list-of-numbers", BASE, ("budgets[0]", "'36'", "valid: an integer >= 1",
                                                     "arrived as ['36']", "write `budgets: [36]` in a YAML file"),
            where="--config", config=("budgets=[36]",)),
    Hostile("config-option-scalar-for-list", BASE, ("budgets", "36 has the wrong type", "write `budgets: [36]`"),
            where="--config", config=("budgets=36",)),
    Hostile("config-option-null", BASE, ("limit", "'null'", "write `limit: null`"),
            where="--config", config=("limit=null",)),
    Hostile("config-option-nested-bool", BASE, ("measure.enabled", "'false'", "write `measure: {enabled: false}`"),
            where="--config", config=("measure={enabled: false}",)),
    Hostile("config-option-unknown-key", BASE, ("batchsize", "unknown key 'batchsize'", "did you mean 'batch_size'"),
            where="--config", config=("batchsize=8",)),
]


def refusal(case: Hostile, tmp_path: Path) -> str:
    """The one-line ConfigError of a case, loaded as the Snakefile loads it."""
    for name, text in case.files.items():
        (tmp_path / name).write_text(text)
    path = tmp_path / "bad.yaml"
    if case.text is not None:
        path.write_text(case.text.replace("REGISTRY", str(tmp_path / "models.yaml")))
    with pytest.raises(ConfigError) as raised:
        load_config([path], parse_config(list(case.config)), REPO_ROOT)
    return str(raised.value)


def test_the_table_holds_at_least_45_distinct_hostile_configs():
    assert len(HOSTILE) >= 45
    assert len({case.name for case in HOSTILE}) == len(HOSTILE)
    assert len({(case.text, case.config, tuple(case.files.items())) for case in HOSTILE}) == len(HOSTILE)


def test_the_base_config_is_valid(tmp_path):
    (tmp_path / "ok.yaml").write_text(BASE)
    config = load_config([tmp_path / "ok.yaml"], None, REPO_ROOT)
    assert [(job.method, job.budget) for job in job_grid(config)] == [("vanilla", "full"), ("fastv", "64")]


@pytest.mark.parametrize("case", HOSTILE, ids=[case.name for case in HOSTILE])
def test_refused_with_one_clear_line(case, tmp_path):
    message = refusal(case, tmp_path)
    assert "\n" not in message and message.startswith("config error: "), message
    assert case.where in message, message
    for expected in case.expect:
        assert expected in message, f"{expected!r} not in {message!r}"
    assert "valid" in message, message
    assert "ficoco pipeline configuration" not in message, "the schema's top-level description is no hint"


def test_a_missing_default_registry_names_the_file(tmp_path):
    (tmp_path / "workflow" / "schemas").mkdir(parents=True)
    (tmp_path / "workflow" / "schemas" / "config.schema.yaml").write_bytes(
        (REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml").read_bytes())
    (tmp_path / "bad.yaml").write_text(BASE)
    with pytest.raises(ConfigError) as raised:
        load_config([tmp_path / "bad.yaml"], None, tmp_path)
    message = str(raised.value)
    assert "config/models.yaml: the models registry config/models.yaml does not exist" in message
    assert "valid: run from the repository root, or set registries.models" in message and "\n" not in message


def test_a_tab_indented_json_config_is_read_as_json(tmp_path):
    (tmp_path / "ok.json").write_text('{\n\t"models": ["llava-1.5-7b"],\n\t"methods": ["vanilla"],\n\t"budgets": [36],\n'
                                      '\t"benchmarks": ["toy-shapes-mini"]\n}\n')
    assert load_config([tmp_path / "ok.json"], None, REPO_ROOT)["methods"] == ["vanilla"]


# --------------------------------------------------------------------------------------------
# The same refusals from a real Snakemake start and from `ficoco grid`, before any job

# one of each kind (a key YAML would silently drop, --config syntax, a job that used to start and fail);
# each Snakemake start costs a few seconds
SNAKEMAKE_CASES = ["duplicate-top-level-key", "config-option-list-of-numbers", "options-for-toy-benchmark"]


def run_snakemake(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", *args], cwd=repo,
                          capture_output=True, text=True, timeout=120)


def the_one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Job stats" not in result.stdout + result.stderr and "rule evaluate" not in result.stdout
    return lines[0]


@pytest.mark.parametrize("name", SNAKEMAKE_CASES)
def test_snakemake_stops_before_any_job(name, repo_copy):
    case = next(case for case in HOSTILE if case.name == name)
    (repo_copy / "bad.yaml").write_text(case.text)
    config = ["--config", *case.config] if case.config else []
    line = the_one_line(run_snakemake(repo_copy, "--configfile", "bad.yaml", *config))
    assert case.where in line
    for expected in case.expect:
        assert expected in line, f"{expected!r} not in {line!r}"


def test_snakemake_names_the_line_of_a_yaml_error_in_the_default_config(repo_copy):
    (repo_copy / "config" / "config.yaml").write_text("models: [toy-llava\nmethods: [vanilla]\n")
    line = the_one_line(run_snakemake(repo_copy))
    assert line.startswith("config error: config/config.yaml:2:") and "YAML syntax error" in line


def test_ficoco_grid_names_the_file_and_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("models: [toy-llava]\nmodels: [llava-1.5-7b]\n")
    result = subprocess.run([sys.executable, "-m", "ficoco.cli", "grid", "--configfile", str(tmp_path / "bad.yaml")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "bad.yaml:2:1: models: 'models' is given twice" in result.stderr

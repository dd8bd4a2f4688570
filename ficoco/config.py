"""Pipeline configuration: schema validation, registries, budget checks and the job grid.

Everything here runs when Snakemake parses the workflow, before any job starts, so a bad config
fails at once with one line naming the key, the bad value and what would be valid.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
FULL = "full"  # the budget label of the unreduced model
ADAPTIVE = "adaptive"  # the budget label of an adaptive method's one run (no budget: a count per image)


class ConfigError(ValueError):
    """A config problem, described in one line."""


@dataclass(frozen=True)
class Job:
    """One evaluate job: a row of the grid."""

    model: str
    method: str
    phase: str
    budget: str          # "full", "adaptive" or a positive integer written as a string (it is a path part)
    benchmark: str
    shard: int           # 0-based
    shards: int

    @property
    def run_dir(self) -> str:
        return f"results/runs/{self.model}/{self.benchmark}/{self.method}/b{self.budget}"

    @property
    def predictions(self) -> str:
        return f"{self.run_dir}/shard{self.shard}of{self.shards}/predictions.jsonl"

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# schema validation with one-line messages


def _load_yaml(path: Path) -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def _key_path(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<config>"


def _schema_at(schema: dict, parts) -> dict:
    """The sub-schema that describes the value at `parts` (best effort, for hints)."""
    node = schema
    for part in parts:
        if isinstance(part, int) and "items" in node:
            node = node["items"]
        elif isinstance(node.get("properties"), dict) and part in node["properties"]:
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            break
    return node


def _hint(schema: dict, parts) -> str:
    """A short statement of what is valid at `parts`, from the schema."""
    node = _schema_at(schema, parts)
    if "enum" in node:
        return "one of " + ", ".join(map(str, node["enum"]))
    for depth in range(len(parts), -1, -1):
        description = _schema_at(schema, parts[:depth]).get("description")
        if description:
            return " ".join(description.split())
    if "type" in node:
        return f"a value of type {node['type']}"
    return "see workflow/schemas/config.schema.yaml"


def _format_schema_error(error, schema: dict) -> str:
    parts = list(error.absolute_path)
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return f"config error: {_key_path(parts + [missing])}: missing required key; valid: {_hint(schema, parts + [missing])}"
    if error.validator == "additionalProperties":
        allowed = sorted(_schema_at(schema, parts).get("properties", {}))
        unexpected = sorted(set(error.instance) - set(allowed))
        return (f"config error: {_key_path(parts + [unexpected[0]])}: unknown key; "
                f"valid keys: {', '.join(allowed)}")
    value = json.dumps(error.instance, default=str)
    if error.validator == "type":
        expected = error.validator_value
        return f"config error: {_key_path(parts)}: {value} has the wrong type; valid: {expected}"
    return f"config error: {_key_path(parts)}: {value} is not valid; valid: {_hint(schema, parts)}"


def _fill_defaults(schema: dict, instance: dict) -> dict:
    """Fill `default`s of object properties, recursively (jsonschema only validates)."""
    for name, sub in schema.get("properties", {}).items():
        if name not in instance and "default" in sub:
            instance[name] = copy.deepcopy(sub["default"])
        if isinstance(instance.get(name), dict) and sub.get("type") == "object":
            _fill_defaults(sub, instance[name])
    return instance


def check_schema(config: dict, schema_path: Path = SCHEMA_PATH) -> dict:
    """Validate against the JSON schema; return a copy with defaults filled in."""
    import jsonschema

    if not schema_path.exists():
        raise ConfigError(f"config error: schema file {schema_path} not found; run from a checkout of the repository")
    schema = _load_yaml(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (list(e.absolute_path), e.validator))
    if errors:
        # the deepest, most specific error first: oneOf branches report their own paths
        error = jsonschema.exceptions.best_match(errors)
        raise ConfigError(_format_schema_error(error, schema))
    return _fill_defaults(schema, copy.deepcopy(config))


# ---------------------------------------------------------------------------------------------
# registries and semantic checks


def load_registries(config: dict, root: Path = REPO_ROOT) -> tuple[dict, dict]:
    registries = config.get("registries", {})
    models = _load_yaml(root / registries.get("models", "config/models.yaml"))
    benchmarks = _load_yaml(root / registries.get("benchmarks", "config/benchmarks.yaml"))
    return models, benchmarks


def model_dims(name: str, entry: dict):
    """Model dimensions from the registry entry, without downloading anything."""
    from ficoco.dims import ModelDims, llava_1_5_dims

    shape = entry.get("shape")
    if shape in ("llava-1.5-7b", "llava-1.5-13b"):
        return llava_1_5_dims(shape.rsplit("-", 1)[1])
    if shape == "toy":
        from ficoco.toy.model import toy_llava_config

        return ModelDims.from_config(toy_llava_config())
    raise ConfigError(f"config error: models registry: {name}.shape: {shape!r} is not valid; "
                      f"valid: llava-1.5-7b, llava-1.5-13b, toy")


def _unknown(key: str, value, valid) -> ConfigError:
    return ConfigError(f"config error: {key}: {value!r} is not known; valid: {', '.join(sorted(valid))}")


def resolve_budget(budget, visual_tokens: int) -> int:
    """An integer budget as is; {reduction: r} -> round(visual_tokens * (1 - r))."""
    if isinstance(budget, dict):
        from ficoco.budget import budget_from_ratio

        return budget_from_ratio(budget["reduction"], visual_tokens)
    return int(budget)


def method_overrides(config: dict, models: dict, model: str, method: str, budget: str) -> dict:
    """Hyperparameter overrides for one job: model registry < config < config per_budget."""
    merged: dict = {}
    for source in (models[model].get("method_params", {}).get(method, {}),
                   config.get("method_params", {}).get(method, {})):
        merged.update({k: v for k, v in source.items() if k != "per_budget"})
        if str(budget).isdigit():                  # "full" and "adaptive" take no per-budget overrides
            merged.update(source.get("per_budget", {}).get(int(budget), {}))
    return merged


def validate(config: dict, root: Path = REPO_ROOT) -> dict:
    """Full validation: schema, registry names, budgets against every model and method.

    Returns the config with defaults filled in. Raises ConfigError (one line) on the first problem.
    """
    config = check_schema(config, Path(root) / "workflow" / "schemas" / "config.schema.yaml")
    models, benchmarks = load_registries(config, root)
    for index, name in enumerate(config["models"]):
        if name not in models:
            raise _unknown(f"models[{index}]", name, models)
    for index, name in enumerate(config["benchmarks"]):
        if name not in benchmarks:
            raise _unknown(f"benchmarks[{index}]", name, benchmarks)
    if isinstance(config["shards"], dict):
        for name in config["shards"]:
            if name not in config["benchmarks"]:
                raise _unknown(f"shards.{name}", name, config["benchmarks"])

    from ficoco import methods as method_registry

    valid_methods = method_registry.names()
    for index, name in enumerate(config["methods"]):
        if name not in valid_methods:
            raise _unknown(f"methods[{index}]", name, valid_methods)
    for index, name in enumerate(config["measure"]["methods"] or []):
        if name not in config["methods"]:
            raise _unknown(f"measure.methods[{index}]", name, config["methods"])
    for name in config["method_params"]:
        if name not in valid_methods:
            raise _unknown(f"method_params.{name}", name, valid_methods)

    for model in config["models"]:
        dims = model_dims(model, models[model])
        for method in config["methods"]:                  # adaptive methods run once, without a budget
            if method_registry.get(method).budgeted:
                continue
            overrides = method_overrides(config, models, model, method, ADAPTIVE)
            try:
                method_registry.get(method).check_budget(dims, None, **overrides)
            except ValueError as error:
                raise ConfigError(f"config error: methods: {method} (adaptive, budget label {ADAPTIVE}) on model "
                                  f"{model}: {' '.join(str(error).split())}") from None
        for index, raw in enumerate(config["budgets"]):
            budget = resolve_budget(raw, dims.visual_tokens)
            if budget > dims.visual_tokens:
                raise ConfigError(f"config error: budgets[{index}]: {budget} is above the {dims.visual_tokens} visual "
                                  f"tokens of model {model}; valid: 1..{dims.visual_tokens}")
            for method in config["methods"]:
                if method == "vanilla" or not method_registry.get(method).budgeted:
                    continue
                overrides = method_overrides(config, models, model, method, str(budget))
                try:
                    method_registry.get(method).check_budget(dims, budget, **overrides)
                except ValueError as error:  # InfeasibleBudget and bad overrides are ValueErrors
                    raise ConfigError(f"config error: budgets[{index}]: {budget} for method {method} on model "
                                      f"{model}: {' '.join(str(error).split())}") from None
    return config


# ---------------------------------------------------------------------------------------------
# the grid


def budgets_for(config: dict, dims) -> list[str]:
    """Distinct budgets of a model as path labels, in config order."""
    labels: list[str] = []
    for raw in config["budgets"]:
        label = str(resolve_budget(raw, dims.visual_tokens))
        if label not in labels:
            labels.append(label)
    return labels


def shards_for(config: dict, benchmark: str) -> int:
    shards = config["shards"]
    return shards.get(benchmark, 1) if isinstance(shards, dict) else shards


def job_grid(config: dict, root: Path = REPO_ROOT) -> list[Job]:
    """Every evaluate job of a validated config."""
    from ficoco import methods as method_registry

    models, _ = load_registries(config, root)
    jobs = []
    for model in config["models"]:
        dims = model_dims(model, models[model])
        for benchmark in config["benchmarks"]:
            shards = shards_for(config, benchmark)
            for method in config["methods"]:
                registered = method_registry.get(method)
                phase = registered.phase
                # vanilla runs once unreduced ("full"), an adaptive method once with its own counts ("adaptive")
                budgets = [FULL] if method == "vanilla" else [ADAPTIVE] if not registered.budgeted \
                    else budgets_for(config, dims)
                for budget in budgets:
                    for shard in range(shards):
                        jobs.append(Job(model, method, phase, budget, benchmark, shard, shards))
    return jobs


def load_and_validate(path: str | Path, root: Path | None = None) -> dict:
    """Validate a config file; registries and schema are read relative to `root` (default: cwd)."""
    return validate(_load_yaml(Path(path)), Path.cwd() if root is None else root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ficoco grid", description="Validate a config and print its job grid.")
    parser.add_argument("--configfile", default="config/config.yaml")
    args = parser.parse_args(argv)
    try:
        config = load_and_validate(args.configfile)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    jobs = job_grid(config, Path.cwd())
    for job in jobs:
        print(f"{job.model:16} {job.benchmark:14} {job.method:14} {job.phase:7} b{job.budget:<5} "
              f"shard {job.shard + 1}/{job.shards}")
    print(f"{len(jobs)} evaluate jobs")
    return 0

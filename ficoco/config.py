"""Pipeline configuration: strict reading, schema validation, registries, budget checks, the job grid.

Everything here runs when Snakemake parses the workflow, before any job starts, so a bad config
fails at once with one line naming the file (and the line, for YAML errors), the key, the bad value
and what would be valid:

    config error: bad.yaml:5:1: budgets: 'budgets' is given twice in the same mapping (first at line 3); ...
    config error: my.yaml: shards.vqav2: 300 shards for benchmark vqav2, which has at most 8 rows to evaluate
                  (limit 8); valid: 1..8 (a shard needs at least one row)          [one line in reality]
    config error: --config: budgets[0]: '36' is not valid; valid: an integer >= 1 ...; hint: ...

`load_config(files, overrides)` reads the config files the way Snakemake merges them (later files
and `--config` overrides win, mappings merge key by key), but strictly: a YAML syntax error, an empty
file or a key given twice is refused instead of guessed at. `validate` then checks the merged config
against the schema, the registries and every method's budget rules.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from ficoco.budget_labels import ADAPTIVE, FULL, ImageTokens, TflopsTarget, image_tokens, sort_key, tflops_target
from ficoco.flops import NOMINAL_TEXT_TOKENS

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = "config/config.yaml"
CONFIG_OPTION = "--config"  # the source label of Snakemake's --config KEY=VALUE overrides
REQUIRED_KEYS = "models, methods, budgets, benchmarks"


class ConfigError(ValueError):
    """A config problem, in one line: where (file, line, key), the bad value and what would be valid."""

    def __init__(self, text: str, key: Sequence = (), source: str = ""):
        text = " ".join(str(text).split())              # one line, whatever the parts contained
        self.text = text[len("config error: "):] if text.startswith("config error: ") else text
        self.key = tuple(key)
        self.source = source
        super().__init__(self.line)

    @property
    def line(self) -> str:
        where = [part for part in (self.source, _key_path(self.key) if self.key else "") if part]
        return ": ".join(["config error", *where, self.text])

    def __str__(self) -> str:
        return self.line


@dataclass(frozen=True)
class Job:
    """One evaluate job: a row of the grid."""

    model: str
    method: str
    phase: str
    budget: str          # its label, a path part (ficoco.budget_labels): "full", "adaptive", "128", "t2.4", ...
    benchmark: str
    shard: int           # 0-based
    shards: int
    run_budget: str                          # what the job runs: the label, or the token budget a TFLOPs label
                                             # was solved into for this model and method
    predicted_tflops: float | None = None    # a TFLOPs label's solved cost under its convention

    @property
    def run_dir(self) -> str:
        return f"results/runs/{self.model}/{self.benchmark}/{self.method}/b{self.budget}"

    @property
    def predictions(self) -> str:
        return f"{self.run_dir}/shard{self.shard}of{self.shards}/predictions.jsonl"

    def to_dict(self) -> dict:
        return asdict(self)


def _key_path(parts: Iterable) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<config>"


def _show(value: Any) -> str:
    """A value as the user would write it in YAML (flow style, one line)."""
    if isinstance(value, str):
        return repr(value)
    try:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()
    except yaml.YAMLError:
        return repr(value)


def _did_you_mean(value: Any, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def display_path(path: str | Path) -> str:
    """A file path as messages show it: relative to the working directory when it lies below it."""
    text = os.path.relpath(Path(path).absolute())
    return text if not text.startswith("..") else str(Path(path).absolute())


# ---------------------------------------------------------------------------------------------
# strict reading of YAML files


def _check_duplicate_keys(node: yaml.Node, path: str, prefix: tuple, seen_nodes: set[int]) -> None:
    """Refuse a mapping that gives one key twice (PyYAML would silently keep the last value)."""
    if id(node) in seen_nodes:          # anchors and aliases share nodes; each is checked once
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_seen: dict[tuple[str, str], tuple[int, int]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":      # `<<: *base` may be overridden: not a duplicate
                continue
            if isinstance(key_node, yaml.ScalarNode):
                identity = (key_node.tag, key_node.value)
                line, column = key_node.start_mark.line + 1, key_node.start_mark.column + 1
                if identity in first_seen:
                    first_line, first_column = first_seen[identity]
                    first = f"line {first_line}" if first_line != line else f"column {first_column} of this line"
                    raise ConfigError(
                        f"{key_node.value!r} is given twice in the same mapping (first at {first}); YAML would "
                        f"silently keep only the last value; valid: each key once (delete or merge one of them)",
                        prefix + (key_node.value,), f"{path}:{line}:{column}")
                first_seen[identity] = (line, column)
                _check_duplicate_keys(value_node, path, prefix + (key_node.value,), seen_nodes)
            else:
                _check_duplicate_keys(value_node, path, prefix, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicate_keys(item, path, prefix + (index,), seen_nodes)


def _json_object(pairs: list[tuple[str, Any]], path: str) -> dict:
    """A JSON object, refusing a key given twice (json.loads would silently keep the last value)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"{key!r} is given twice in the same JSON object (values {_show(seen[key])} and "
                              f"{_show(value)}); valid: each key once (delete or merge one of them)", (key,), path)
        seen[key] = value
    return seen


def _yaml_syntax_error(error: yaml.MarkedYAMLError, path: str) -> ConfigError:
    mark = error.problem_mark or error.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
    problem = " ".join(part for part in (error.context, error.problem) if part)
    if "'\\t'" in problem or "\t" in problem:
        valid = "indentation with spaces (YAML does not allow tab characters for indentation)"
    else:
        valid = ("YAML syntax, e.g. `budgets: [72, 48]` or one `- item` per line; check brackets, quotes, colons "
                 "and indentation on this line and the one before")
    return ConfigError(f"YAML syntax error: {problem}; valid: {valid}", (), where)


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """The parsed contents of a YAML (or JSON) file; ConfigError (one line, with file and line) on
    a missing file, a syntax error or a key given twice."""
    shown = display_path(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} not found; valid: an existing file (paths are relative to the working "
                          f"directory {Path.cwd()})", (), shown) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{what} cannot be read ({error}); valid: a readable UTF-8 text file", (), shown) from None
    if text.lstrip().startswith("{"):       # JSON first, as Snakemake reads it (YAML refuses JSON's tab indentation)
        try:
            return json.loads(text, object_pairs_hook=lambda pairs: _json_object(pairs, shown))
        except json.JSONDecodeError:
            pass
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, shown, (), set())
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as error:
        raise _yaml_syntax_error(error, shown) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"YAML error: {error}; valid: a YAML mapping", (), shown) from None
    finally:
        loader.dispose()


def read_config_file(path: str | Path) -> dict:
    """One config file, strictly: a non-empty YAML mapping with each key once."""
    data = read_yaml_file(path)
    shown = display_path(path)
    if data is None:
        raise ConfigError(f"the file is empty (or only comments); valid: a YAML mapping with at least "
                          f"{REQUIRED_KEYS}, as in config/config.yaml", (), shown)
    if not isinstance(data, dict):
        raise ConfigError(f"the top level is {type(data).__name__} {_show(data)[:60]}; valid: a YAML mapping of "
                          f"keys ({REQUIRED_KEYS}, ...), as in config/config.yaml", (), shown)
    return data


# ---------------------------------------------------------------------------------------------
# merging files and --config overrides, remembering where each key came from


@dataclass(frozen=True)
class Sources:
    """Which file (or `--config`) set each key of a merged config, so that messages can name it."""

    files: tuple[str, ...]
    by_key: Mapping[tuple, str]      # key path (mapping keys only) -> source label

    def of(self, key: Sequence) -> str:
        key = tuple(key)
        for depth in range(len(key), 0, -1):
            if key[:depth] in self.by_key:
                return self.by_key[key[:depth]]
        return " + ".join(self.files) or "<config>"


def _plain(value: Any) -> Any:
    """Mappings and sequences (Snakemake hands over immutable maps) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _record(by_key: dict, prefix: tuple, value: Any, label: str) -> None:
    by_key[prefix] = label
    if isinstance(value, Mapping):
        for key, item in value.items():
            _record(by_key, prefix + (key,), item, label)


def _merge(base: dict, update: Mapping, label: str, by_key: dict, prefix: tuple = ()) -> None:
    """Snakemake's update_config (mappings merge key by key, anything else is replaced), recording sources."""
    for key, value in update.items():
        path = prefix + (key,)
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            by_key[path] = label
            _merge(base[key], value, label, by_key, path)
        else:
            base[key] = _plain(value)
            _record(by_key, path, value, label)


def merge_sources(files: Sequence[str | Path], overrides: Mapping | None = None) -> tuple[dict, Sources]:
    """Read every file strictly and merge them, then the `--config` overrides, as Snakemake does."""
    merged: dict = {}
    by_key: dict = {}
    shown = []
    for path in files:
        data = read_config_file(path)
        shown.append(display_path(path))
        _merge(merged, data, shown[-1], by_key)
    if overrides:
        _merge(merged, overrides, CONFIG_OPTION, by_key)
    return merged, Sources(tuple(shown), by_key)


def _reparse(value: Any) -> Any:
    """What a --config value meant: YAML's BaseLoader (Snakemake's --config parser) keeps nested
    scalars as text, so '36' inside [36] is a string; read each text with the safe loader again."""
    if isinstance(value, Mapping):
        return {key: _reparse(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_reparse(item) for item in value]
    if isinstance(value, str):
        try:
            return yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            return value
    return value


def _config_option_hint(key: str, value: Any, schema: dict) -> str:
    """How to write a key that came from `--config` and failed validation."""
    meant = _reparse(value)
    if schema.get("properties", {}).get(key, {}).get("type") == "array" and not isinstance(meant, list):
        meant = [meant]
    if meant == value:                                   # not a --config parsing problem
        return ""
    return (f"hint: Snakemake reads `--config {key}=...` with YAML's BaseLoader, which keeps null and every value "
            f"inside a list or mapping as text ({key} arrived as {_show(value)}); write `{key}: {_show(meant)}` in a "
            f"YAML file and pass it with --configfile FILE (--config keeps only a top-level number, true/false or word "
            f"as itself, e.g. --config batch_size=8)")


# ---------------------------------------------------------------------------------------------
# schema validation with one-line messages


def _load_schema(schema_path: Path) -> dict:
    if not schema_path.exists():
        raise ConfigError(f"schema file {schema_path} not found; valid: run from a checkout of the repository")
    with open(schema_path) as handle:
        return yaml.safe_load(handle)


def _followed(schema: dict, node: dict) -> dict:
    """`node` with a local reference ({$ref: "#/properties/models"}) replaced by what it names."""
    while "$ref" in node:
        reference, node = node["$ref"], schema
        for part in reference.removeprefix("#/").split("/"):
            node = node[part]
    return node


def _schema_at(schema: dict, parts) -> dict:
    """The sub-schema that describes the value at `parts` (best effort, for hints)."""
    node = schema
    for part in parts:
        node = _followed(schema, node)
        if isinstance(part, int) and "items" in node:
            node = node["items"]
        elif "oneOf" in node and any(part in branch.get("properties", {}) for branch in node["oneOf"]):
            node = next(branch for branch in node["oneOf"] if part in branch.get("properties", {}))["properties"][part]
        elif isinstance(node.get("properties"), dict) and part in node["properties"]:
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            break
    return _followed(schema, node)


def _describe(node: dict) -> str:
    """What a sub-schema accepts, in words (e.g. "an integer >= 1", "a list of strings")."""
    if "enum" in node:
        return "one of " + ", ".join(map(str, node["enum"]))
    if "oneOf" in node:
        return " or ".join(_describe(branch) for branch in node["oneOf"])
    types = node.get("type")
    types = types if isinstance(types, list) else [types] if types else []
    words = []
    for kind in types:
        if kind in ("integer", "number"):
            bounds = []
            if "minimum" in node:
                bounds.append(f">= {node['minimum']}")
            if "exclusiveMinimum" in node:
                bounds.append(f"> {node['exclusiveMinimum']}")
            if "exclusiveMaximum" in node:
                bounds.append(f"< {node['exclusiveMaximum']}")
            words.append(("an integer" if kind == "integer" else "a number") + (" " + " and ".join(bounds)
                                                                              if bounds else ""))
        elif kind == "string":
            words.append("a non-empty string" if node.get("minLength") else "a string")
        elif kind == "boolean":
            words.append("true or false")
        elif kind == "null":
            words.append("null")
        elif kind == "array":
            item = _describe(node.get("items", {})) or "values"
            words.append(("a non-empty list" if node.get("minItems") else "a list") + f" (items: {item})")
        elif kind == "object":
            if node.get("properties"):
                words.append("a mapping with keys " + ", ".join(node["properties"]))
            elif isinstance(node.get("additionalProperties"), dict):
                words.append(f"a mapping of names to {_describe(node['additionalProperties']) or 'values'}")
            else:
                words.append("a mapping")
    return " or ".join(words)


def _hint(schema: dict, parts) -> str:
    """What is valid at `parts`: the constraint in words plus the nearest description below the top."""
    parts = list(parts)
    said = [_describe(_schema_at(schema, parts))]
    for depth in range(len(parts), 0, -1):           # never the top-level description: it describes everything
        description = _schema_at(schema, parts[:depth]).get("description")
        if description:
            said.append(" ".join(description.split()))
            break
    said = [text for text in said if text]
    return " — ".join(said) if said else "see workflow/schemas/config.schema.yaml"


def _schema_error(error, schema: dict) -> ConfigError:
    parts = list(error.absolute_path)
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return ConfigError(f"missing required key; valid: {_hint(schema, parts + [missing])}", parts + [missing])
    if error.validator == "additionalProperties":
        allowed = sorted(_schema_at(schema, parts).get("properties", {}))
        unexpected = sorted((name for name in error.instance if name not in allowed), key=str)
        return ConfigError(f"unknown key {unexpected[0]!r}{_did_you_mean(unexpected[0], allowed)}; "
                           f"valid keys: {', '.join(allowed)}", parts + [unexpected[0]])
    value = _show(error.instance)
    if error.validator == "type":
        return ConfigError(f"{value} has the wrong type; valid: {_hint(schema, parts)}", parts)
    if error.validator == "minItems" and not error.instance:
        return ConfigError(f"{value} is empty; valid: {_hint(schema, parts)}", parts)
    return ConfigError(f"{value} is not valid; valid: {_hint(schema, parts)}", parts)


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

    schema = _load_schema(schema_path)
    if not isinstance(config, dict):
        raise ConfigError(f"the config is {type(config).__name__} {_show(config)[:60]}; valid: a mapping of keys "
                          f"({REQUIRED_KEYS}, ...)")
    for name in config:
        if not isinstance(name, str):
            raise ConfigError(f"unknown key {name!r} (a {type(name).__name__}); valid keys: "
                              f"{', '.join(sorted(schema['properties']))}", [str(name)])
    validator = jsonschema.Draft202012Validator(schema)
    errors = list(validator.iter_errors(config))
    if errors:
        # the deepest, most specific error first: oneOf branches report their own paths
        raise _schema_error(jsonschema.exceptions.best_match(errors), schema)
    return _fill_defaults(schema, copy.deepcopy(config))


# ---------------------------------------------------------------------------------------------
# registries


MODEL_SOURCES = ("hub", "toy")
# source-dir: the dimensions of the config.json in the entry's `source_dir` (a local copy of the model)
MODEL_SHAPES = ("llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "qwen2-vl-7b", "qwen2.5-vl-7b", "toy", "source-dir")
BENCHMARK_SOURCES = ("hub", "toy")


def _registry_paths(config: dict, root: Path) -> dict[str, tuple[tuple, Path, str]]:
    registries = config.get("registries", {})
    paths = {}
    for kind, default in (("models", "config/models.yaml"), ("benchmarks", "config/benchmarks.yaml")):
        relative = registries.get(kind, default)
        paths[kind] = (("registries", kind) if relative != default else (), Path(root) / relative, relative)
    return paths


def _read_registry(key: tuple, path: Path, relative: str, kind: str) -> dict:
    if not path.exists():
        if key:
            raise ConfigError(f"{relative!r}: the {kind} registry file {display_path(path)} does not exist; "
                              f"valid: a registry file path relative to the working directory, e.g. "
                              f"config/{kind}.yaml", key)
        raise ConfigError(f"the {kind} registry {relative} does not exist (looked in {Path(path).parent.parent}); "
                          f"valid: run from the repository root, or set registries.{kind}", (), display_path(path))
    data = read_yaml_file(path, f"{kind} registry")
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"the {kind} registry holds {_show(data)[:60]}; valid: a mapping of names to entries, "
                          f"as in config/{kind}.yaml", (), display_path(path))
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{_show(entry)[:60]} is not an entry; valid: a mapping (source, id, ...)",
                              [str(name)], display_path(path))
    return data


def load_registries(config: dict, root: Path = REPO_ROOT) -> tuple[dict, dict]:
    """(model registry, benchmark registry), read strictly; ConfigError names a missing or bad file."""
    paths = _registry_paths(config, Path(root))
    return (_read_registry(*paths["models"], "models"), _read_registry(*paths["benchmarks"], "benchmarks"))


def check_fetched_copies(models: dict, benchmarks: dict, model_manifests: Mapping[str, str],
                         benchmark_manifests: Mapping[str, str]) -> None:
    """ConfigError when a fetched copy (`name -> manifest.json path`, where one exists) holds another pin than its
    registry entry: its jobs would report the old copy's numbers under the new pin. Before any job starts."""
    from ficoco.benchmarks.fetch import benchmark_pin, fetched_benchmark_pin
    from ficoco.fetch import fetched_model_pin, model_pin

    checks = [(name, path, "models", model_pin(models[name]), fetched_model_pin)
              for name, path in model_manifests.items()]
    checks += [(name, path, "benchmarks", benchmark_pin(benchmarks[name]), fetched_benchmark_pin)
               for name, path in benchmark_manifests.items()]
    for name, path, kind, pinned, fetched_pin in checks:
        manifest = Path(path)
        if not manifest.is_file():
            continue
        try:
            fetched = fetched_pin(json.loads(manifest.read_text()))
        except (OSError, ValueError, AttributeError):
            continue                                 # an unreadable manifest: its fetch reruns, nothing is reused
        differ = {key: (fetched[key], pinned[key]) for key in pinned
                  if fetched[key] is not None and fetched[key] != pinned[key]}
        if differ:
            shown = "; ".join(f"{key} {old!r} there, {new!r} in the registry" for key, (old, new) in differ.items())
            raise ConfigError(f"{display_path(manifest.parent)} was fetched at another pin than {kind} registry entry "
                              f"{name!r} names ({shown}): its results would be reported under the new pin; valid: "
                              f"remove the old copy to fetch the new pin (rm -r {display_path(manifest.parent)}; its "
                              f"jobs rerun), or restore the registry's pin", [name])


def model_dims(name: str, entry: dict, registry: str = "config/models.yaml"):
    """Model dimensions from the registry entry, without downloading anything."""
    from ficoco.dims import ModelDims, dims_from_config, llava_1_5_dims, llava_next_dims
    from ficoco.qwen_dims import qwen_vl_dims

    shape = entry.get("shape")
    if shape in ("llava-1.5-7b", "llava-1.5-13b"):
        return llava_1_5_dims(shape.rsplit("-", 1)[1])
    if shape == "llava-next-7b":
        return llava_next_dims("7b")
    if shape in ("qwen2-vl-7b", "qwen2.5-vl-7b"):
        return qwen_vl_dims(shape)
    if shape == "source-dir":
        config = Path(entry.get("source_dir") or "") / "config.json"
        try:
            return dims_from_config(json.loads(config.read_text()))
        except (OSError, ValueError, TypeError) as error:
            raise ConfigError(f"shape source-dir reads {display_path(config)}: {error}; valid: a source_dir holding "
                              f"the model's config.json (a LLaVA, LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL config)",
                              [name, "shape"], registry) from None
    if shape == "toy":
        from ficoco.toy.model import toy_llava_config

        return ModelDims.from_config(toy_llava_config(entry.get("size", "default")))
    raise ConfigError(f"{shape!r} is not a known model shape; valid: {', '.join(MODEL_SHAPES)}",
                      [name, "shape"], registry)


def _check_model_entry(name: str, entry: dict, registry: str) -> None:
    if entry.get("source") not in MODEL_SOURCES:
        raise ConfigError(f"{entry.get('source')!r} is not a model source; valid: {', '.join(MODEL_SOURCES)}",
                          [name, "source"], registry)
    if entry.get("shape") not in MODEL_SHAPES:
        raise ConfigError(f"{entry.get('shape')!r} is not a known model shape; valid: {', '.join(MODEL_SHAPES)}",
                          [name, "shape"], registry)
    template = entry.get("prompt_template")
    if not isinstance(template, str) or "<image>" not in template or "{prompt}" not in template:
        raise ConfigError(f"{template!r} is not a prompt template; valid: a string with <image> and {{prompt}}, "
                          f"e.g. \"USER: <image>\\n{{prompt}} ASSISTANT:\"", [name, "prompt_template"], registry)
    text_tokens = entry.get("text_tokens", NOMINAL_TEXT_TOKENS)
    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 1:
        raise ConfigError(f"{text_tokens!r} is not a number of text tokens; valid: an integer >= 1 (a typical "
                          f"prompt's text tokens; default {NOMINAL_TEXT_TOKENS})", [name, "text_tokens"], registry)
    source_dir = entry.get("source_dir")
    if source_dir is not None and (entry["source"] != "hub" or not isinstance(source_dir, str)
                                   or not (Path(source_dir) / "config.json").is_file()):
        raise ConfigError(f"{source_dir!r} is not a source directory; valid: on a hub model, a local directory "
                          f"holding the model at its revision (config.json, weights, processor), which fetch_model "
                          f"copies instead of downloading", [name, "source_dir"], registry)
    if entry.get("shape") == "source-dir" and source_dir is None:
        raise ConfigError("shape source-dir reads the model's dimensions from its source_dir, and this entry has "
                          "none; valid: a known shape, or a source_dir", [name, "shape"], registry)
    if entry["source"] == "hub" and not entry.get("id"):
        raise ConfigError(f"{entry.get('id')!r} is not a model id; valid: a Hugging Face id such as "
                          f"llava-hf/llava-1.5-7b-hf", [name, "id"], registry)
    text_tower = entry.get("text_tower")
    if text_tower is not None and (entry["source"] != "hub" or not isinstance(text_tower, dict)
                                   or set(text_tower) != {"id", "revision"}
                                   or not all(isinstance(value, str) and value for value in text_tower.values())):
        raise ConfigError(f"{text_tower!r} is not a text tower; valid: on a hub model, {{id: <the CLIP checkpoint its "
                          f"vision tower came from>, revision: <commit>}} (a toy model's is built with it)",
                          [name, "text_tower"], registry)
    _check_registry_method_params(name, entry.get("method_params") or {}, registry)
    if entry["source"] == "toy":
        from ficoco.toy.model import RECIPES, SIZES

        for key, valid, default in (("size", tuple(SIZES), "default"), ("recipe", RECIPES, "end-to-end")):
            if entry.get(key, default) not in valid:
                raise ConfigError(f"{entry.get(key)!r} is not a toy model {key}; valid: {', '.join(valid)}",
                                  [name, key], registry)


def _check_registry_method_params(name: str, method_params: dict, registry: str) -> None:
    """A model entry's method_params: registered methods, their parameters and values, and per_budget keys of a
    budget's form (an integer, or a TFLOPs target's or per-image count's label): any other key would never match
    a job's budget and be ignored without a word."""
    from ficoco import methods as method_registry

    if not isinstance(method_params, dict):
        raise ConfigError(f"{_show(method_params)} is not a mapping; valid: method -> parameters",
                          [name, "method_params"], registry)
    for method_name, params in method_params.items():
        key = [name, "method_params", method_name]
        if method_name not in method_registry.names():
            raise ConfigError(f"{method_name!r} is not a method{_did_you_mean(method_name, method_registry.names())}; "
                              f"valid: {', '.join(method_registry.names())}", key, registry)
        method = method_registry.get(method_name)
        for param, value in (params or {}).items():
            blocks = value.items() if param == "per_budget" and isinstance(value, dict) else [(None, {param: value})]
            for budget, overrides in blocks:
                where = key if budget is None else key + ["per_budget", str(budget)]
                integer = isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1
                if budget is not None and not integer and not (
                        isinstance(budget, str) and (tflops_target(budget) or image_tokens(budget)) is not None):
                    raise ConfigError(f"{budget!r} is not a budget; valid: an integer token budget, or the label of a "
                                      f"TFLOPs target (t1.5-nominal) or of a count for every image (n600)", where,
                                      registry)
                for inner, inner_value in (overrides or {}).items():
                    if inner not in method.params:
                        raise ConfigError(f"{inner!r} is not a parameter of {method_name}"
                                          f"{_did_you_mean(inner, method.params)}; valid: {', '.join(method.params)}"
                                          + ("" if budget is not None else ", per_budget"), where + [inner], registry)
                    problem = method.params[inner].check(inner_value)
                    if problem:
                        raise ConfigError(f"{method_name}: {inner}={_show(inner_value)} {problem}; valid: "
                                          f"{problem.removeprefix('must be ')}", where + [inner], registry)


def _benchmark_object(name: str, entry: dict, registry: str):
    """The registered prompt/scoring object of a benchmark registry entry."""
    from ficoco import benchmarks as benchmark_modules

    module = entry.get("module", name)
    if module not in benchmark_modules.names():
        key = [name, "module"] if "module" in entry else [name]
        raise ConfigError(f"{module!r} is not a registered benchmark module; valid: "
                          f"{', '.join(benchmark_modules.names())}", key, registry)
    return benchmark_modules.get(module)


def _check_benchmark_entry(name: str, entry: dict, registry: str) -> None:
    source = entry.get("source", "hub")
    if source not in BENCHMARK_SOURCES:
        raise ConfigError(f"{source!r} is not a benchmark source; valid: {', '.join(BENCHMARK_SOURCES)}",
                          [name, "source"], registry)
    rows = entry.get("rows")
    if source == "toy" and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ConfigError(f"{rows!r} is not a row count; valid: an integer >= 1 (the toy benchmark's size)",
                          [name, "rows"], registry)
    if source == "toy":
        from ficoco.toy.shapes import SPLITS      # "test" (the held-out default), "val", "train"

        if entry.get("split", "test") not in SPLITS:
            raise ConfigError(f"{entry.get('split')!r} is not a toy split; valid: {', '.join(SPLITS)}",
                              [name, "split"], registry)
    if source == "hub":
        for field in ("id", "split"):
            if not entry.get(field):
                raise ConfigError(f"{entry.get(field)!r} is missing; valid: the dataset's {field}, as in "
                                  f"config/benchmarks.yaml", [name, field], registry)


# ---------------------------------------------------------------------------------------------
# semantic checks


def _unknown(key: Sequence, value, valid) -> ConfigError:
    valid = sorted(map(str, valid))
    return ConfigError(f"{value!r} is not known{_did_you_mean(value, valid)}; valid: {', '.join(valid)}", key)


def grids(config: dict) -> list[dict]:
    """The grids a config runs, each as a whole config: the top-level grid, then each entry of `grids`
    with its own models, methods, budgets, benchmarks and method_params (every other key shared)."""
    top = {key: value for key, value in config.items() if key != "grids"}
    return [top] + [{**top, "method_params": {}, **grid} for grid in config.get("grids", [])]


def grid_of(config: dict, model: str) -> dict:
    """The grid that runs `model` (each model belongs to one; the top-level grid for any other)."""
    return next((grid for grid in grids(config) if model in grid.get("models", ())), grids(config)[0])


def grid_names(config: dict, kind: str) -> list[str]:
    """Every name of `kind` ("models", "methods", "benchmarks") some grid runs, in config order, once each."""
    return list(dict.fromkeys(name for grid in grids(config) for name in grid[kind]))


def _grid_key(index: int) -> list:
    """Where grid `index` of `grids(config)` sits in the config file."""
    return [] if index == 0 else ["grids", index - 1]


def _check_one_grid_per_model(config: dict) -> None:
    first: dict[str, list] = {}
    for index, grid in enumerate(grids(config)):
        for position, model in enumerate(grid["models"]):
            key = _grid_key(index) + ["models", position]
            if model in first:                       # twice in one grid was refused by _check_names
                raise ConfigError(f"{model!r} is also in the grid at {_key_path(first[model])}; valid: each model in "
                                  f"one grid (its methods, budgets, benchmarks and method_params are that grid's)", key)
            first.setdefault(model, key)


def _check_names(config: dict, key: str, valid: Iterable[str]) -> None:
    valid = list(valid)
    first: dict[str, int] = {}
    for index, name in enumerate(config[key]):
        if name not in valid:
            raise _unknown([key, index], name, valid)
        if name in first:
            raise ConfigError(f"{name!r} is listed twice (also {key}[{first[name]}]); valid: each name once",
                              [key, index])
        first[name] = index


def budget_label(budget, visual_tokens: int, model: str) -> str:
    """The grid label of a configured budget: {tflops: t, convention: c} -> "t<t>" (exact) or
    "t<t>-nominal", solved later per method; {image_tokens: n} -> "n<n>"; any other form -> its token
    budget as text."""
    if isinstance(budget, dict) and "tflops" in budget:
        return TflopsTarget(float(budget["tflops"]), budget.get("convention", "exact")).label
    if isinstance(budget, dict) and "image_tokens" in budget:
        return ImageTokens(budget["image_tokens"]).label
    return str(resolve_budget(budget, visual_tokens, model))


def resolve_budget(budget, visual_tokens: int, model: str) -> int:
    """An integer budget as is; {reduction: r} -> round(visual_tokens * (1 - r)); {paper: label} -> the
    token budget the authors state for that label of `model` (ValueError naming the valid ones)."""
    if isinstance(budget, dict) and "paper" in budget:
        from ficoco.report.paper import budget_of_paper_label

        return budget_of_paper_label(model, budget["paper"])
    if isinstance(budget, dict):
        from ficoco.budget import budget_from_ratio

        return budget_from_ratio(budget["reduction"], visual_tokens)
    return int(budget)


def _max_reduction(visual_tokens: int) -> float:
    """The largest reduction (4 decimals) that still leaves one token: round_half_up(n (1 - r)) >= 1."""
    return int((1 - 0.5 / visual_tokens) * 10**4) / 10**4


def method_overrides(config: dict, models: dict, model: str, method: str, budget: str) -> dict:
    """Hyperparameter overrides for one job: model registry < the model's grid < that grid's per_budget."""
    merged: dict = {}
    for source in (models[model].get("method_params", {}).get(method, {}),
                   grid_of(config, model).get("method_params", {}).get(method, {})):
        merged.update({k: v for k, v in source.items() if k != "per_budget"})
        if str(budget).isdigit():                  # "full" and "adaptive" take no per-budget overrides
            merged.update(source.get("per_budget", {}).get(int(budget), {}))
        elif tflops_target(budget) or image_tokens(budget):    # a TFLOPs target's or per-image count's: its label
            merged.update(source.get("per_budget", {}).get(str(budget), {}))
    return merged


def _require_in_grid(config: dict, key: list, what: str, value: Any, kind: str, known: Iterable[str]) -> None:
    """`key` = [section, name]: the name must be a known `kind` and one the grid (config[kind + "s"]) runs."""
    name, grid = key[1], config[f"{kind}s"]
    if name not in known:
        raise _unknown(key, name, known)
    if name not in grid:
        raise ConfigError(f"{what} {_show(value)} for {kind} {name!r}, which is not in {kind}s; valid: "
                          f"{what} for {kind}s in the grid ({', '.join(grid)}), or add {name} to {kind}s", key)


def _check_method_params(config: dict, method_registry) -> None:
    """method_params only for methods in the grid, only with parameters the method has (a calibrated method's
    fitted ones excluded)."""
    from ficoco.calibrate import FITTED

    valid_methods = method_registry.names()
    for name, params in config["method_params"].items():
        key = ["method_params", name]
        _require_in_grid(config, key, "parameters", params, "method", valid_methods)
        method = method_registry.get(name)
        fitted = FITTED if method.calibrated else ()
        if not method.params:
            raise ConfigError(f"{_show(params)}: method {name} has no parameters; valid: no method_params entry "
                              f"for {name}", key)
        for param, value in params.items():
            if param == "per_budget":
                if not isinstance(value, dict):
                    raise ConfigError(f"{_show(value)} is not a mapping; valid: budget -> parameters, e.g. "
                                      f"{{64: {{{next(iter(method.params))}: ...}}}}", key + ["per_budget"])
                for budget, overrides in value.items():
                    if not isinstance(overrides, dict):
                        raise ConfigError(f"{_show(overrides)} is not a mapping; valid: parameters of {name} "
                                          f"({', '.join(method.params)})", key + ["per_budget", str(budget)])
                    for inner, inner_value in overrides.items():
                        if inner not in method.params or inner in fitted:
                            raise ConfigError(f"{inner!r} is not a parameter of {name} to set"
                                              f"{_did_you_mean(inner, method.params)}; valid: "
                                              f"{', '.join(p for p in method.params if p not in fitted)}",
                                              key + ["per_budget", str(budget), inner])
                        _check_param_value(method, inner, inner_value, key + ["per_budget", str(budget), inner])
            elif param not in method.params:
                raise ConfigError(f"{param!r} is not a parameter of {name}{_did_you_mean(param, method.params)}; "
                                  f"valid: {', '.join(method.params)}, per_budget", key + [param])
            elif param in fitted:
                raise ConfigError(f"{param} of {name} is what its calibration fits for each budget (a value here "
                                  f"would be replaced by the fit); valid: the calibration settings (calibration: "
                                  f"benchmark, rows) and {name}'s other parameters", key + [param])
            else:
                _check_param_value(method, param, value, key + [param])


def _check_param_value(method, param: str, value: Any, key: list) -> None:
    """One parameter value against the method's own check (ranges that involve the model or the
    budget are checked later, by `check_budget`)."""
    problem = method.params[param].check(value)
    if problem:
        note = "" if method.budgeted else f" (adaptive, budget label {ADAPTIVE})"
        raise ConfigError(f"method {method.name}{note}: {param}={_show(value)} {problem} "
                          f"({method.params[param].doc}); valid: {problem.removeprefix('must be ')}", key)


def _check_per_budget_keys(config: dict, labels: list[str]) -> None:
    """A per_budget block only for budgets of the grid (as resolved on the configured models): an
    integer token budget, or the label of a TFLOPs target ("t1.5-nominal") or of a count for every image
    ("n600") as a string."""
    valid = ", ".join(sorted(set(labels), key=sort_key))
    for name, params in config["method_params"].items():
        for budget in params.get("per_budget", {}):
            token_key = isinstance(budget, int) and not isinstance(budget, bool) and str(budget) in labels
            label_key = isinstance(budget, str) and (tflops_target(budget) or image_tokens(budget)) is not None \
                and budget in labels
            if not (token_key or label_key):
                raise ConfigError(f"{budget!r} is not a budget of the grid; valid: one of the grid's budgets (an "
                                  f"integer, or a TFLOPs target's or per-image count's label): {valid}",
                                  ["method_params", name, "per_budget", str(budget)])


def _option_problem(value: Any, default: Any) -> str | None:
    """Why a benchmark option value does not fit its default's kind (None when it fits)."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) and value else "a non-empty string"
    if isinstance(default, (list, tuple)):
        choices = list(default)
        if not isinstance(value, list) or not value:
            return f"a non-empty list drawn from {', '.join(map(str, choices))}"
        if all(isinstance(choice, str) for choice in choices) and any(item not in choices for item in value):
            return f"a non-empty list drawn from {', '.join(choices)}"
    return None


def _check_benchmark_options(config: dict, benchmarks: dict, registry: str) -> None:
    for name, options in config["benchmark_options"].items():
        key = ["benchmark_options", name]
        _require_in_grid(config, key, "options", options, "benchmark", benchmarks)
        entry = benchmarks[name]
        benchmark = _benchmark_object(name, entry, registry)
        defaults = dict(getattr(benchmark, "option_defaults", {}) or {})
        if not defaults:
            where = (" (its rows and seed are set in its benchmark registry entry)"
                     if entry.get("source") == "toy" else "")
            raise ConfigError(f"{_show(options)}: benchmark {name} takes no options{where}; valid: no "
                              f"benchmark_options entry for {name}", key)
        for option, value in options.items():
            if option not in defaults:
                raise ConfigError(f"{option!r} is not an option of benchmark {name}"
                                  f"{_did_you_mean(option, defaults)}; valid: {', '.join(sorted(defaults))}",
                                  key + [option])
            if option == "subset_size" and value is not None:
                rows = entry.get("rows")
                top = rows if isinstance(rows, int) and not isinstance(rows, bool) else None
                if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (top and value > top):
                    span = f"1..{top}" if top else "an integer >= 1"
                    raise ConfigError(f"{_show(value)} is not a subset size; valid: {span} (the benchmark has "
                                      f"{top or 'an unknown number of'} rows), or null for all rows", key + [option])
                continue
            problem = _option_problem(value, defaults[option])
            if problem:
                raise ConfigError(f"{_show(value)} does not fit option {option} of {name}; valid: {problem} "
                                  f"(default: {_show(defaults[option])})", key + [option])
        try:                                # the benchmark's own checks (e.g. pope's categories, question_set)
            benchmark.resolve_options(options)
        except ValueError as error:
            raise ConfigError(str(error), key) from error


def rows_of(config: dict, benchmarks: dict, name: str) -> tuple[int | None, str]:
    """The most rows an evaluate job of `name` can see (registry rows, subset_size, limit) and why."""
    candidates = []
    rows = benchmarks[name].get("rows")
    if isinstance(rows, int) and not isinstance(rows, bool):
        candidates.append((rows, f"{rows} rows in the benchmark registry"))
    subset = config["benchmark_options"].get(name, {}).get("subset_size")
    if isinstance(subset, int) and not isinstance(subset, bool):
        candidates.append((subset, f"benchmark_options.{name}.subset_size {subset}"))
    if config["limit"] is not None:
        candidates.append((config["limit"], f"limit {config['limit']}"))
    if not candidates:
        return None, ""
    return min(candidates, key=lambda pair: pair[0])


def _check_shards(config: dict, benchmarks: dict) -> None:
    shards = config["shards"]
    if isinstance(shards, dict):
        for name in shards:
            if name not in config["benchmarks"]:
                raise ConfigError(f"{shards[name]} shards for benchmark {name!r}, which is not in benchmarks; "
                                  f"valid: shards for benchmarks in the grid ({', '.join(config['benchmarks'])})",
                                  ["shards", name])
    for name in config["benchmarks"]:
        count = shards_for(config, name)
        rows, why = rows_of(config, benchmarks, name)
        if rows is not None and count > rows:
            key = ["shards", name] if isinstance(shards, dict) else ["shards"]
            raise ConfigError(f"{count} shards for benchmark {name}, which has at most {rows} rows to evaluate "
                              f"({why}); valid: 1..{rows} (a shard needs at least one row)", key)


def has_text_tower(entry: dict) -> bool:
    """Whether a model registry entry comes with the CLIP text tower of its vision tower's checkpoint: a hub
    model that names one (fetched into its clip/), a toy model of the staged recipe (trained or not)."""
    if entry.get("source") == "toy":
        return entry.get("recipe", "end-to-end") == "staged"
    return bool(entry.get("text_tower"))


def _check_needs(config: dict, models: dict, model_registry: str, method_registry) -> None:
    """Every method of the grid must find what it needs in every model's image layout (a CLS token,
    one crop, a square grid, 1-D positions: `Method.needs`, ficoco/contract.py), and a method that reads
    the instruction through CLIP's text tower a model that has one."""
    for model in config["models"]:
        dims = model_dims(model, models[model], model_registry)
        for index, method in enumerate(config["methods"]):
            if method_registry.get(method).needs_text_tower and not has_text_tower(models[model]):
                raise ConfigError(f"{method} cannot run on model {model}: it reads the instruction through the CLIP "
                                  f"text tower of the vision tower's checkpoint, and {model} has none; valid: a model "
                                  f"with a text_tower in {model_registry} (a toy model: recipe staged)",
                                  ["methods", index])
            refusal = cannot_run(method_registry.get(method), dims,
                                 **method_overrides(config, models, model, method, FULL))
            if refusal:
                runnable = [name for name in method_registry.names() if not cannot_run(method_registry.get(name), dims)]
                raise ConfigError(f"{method} cannot run on model {model}: {refusal}; valid: the methods this model "
                                  f"can run ({', '.join(runnable)}), or another model", ["methods", index])


def cannot_run(method, dims, **overrides) -> str | None:
    """Why `method` (with these parameters) cannot run on a model of shape `dims` (what its image layout lacks; on
    the Qwen2-VL family also what the adapter cannot place yet, `qwen_cannot_run`), or None."""
    from ficoco.qwen_dims import QwenVLDims, qwen_cannot_run

    if isinstance(dims, QwenVLDims):
        return qwen_cannot_run(method, dims, **overrides)
    unmet = method.unmet_needs(dims, **overrides)
    return f"it needs {'; '.join(unmet)}" if unmet else None


def _check_budgets(config: dict, models: dict, model_registry: str, method_registry) -> None:
    from ficoco.qwen_dims import QwenVLDims

    dims_of = {name: model_dims(name, models[name], model_registry) for name in config["models"]}
    labels: list[str] = []
    for model, dims in dims_of.items():
        for index, raw in enumerate(config["budgets"]):
            if isinstance(raw, dict) and "tflops" in raw:       # solved per method below
                if dims.image_grid_pinpoints or isinstance(dims, QwenVLDims):
                    example = ("or {image_tokens: n}, n tokens for every image" if isinstance(dims, QwenVLDims)
                               else "on LLaVA-NeXT-7B 160 is the paper's 2.9 TFLOPs")
                    raise ConfigError(f"{_show(raw)}: a TFLOPs target is solved for one image shape, and model {model} "
                                      f"costs differently per image size; valid: a token budget of its nominal "
                                      f"{dims.visual_tokens}-token image ({example})", ["budgets", index])
                labels.append(budget_label(raw, dims.visual_tokens, model))
                continue
            if isinstance(raw, dict) and "image_tokens" in raw:
                if not isinstance(dims, QwenVLDims):
                    raise ConfigError(f"{_show(raw)}: a token count for every image runs on Qwen2-VL-family models, "
                                      f"and model {model} is not one; valid: an integer budget (of its nominal "
                                      f"{dims.visual_tokens}-token image)", ["budgets", index])
                if raw["image_tokens"] > dims.visual_tokens:
                    raise ConfigError(f"{_show(raw)} is above the {dims.visual_tokens} visual tokens of the largest "
                                      f"image of model {model}; valid: 1..{dims.visual_tokens}", ["budgets", index])
                labels.append(budget_label(raw, dims.visual_tokens, model))
                continue
            try:
                budget = resolve_budget(raw, dims.visual_tokens, model)
            except ValueError as error:
                if isinstance(raw, dict) and "paper" in raw:
                    raise ConfigError(str(error), ["budgets", index]) from None
                raise ConfigError(f"{_show(raw)} leaves no visual token of the {dims.visual_tokens} of model {model}; "
                                  f"valid: a reduction <= {_max_reduction(dims.visual_tokens)} (at least one token), "
                                  f"or an integer budget >= 1", ["budgets", index]) from None
            if budget > dims.visual_tokens:
                raise ConfigError(f"{budget} is above the {dims.visual_tokens} visual tokens of model {model}; "
                                  f"valid: 1..{dims.visual_tokens}", ["budgets", index])
            labels.append(str(budget))
    _check_per_budget_keys(config, labels)

    for model, dims in dims_of.items():
        for method in config["methods"]:                  # adaptive methods run once, without a budget
            if method_registry.get(method).budgeted:
                continue
            overrides = method_overrides(config, models, model, method, ADAPTIVE)
            try:
                method_registry.get(method).check_budget(dims, None, **overrides)
            except ValueError as error:
                raise ConfigError(f"{method} (adaptive, budget label {ADAPTIVE}) on model {model}: {error}",
                                  ["methods"]) from None
        for index, raw in enumerate(config["budgets"]):
            label = budget_label(raw, dims.visual_tokens, model)
            for method in config["methods"]:
                if method == "vanilla" or not method_registry.get(method).budgeted:
                    continue
                if method_registry.get(method).calibrated:
                    _check_calibrated_budget(config, models, model, dims, method, label, method_registry, index)
                    continue
                if tflops_target(label) is not None:
                    try:
                        solve_budget(config, models, model, method, label)
                    except ValueError as error:
                        raise ConfigError(f"model {model}: {str(error).rstrip('.')}", ["budgets", index]) from None
                    continue
                # a count for every image is checked on the nominal (largest) image, which it reduces most
                budget = image_tokens(label).tokens if image_tokens(label) else int(label)
                overrides = method_overrides(config, models, model, method, label)
                try:
                    method_registry.get(method).check_budget(dims, budget, **overrides)
                except ValueError as error:  # InfeasibleBudget and bad overrides are ValueErrors
                    valid = _reachable(config, models, model, dims, method, budget, error)
                    raise ConfigError(f"{budget} for method {method} on model {model}: {str(error).rstrip('.')}; "
                                      f"valid: {valid}", ["budgets", index]) from None


def _check_calibrated_budget(config: dict, models: dict, model: str, dims, method: str, label: str,
                             method_registry, index: int) -> None:
    """What can be checked of a calibrated method before its fit: a token budget (a TFLOPs target
    would need the fitted schedule to solve), its parameters and what it needs of the model."""
    if tflops_target(label) is not None:
        raise ConfigError(f"{label!r} for method {method} on model {model}: a TFLOPs target is solved from a "
                          f"method's plan, and {method}'s plan is fitted per budget first; valid for {method}: "
                          f"token budgets (integers)", ["budgets", index])
    if image_tokens(label) is not None:
        raise ConfigError(f"{label!r} for method {method} on model {model}: {method}'s schedule is fitted for one "
                          f"token budget of the nominal image, not for a count of every image; valid for {method}: "
                          f"token budgets (integers)", ["budgets", index])
    overrides = method_overrides(config, models, model, method, label)
    try:
        method_registry.get(method).check_budget(dims, None, **overrides)
    except ValueError as error:
        raise ConfigError(f"{label} for method {method} on model {model}: {str(error).rstrip('.')}",
                          ["budgets", index]) from None
    # its LLM layer 0 attends over every visual token before the first deletion: no fit averages below this
    floor = (dims.visual_tokens + dims.llm_layers - 1) / dims.llm_layers
    if label.isdigit() and int(label) < floor:
        raise ConfigError(f"{label} for method {method} on model {model}: its LLM layer 0 sees all "
                          f"{dims.visual_tokens} visual tokens before any deletion and every later layer at least "
                          f"one, so no fitted schedule averages below {floor:.2f}; valid: a budget of at least "
                          f"{math.ceil(floor)}", ["budgets", index])


def solve_budget(config: dict, models: dict, model: str, method: str, label: str):
    """The token budget a TFLOPs label resolves to for `method` on `model` (ficoco.flops.SolvedBudget),
    with the method's overrides for that label and the model's typical text length (its registry
    entry's `text_tokens`; docs/flops.md)."""
    from ficoco.flops import solve_tflops_budget

    return solve_tflops_budget(model_dims(model, models[model]), method, tflops_target(label),
                               models[model].get("text_tokens", NOMINAL_TEXT_TOKENS),
                               **method_overrides(config, models, model, method, label))


def _reachable(config: dict, models: dict, model: str, dims, method: str, budget: int, error: ValueError) -> str:
    """What would be valid instead of an unreachable budget: the smallest budget the method reaches
    with the same settings (feasibility grows with the budget), or settings that satisfy the rule."""
    from ficoco import methods as method_registry
    from ficoco.budget import InfeasibleBudget

    if not isinstance(error, InfeasibleBudget):
        return f"method_params for {method} that satisfy the rule above"

    def feasible(candidate: int) -> bool:
        overrides = method_overrides(config, models, model, method, str(candidate))
        try:
            method_registry.get(method).check_budget(dims, candidate, **overrides)
        except ValueError:
            return False
        return True

    low, high = budget, dims.visual_tokens          # infeasible at low; find the smallest feasible above it
    if not feasible(high):
        return f"method_params for {method} that reach a budget on {model} (none does with these settings)"
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if feasible(middle) else (middle, high)
    return (f"a budget of at least {high} for {method} on {model} with these settings, or method_params that "
            f"reach {budget} (see above)")


def _validate(config: dict, root: Path) -> dict:
    """The checks, cheapest first (torch is imported only once the structure is right)."""
    config = check_schema(config, root / "workflow" / "schemas" / "config.schema.yaml")
    paths = _registry_paths(config, root)
    models, benchmarks = load_registries(config, root)
    model_registry, benchmark_registry = display_path(paths["models"][1]), display_path(paths["benchmarks"][1])
    from ficoco import methods as method_registry

    for index, grid in enumerate(grids(config)):
        try:
            _check_names(grid, "models", models)
            _check_names(grid, "benchmarks", benchmarks)
            _check_names(grid, "methods", method_registry.names())
        except ConfigError as error:
            raise ConfigError(error.text, _grid_key(index) + list(error.key)) from None
    _check_one_grid_per_model(config)
    for name in grid_names(config, "models"):
        _check_model_entry(name, models[name], model_registry)
    for name in grid_names(config, "benchmarks"):
        _check_benchmark_entry(name, benchmarks[name], benchmark_registry)
        _benchmark_object(name, benchmarks[name], benchmark_registry)
    # the shared keys name what any grid runs
    shared = {**config, **{kind: grid_names(config, kind) for kind in ("models", "methods", "benchmarks")}}
    _check_benchmark_options(shared, benchmarks, benchmark_registry)
    _check_shards(shared, benchmarks)
    for index, name in enumerate(config["measure"]["methods"] or []):
        if name not in shared["methods"]:
            raise ConfigError(f"{name!r} is not in methods{_did_you_mean(name, shared['methods'])}; valid: "
                              f"methods of the grid ({', '.join(shared['methods'])}), or null for all",
                              ["measure", "methods", index])
    for index, grid in enumerate(grids(config)):
        try:
            _check_method_params(grid, method_registry)
            _check_needs(grid, models, model_registry, method_registry)
            _check_budgets(grid, models, model_registry, method_registry)
        except ConfigError as error:
            raise ConfigError(error.text, _grid_key(index) + list(error.key)) from None
    _check_calibration(shared, benchmarks, benchmark_registry, method_registry)
    return config


def calibrated_methods(config: dict) -> list[str]:
    """The configured methods whose plans need a fit on the calibration set (`Method.calibrated`)."""
    from ficoco import methods as method_registry

    return [method for method in grid_names(config, "methods") if method_registry.get(method).calibrated]


def data_identity(entry: dict, config: dict) -> tuple:
    """Which rows a benchmark registry entry reads: a toy world's (split, seed), a hub dataset's (id, split); two
    entries that agree draw from the same rows (a subset, another config or language of them)."""
    if entry.get("source") == "toy":
        return ("toy", entry.get("split", "test"), entry.get("seed", config["seed"]))
    return (entry.get("id"), entry.get("split"))


def _check_calibration(config: dict, benchmarks: dict, registry: str, method_registry) -> None:
    """A calibrated method needs a calibration set: a registered benchmark the grid does not evaluate."""
    name = config["calibration"]["benchmark"]
    needing = calibrated_methods(config)
    if name is None:
        if needing:
            raise ConfigError(f"None: methods {needing} fit their parameters on a calibration set first; valid: a "
                              f"registered benchmark the grid does not evaluate (e.g. toy-shapes-train for the toy "
                              f"world)", ["calibration", "benchmark"])
        return
    if name not in benchmarks:
        raise _unknown(["calibration", "benchmark"], name, benchmarks)
    evaluated = grid_names(config, "benchmarks")
    if name in evaluated:
        raise ConfigError(f"{name!r} is also evaluated (benchmarks); valid: a benchmark the grid does not evaluate, "
                          f"so no method is fitted on its own test rows", ["calibration", "benchmark"])
    _check_benchmark_entry(name, benchmarks[name], registry)
    same_rows = [other for other in evaluated if other in benchmarks
                 and data_identity(benchmarks[other], config) == data_identity(benchmarks[name], config)]
    if same_rows:
        raise ConfigError(f"{name!r} draws its rows from the same data as the evaluated {', '.join(same_rows)} "
                          f"({_show(data_identity(benchmarks[name], config))}); a method would be fitted on the rows "
                          f"(or versions of the rows) it is tested on; valid: a benchmark of other data, e.g. another "
                          f"split (toy-shapes-train for the toy world)", ["calibration", "benchmark"])
    _benchmark_object(name, benchmarks[name], registry)
    available, wanted = benchmarks[name].get("rows"), config["calibration"]["rows"]
    if available is not None and wanted > available:      # a built set's size is known before it exists
        raise ConfigError(f"{wanted} rows, but {name} has {available} ({registry}); valid: 1..{available}",
                          ["calibration", "rows"])


def validate(config: dict, root: Path = REPO_ROOT, sources: Sources | None = None) -> dict:
    """Full validation: schema, registries, names, options, shards, budgets against every model and method.

    Returns the config with defaults filled in. Raises ConfigError (one line) on the first problem;
    with `sources` (from `merge_sources`) the message names the file (or `--config`) that set the key.
    """
    try:
        return _validate(config, Path(root))
    except ConfigError as error:
        if sources is None or error.source:
            raise
        source = sources.of(error.key)
        text = error.text
        if source == CONFIG_OPTION and error.key:
            hint = _config_option_hint(str(error.key[0]), config.get(error.key[0]),
                                       _load_schema(Path(root) / "workflow" / "schemas" / "config.schema.yaml"))
            text = f"{text}; {hint}" if hint else text
        raise ConfigError(text, error.key, source) from None


def load_config(files: Sequence[str | Path], overrides: Mapping | None = None, root: Path | None = None) -> dict:
    """Read config files strictly, merge them and the `--config` overrides as Snakemake does, validate.

    `files` are read in order (later ones win); `overrides` is Snakemake's parsed `--config`
    (`workflow.config_settings.config`). Registries and schema are read relative to `root`
    (default: the working directory). Raises ConfigError (one line) on the first problem.
    """
    merged, sources = merge_sources(files, overrides)
    return validate(merged, Path.cwd() if root is None else Path(root), sources)


# ---------------------------------------------------------------------------------------------
# the grid


def budgets_for(config: dict, dims, model: str) -> list[str]:
    """Distinct budget labels of a model, in config order."""
    labels: list[str] = []
    for raw in config["budgets"]:
        label = budget_label(raw, dims.visual_tokens, model)
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
    for grid in grids(config):
        for model in grid["models"]:
            dims = model_dims(model, models[model])
            runs: dict[str, list[tuple[str, str, float | None]]] = {}   # method -> (label, run budget, cost)
            for method in grid["methods"]:
                registered = method_registry.get(method)
                # vanilla runs once unreduced ("full"), an adaptive method once with its own counts ("adaptive")
                labels = [FULL] if method == "vanilla" else [ADAPTIVE] if not registered.budgeted \
                    else budgets_for(grid, dims, model)
                runs[method] = []
                for label in labels:
                    solved = solve_budget(grid, models, model, method, label) if tflops_target(label) else None
                    runs[method].append((label, str(solved.tokens), solved.predicted_tflops) if solved
                                        else (label, label, None))
            for benchmark in grid["benchmarks"]:
                shards = shards_for(grid, benchmark)
                for method in grid["methods"]:
                    phase = method_registry.get(method).phase
                    for label, run_budget, predicted in runs[method]:
                        for shard in range(shards):
                            jobs.append(Job(model, method, phase, label, benchmark, shard, shards, run_budget,
                                            predicted))
    return jobs


def load_and_validate(path: str | Path, root: Path | None = None) -> dict:
    """Validate a config file; registries and schema are read relative to `root` (default: cwd)."""
    return load_config([path], None, root)


def planned_schedule(config: dict, models: dict, job: Job) -> dict:
    """What a job's method plans on its model: visual tokens delivered to the LLM and per LLM layer
    (None for an adaptive method, which chooses a count per image while it runs). A calibrated method's
    plan exists only after its fit (the calibrate rule's artifact): "fitted" is true and the counts
    are None."""
    from ficoco import methods

    dims = model_dims(job.model, models[job.model])
    method = methods.get(job.method)
    if method.calibrated:
        return {"visual_tokens": dims.visual_tokens, "delivered": None, "llm_visual": None, "layer_average": None,
                "fitted": True}
    budget = methods.budget_from_label(job.method, job.run_budget)
    if isinstance(budget, ImageTokens):          # a count for every image: its plan on the nominal (largest) image
        budget = budget.tokens
    plan = method.check_budget(dims, budget, **method_overrides(config, models, job.model, job.method, job.budget))
    return {"visual_tokens": dims.visual_tokens, "delivered": plan.delivered,
            "llm_visual": None if plan.llm_visual is None else list(plan.llm_visual), "layer_average": plan.layer_average,
            "fitted": False}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ficoco grid", description="Validate a config and print its job grid.")
    parser.add_argument("--configfile", "--configfiles", nargs="+", default=[DEFAULT_CONFIG], metavar="FILE",
                        help="config file(s), merged in order as Snakemake does (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per job, with its planned schedule (visual tokens per LLM layer)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.configfile)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    jobs = job_grid(config, Path.cwd())
    if args.json:
        models, _ = load_registries(config, Path.cwd())
        for job in jobs:
            print(json.dumps({**job.to_dict(), "planned": planned_schedule(config, models, job)}))
        return 0
    for job in jobs:
        solved = (f" -> {job.run_budget} tokens, {job.predicted_tflops:.4g} TFLOPs "
                  f"({tflops_target(job.budget).convention}) predicted" if job.predicted_tflops is not None else "")
        print(f"{job.model:16} {job.benchmark:14} {job.method:14} {job.phase:7} b{job.budget:<5} "
              f"shard {job.shard + 1}/{job.shards}{solved}")
    print(f"{len(jobs)} evaluate jobs")
    return 0

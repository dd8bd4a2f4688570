"""Fetch a benchmark at a pinned revision, normalise it, and load the local copy.

`fetch_benchmark(name, out_dir, revision=None, options=None)` runs where there is internet (the
Snakemake local rule on the login node). It calls `datasets.load_dataset(<id>, <config>,
split=<split>, revision=<revision>)` with the registry entry from `config/benchmarks.yaml`, falls
back to the second namespace if the first fails, normalises the rows (docs/contracts.md §5) and
writes `out_dir/data/` (`save_to_disk`) and `out_dir/manifest.json` atomically: everything is
written into a temporary directory next to `out_dir` and renamed into place at the end, so a
killed fetch leaves no `manifest.json` that Snakemake would take as complete.

The same code serves tests and mirrors: `source=<local directory>` replaces the hub id (a
directory laid out like the hub repository: parquet files plus a README.md whose YAML header
declares the configs), and `load_dataset` reads it through the identical call.

`load_local(bench_dir)` is what evaluate jobs use (offline; `safe=True` gives rows that never raise
when read, see rows.py).

Bad rows never stop a fetch: normalising decodes every image in full and checks every field, and a
row that fails is kept, flagged and listed in the manifest's `bad_rows`. Duplicate ids are the one
exception: they are refused (an error naming their count and examples), because every record of a
job is keyed by its id.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Mapping

from ficoco.benchmarks.base import merge_records, shard_rows  # noqa: F401  (re-exported for evaluate)
from ficoco.journal import staged_directory

log = logging.getLogger(__name__)

COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
PACKAGE_REGISTRY = Path(__file__).resolve().parents[2] / "config" / "benchmarks.yaml"
#: At most this many bad rows are listed by id in the manifest (all are counted).
MAX_LISTED_BAD_ROWS = 1000


def is_pinned(revision: str | None) -> bool:
    """True for a full 40-hex commit sha (a branch, tag or short sha is not a pin)."""
    return bool(revision) and bool(COMMIT_SHA.match(str(revision)))


# --------------------------------------------------------------------------------------------
# Registry (config/benchmarks.yaml)

def load_registry(registry: str | Path | Mapping | None = None) -> dict:
    """The benchmark registry: a mapping, a YAML path, or None for `config/benchmarks.yaml` in the
    working directory (falling back to the one in the source tree)."""
    if isinstance(registry, Mapping):
        return dict(registry)
    if registry is None:
        local = Path.cwd() / "config" / "benchmarks.yaml"
        registry = local if local.exists() else PACKAGE_REGISTRY
    path = Path(registry)
    if not path.exists():
        raise FileNotFoundError(f"benchmark registry {path} not found; pass registry=<path to benchmarks.yaml>")
    import yaml

    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def registry_entry(name: str, registry: str | Path | Mapping | None = None) -> dict:
    entries = load_registry(registry)
    if name not in entries:
        raise ValueError(f"benchmark {name!r} is not in the benchmark registry; valid: {', '.join(sorted(entries))}")
    return dict(entries[name])


# --------------------------------------------------------------------------------------------
# Revisions

def resolve_revision(repo_id: str, revision: str | None, api=None) -> str | None:
    """The 40-hex commit that `revision` names on the hub (None if it cannot be resolved).

    A pinned revision is returned as is (`load_dataset` succeeded at it, so it exists).
    `api` is a `huggingface_hub.HfApi`-like object (tests pass a fake one).
    """
    if is_pinned(revision):
        return revision
    try:
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        return api.dataset_info(repo_id, revision=revision).sha
    except Exception as error:  # noqa: BLE001 - recorded as unresolved, never fatal
        warnings.warn(f"could not resolve revision {revision!r} of {repo_id} to a commit: {error}", stacklevel=2)
        return None


def _warn_unpinned(name: str, revision: str | None) -> None:
    if not is_pinned(revision):
        message = (f"benchmark {name}: revision {revision!r} is NOT a pinned commit (a 40-hex sha); the "
                   "data may change under you. The resolved commit is recorded in manifest.json as "
                   "`resolved_revision`; copy it into config/benchmarks.yaml.")
        log.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Loading raw data

def _is_local(source: str) -> bool:
    return Path(source).exists()


def _loader(source: str, revision: str | None, cache_dir: str | None):
    """`load(config, split)` bound to one source and revision: the single `load_dataset` call."""
    import datasets

    local = _is_local(source)

    def load(config: str | None, split: str):
        return datasets.load_dataset(str(Path(source).resolve()) if local else source, config, split=split,
                                     revision=None if local else revision, cache_dir=cache_dir)

    return load


def _load_with_fallback(bench, entry: dict, revision: str | None, source: str | None, cache_dir: str | None):
    """(raw, context, used_source, used_revision, fallback_used)."""
    attempts = []
    if source is not None:
        attempts.append((str(source), revision, False))
    else:
        attempts.append((entry["id"], revision, False))
        if entry.get("fallback_id"):
            attempts.append((entry["fallback_id"], entry.get("fallback_revision", "main"), True))
    errors = []
    for candidate, rev, is_fallback in attempts:
        try:
            raw, context = bench.load_raw(_loader(candidate, rev, cache_dir), entry)
        except Exception as error:  # noqa: BLE001 - try the fallback, then report every error
            errors.append(f"{candidate}@{rev}: {type(error).__name__}: {error}")
            log.warning("benchmark %s: loading %s@%s failed: %s", bench.name, candidate, rev, error)
            continue
        if is_fallback:
            warnings.warn(f"benchmark {bench.name}: primary {entry['id']} failed, using fallback {candidate}@{rev}",
                          UserWarning, stacklevel=3)
        return raw, context, candidate, rev, is_fallback
    raise RuntimeError(f"benchmark {bench.name}: could not load the data from any source:\n  " + "\n  ".join(errors))


# --------------------------------------------------------------------------------------------
# Writing

def data_checksum(data_dir: str | Path) -> str:
    """sha256 over the normalised data files (`*.arrow`, sorted by name: name and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(Path(data_dir).rglob("*.arrow")):
        digest.update(str(path.relative_to(data_dir)).encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


#: At most this many duplicated ids are named in the refusal.
SHOWN_DUPLICATE_IDS = 3


def duplicate_ids(dataset) -> tuple[int, int, list[str]]:
    """`(ids, rows, examples)`: how many ids occur more than once, on how many rows, and the first
    few with their counts (`'7' x3`). Nulls are not counted (a missing id is a bad row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "id" not in dataset.column_names:
        return 0, 0, []
    column = dataset.data.column("id")
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = column.cast(pa.binary())       # counting never decodes: ids that are not UTF-8 count too
    counts = pc.value_counts(column.drop_null())
    values, numbers = counts.field("values").to_pylist(), counts.field("counts").to_pylist()
    repeated = [(value, number) for value, number in zip(values, numbers) if number > 1]
    examples = [f"{(v.decode('utf-8', 'backslashreplace') if isinstance(v, bytes) else v)!r} x{n}"
                for v, n in repeated[:SHOWN_DUPLICATE_IDS]]
    return len(repeated), sum(n for _, n in repeated), examples


def refuse_duplicate_ids(dataset, where: str, fix: str) -> None:
    """ValueError (one line) naming the count and a few examples when ids repeat: a job keys every
    record by id, so a repeat would silently replace a record."""
    ids, rows, examples = duplicate_ids(dataset)
    if ids:
        raise ValueError(f"{where}: {ids} duplicate id(s) on {rows} rows (e.g. {', '.join(examples)}); "
                         f"ids must be unique: {fix}")


def _bad_rows(dataset) -> dict:
    """The manifest's `bad_rows`: count, counts per reason code, and the first rows with their reasons."""
    from ficoco.benchmarks.rows import reason_code, split_reasons

    by_reason: dict[str, int] = {}
    listed = []
    count = 0
    for rid, meta in zip(dataset["id"], dataset["meta"]):
        bad = json.loads(meta).get("bad_row")
        if not bad:
            continue
        count += 1
        for code in dict.fromkeys(reason_code(part) for part in split_reasons(bad)):
            by_reason[code] = by_reason.get(code, 0) + 1
        if len(listed) < MAX_LISTED_BAD_ROWS:
            listed.append({"id": rid, "reason": bad})
    return {"count": count, "by_reason": dict(sorted(by_reason.items())), "rows": listed}


def _refuse_all_unreadable(name: str, bad_rows: dict, n_rows: int) -> None:
    """One unreadable row is bad data; every row unreadable is a bug in the benchmark module: raise."""
    if n_rows and bad_rows["by_reason"].get("unreadable_row") == n_rows:
        first = bad_rows["rows"][0]["reason"] if bad_rows["rows"] else "?"
        raise RuntimeError(f"benchmark {name}: every one of the {n_rows} rows failed to normalise (first: {first}); "
                           "that is a bug in the benchmark module, not bad data")


def _check_size(name: str, entry: dict, n_rows: int, pinned: bool) -> None:
    """Row count against the registry: an error at a pinned revision with rows_exact, else a warning
    (a local mirror given as `source`, and the fallback namespace, stand for the pinned revision's data
    and are held to its count too)."""
    expected = entry.get("rows")
    if expected is None or int(expected) == n_rows:
        return
    message = f"benchmark {name}: {n_rows} rows, the registry expects {expected}"
    if pinned and entry.get("rows_exact", False):
        raise ValueError(message + " at the pinned revision (rows_exact: true); the data changed or the "
                                   "registry is wrong")
    warnings.warn(message, UserWarning, stacklevel=3)


def benchmark_pin(entry: Mapping) -> dict:
    """What a registry entry pins: hub id, config, split and revision."""
    return {"id": entry.get("id"), "config": entry.get("config"), "split": entry.get("split"),
            "revision": entry.get("revision") or "main"}


def fetched_benchmark_pin(manifest: Mapping) -> dict:
    """What a fetched copy holds (its manifest), in `benchmark_pin`'s form; the revision is None when it cannot be
    told (a copy from the fallback namespace fetched before manifests recorded the requested revision)."""
    revision = manifest.get("requested_revision") or (None if manifest.get("fallback_used") else manifest.get("revision"))
    return {"id": manifest.get("id"), "config": manifest.get("config"), "split": manifest.get("split"),
            "revision": revision}


def fetch_benchmark(name: str, out_dir: str | Path, revision: str | None = None, options: Mapping | None = None,
                    *, registry: str | Path | Mapping | None = None, source: str | Path | None = None,
                    cache_dir: str | Path | None = None) -> dict:
    """Download (or read `source`), normalise, and write `out_dir/data` + `out_dir/manifest.json`.

    `revision` overrides the registry's pinned revision; `options` are the benchmark's options
    (only fetch-time ones change the rows, e.g. vqav2 subset_size); `source` replaces the hub id
    with a local directory; `cache_dir` is passed to `load_dataset`. Returns the manifest.
    Toy benchmarks (`source: toy` in the registry) are built, not fetched: ValueError naming the command.
    """
    from ficoco import benchmarks

    entry = registry_entry(name, registry)
    bench = benchmarks.get(entry.get("module", name))
    out_dir = Path(out_dir)
    if entry.get("source", "hub") == "toy":       # its rows, split and seed come from the registry and the config
        raise ValueError(f"benchmark {name} is built locally, not fetched: `snakemake resources/benchmarks/{name}/"
                         f"manifest.json` builds it as the pipeline does, or `ficoco toy build-benchmark --out "
                         f"{out_dir} --rows {entry.get('rows')} --split {entry.get('split', 'test')} --seed SEED` "
                         f"(SEED: the registry's seed, else the config's)")
    options = bench.resolve_options(options)
    revision = revision or entry.get("revision") or "main"
    _warn_unpinned(name, revision)

    import datasets

    with staged_directory(out_dir) as staging:
        raw, context, used, used_revision, fallback = _load_with_fallback(
            bench, entry, revision, None if source is None else str(source),
            None if cache_dir is None else str(cache_dir))
        local = _is_local(used)
        _check_size(name, entry, len(raw), is_pinned(revision))
        raw, selection = bench.select_rows(raw, options)
        fingerprint = hashlib.sha256(f"{name}|{used}|{used_revision}|{json.dumps(options, sort_keys=True, default=str)}"
                                     .encode()).hexdigest()[:16]
        normalised = normalise(bench, raw, context, staging / "normalise.arrow", fingerprint)
        refuse_duplicate_ids(normalised, f"benchmark {name}", "fix the source data or the benchmark's to_row")
        normalised.save_to_disk(str(staging / "data"))
        del normalised
        (staging / "normalise.arrow").unlink(missing_ok=True)
        reloaded = datasets.load_from_disk(str(staging / "data"))
        manifest = {
            "benchmark": name,
            "module": entry.get("module", name),
            "id": entry.get("id"),
            "fallback_id": entry.get("fallback_id"),
            "source": used if not local else f"local:{Path(used).resolve()}",
            "fallback_used": fallback,
            "config": entry.get("config"),
            "split": entry.get("split"),
            "revision": used_revision,
            "requested_revision": revision,             # the primary's pin (`revision` is the fallback's when used)
            "revision_pinned": is_pinned(used_revision),
            "resolved_revision": None if local else resolve_revision(used, used_revision),
            "rows": len(reloaded),
            "checksum": data_checksum(staging / "data"),
            "bad_rows": _bad_rows(reloaded),
            "options": bench.fetch_option_values(options),
            "datasets_version": datasets.__version__,
            "fetched_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **selection,
        }
        if entry.get("images"):
            manifest["images"] = dict(entry["images"])
        _refuse_all_unreadable(name, manifest["bad_rows"], manifest["rows"])
        del reloaded
        with open(staging / "manifest.json", "w") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True, ensure_ascii=False)
            handle.write("\n")
    if manifest["bad_rows"]["count"]:
        log.warning("benchmark %s: %d bad rows kept and flagged: %s", name, manifest["bad_rows"]["count"],
                    manifest["bad_rows"]["by_reason"])
    return manifest


def normalise(bench, raw, context, cache_file: Path, fingerprint: str):
    """The normalised dataset (contracts §5) from the raw rows.

    The raw rows are read as Arrow batches, so image cells arrive as their stored
    `{"bytes", "path"}` structs: nothing is re-encoded (JPEG bytes stay identical). Each image is
    decoded once, in full, only to check it (`Benchmark.normalise_row`).
    """
    from ficoco.benchmarks.base import NORMALISED_COLUMNS, normalised_features
    from ficoco.benchmarks.rows import arrow_row

    def convert(batch, indices):
        out = {column: [] for column in NORMALISED_COLUMNS}
        try:
            raw_rows = batch.to_pylist()
        except Exception:  # noqa: BLE001 - text that is not UTF-8 somewhere in the batch: row by row
            raw_rows = [arrow_row(batch.slice(i, 1)) for i in range(batch.num_rows)]
        for raw_row, index in zip(raw_rows, indices):
            row = bench.normalise_row(raw_row, index, context)
            for column in NORMALISED_COLUMNS:
                out[column].append(row[column])
        return out

    return raw.with_format("arrow").map(
        convert, batched=True, batch_size=64, writer_batch_size=256, with_indices=True,
        remove_columns=raw.column_names, features=normalised_features(), cache_file_name=str(cache_file),
        load_from_cache_file=False, new_fingerprint=fingerprint, desc=f"normalise {bench.name}").with_format(None)


# --------------------------------------------------------------------------------------------
# Reading the local copy

def fetch_hint(name: str) -> str:
    return (f"fetch it with `snakemake resources/benchmarks/{name}/manifest.json` or "
            f"`ficoco fetch-benchmark {name}`")


def load_local(bench_dir: str | Path, *, expected_options: Mapping | None = None, module: str | None = None,
               verify: bool = False, safe: bool = False):
    """`(datasets.Dataset, manifest)` from a fetched benchmark directory (offline).

    With `safe=True` the rows come as a `rows.SafeRows` view instead of the Dataset: reading a row
    never raises and never decodes its image (the evaluate job checks and decodes each row itself,
    so one bad row becomes one failure record).

    Raises FileNotFoundError naming the command that fetches it when the directory is incomplete;
    ValueError when the row count (or, with `verify=True`, the checksum) does not match the
    manifest, when ids repeat (refetch: fetch refuses them), or when `expected_options` (fetch-time
    options; `{}` means the defaults, which are checked too; resolved by the registered `module`, default
    the manifest's) differ from the fetched ones.
    """
    bench_dir = Path(bench_dir)
    name = bench_dir.name
    manifest_path, data_dir = bench_dir / "manifest.json", bench_dir / "data"
    if not manifest_path.exists() or not data_dir.exists():
        raise FileNotFoundError(f"benchmark data not found at {bench_dir} (no manifest.json or data/); "
                                + fetch_hint(name))
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    import datasets

    dataset = datasets.load_from_disk(str(data_dir))
    if len(dataset) != manifest.get("rows"):
        raise ValueError(f"{bench_dir}: {len(dataset)} rows but the manifest says {manifest.get('rows')}; "
                         + fetch_hint(name))
    if verify and data_checksum(data_dir) != manifest.get("checksum"):
        raise ValueError(f"{bench_dir}: data checksum does not match the manifest; " + fetch_hint(name))
    refuse_duplicate_ids(dataset, str(bench_dir), "refetch (fetch refuses duplicate ids); " + fetch_hint(name))
    if expected_options is not None:
        from ficoco import benchmarks

        module = module or manifest.get("module", manifest.get("benchmark", name))
        wanted = benchmarks.get(module).fetch_option_values(expected_options)
        if wanted != manifest.get("options", {}):
            raise ValueError(f"{bench_dir} was fetched with options {manifest.get('options')} but the config "
                             f"asks for {wanted}; refetch: " + fetch_hint(name))
    if safe:
        from ficoco.benchmarks.rows import SafeRows

        return SafeRows(dataset), manifest
    return dataset, manifest


# --------------------------------------------------------------------------------------------
# Command line: `ficoco fetch-benchmark NAME [--out DIR] [--revision REV] [--options JSON] ...`

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ficoco fetch-benchmark",
                                     description="Download a benchmark at its pinned revision and normalise it.")
    parser.add_argument("name", help="a benchmark name from the benchmark registry")
    parser.add_argument("--out", help="output directory (default resources/benchmarks/<name>)")
    parser.add_argument("--revision", help="override the pinned revision")
    parser.add_argument("--options", default="{}", help="benchmark options as JSON, e.g. '{\"subset_size\": 1000}'")
    parser.add_argument("--registry", help="benchmark registry YAML (default config/benchmarks.yaml)")
    parser.add_argument("--source", help="a local directory laid out like the hub repository, instead of the hub")
    parser.add_argument("--cache-dir", help="datasets cache directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = args.out or f"resources/benchmarks/{args.name}"
    try:
        manifest = fetch_benchmark(args.name, out, revision=args.revision, options=json.loads(args.options),
                                   registry=args.registry, source=args.source, cache_dir=args.cache_dir)
    except (ValueError, json.JSONDecodeError) as error:
        print(f"fetch-benchmark: {error}", file=sys.stderr)
        return 2
    print(f"{args.name}: {manifest.get('rows')} rows ({manifest.get('bad_rows', {}).get('count', 0)} bad) -> {out} "
          f"[{manifest.get('source')}@{manifest.get('resolved_revision') or manifest.get('revision')}]")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

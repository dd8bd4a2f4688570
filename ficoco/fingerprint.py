"""The fingerprint of an evaluate job: everything that determines its predictions.

An evaluate job writes its fingerprint at the head of its journal and resumes only an unfinished
journal with the same fingerprint (ficoco.journal.why_not_resume). Anything else is set aside and the
job starts fresh, so a parameter change, a new model or benchmark revision, another prompt template,
dtype, batch size or library version never mixes old predictions into new results.

What is in it: the model (manifest id, revision, resolved revision), the benchmark rows (manifest id,
checksum, row count, subset; the prompt/scoring module and its options), the method, the budget
label, the method's resolved parameters (defaults merged with overrides), the prompt template, dtype,
image preprocessing, batch size (it sets the padding of every batch), the device kind, which rows
(shard, shards, limit), the model's CLIP companion for a method that reads it (CDPruner's text
tower), the ficoco, torch and transformers versions, and a digest of the package's code (`code`: every
module but the report's), so a job killed and rerun after a code change recomputes its rows instead of
mixing the old code's records into the new ones.

The digest is the sha256 of the canonical JSON (sorted keys, no whitespace) of those fields.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


#: Package folders whose code never touches a prediction (a report change keeps unfinished journals).
NOT_PREDICTION_CODE = ("report",)


def source_digest(folder: Path, names) -> str:
    """16 hex digits of sha256 over the files `names` (relative to `folder`, in the order given): each name,
    a NUL, its bytes. The one recipe of every code digest (a toy build's, a benchmark's scoring, a job's)."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()[:16]


def package_code_digest(package: Path = Path(__file__).parent) -> str:
    """`source_digest` of every module of the ficoco package (or a copy of it at `package`) but
    NOT_PREDICTION_CODE's, in path order."""
    names = sorted(path.relative_to(package).as_posix() for path in package.rglob("*.py")
                   if path.relative_to(package).parts[0] not in NOT_PREDICTION_CODE)
    return source_digest(package, names)


def canonical_json(value) -> str:
    """One text per value: sorted keys, no whitespace, tuples as lists."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """Everything that determines the predictions of one evaluate job (shard)."""

    model_id: str | None
    model_revision: str | None
    model_resolved_revision: str | None
    benchmark_id: str | None
    benchmark_checksum: str | None
    benchmark_rows: int | None
    benchmark_subset: Any                  # the manifest's subset (VQAv2 subset_size draw) or None
    benchmark_module: str                  # the registered prompt/scoring module
    benchmark_options: Mapping[str, Any]
    method: str
    budget: str                            # the grid label: "full", "adaptive" or an integer as text
    params: Mapping[str, Any]              # the method's resolved parameters (defaults + overrides)
    template: str
    dtype: str
    image_preprocessing: str
    batch_size: int
    device: str                            # "cpu" or "cuda" (the resolved device kind)
    shard: int
    shards: int
    limit: int | None
    text_tower: Any                        # the model's CLIP companion (manifest "clip") for a method that reads
                                           # it (CDPruner), else None
    ficoco: str
    torch: str
    transformers: str
    code: str                              # package_code_digest(): the code that made the predictions

    def as_dict(self) -> dict:
        # through JSON, so a fingerprint read back from a journal compares equal field by field
        return json.loads(canonical_json(dataclasses.asdict(self)))

    def digest(self) -> str:
        return sha256_text(canonical_json(self.as_dict()))


def differences(old: Mapping, new: Mapping) -> list[str]:
    """The fields whose values differ between two fingerprint dicts (a missing field differs)."""
    return sorted(key for key in set(old) | set(new)
                  if key not in old or key not in new or canonical_json(old[key]) != canonical_json(new[key]))


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest; fetch or build this directory first "
                                f"(its manifest identifies what the job runs on)") from None


def library_versions() -> dict[str, str]:
    from importlib.metadata import version

    import ficoco

    return {"ficoco": ficoco.__version__, "torch": version("torch"), "transformers": version("transformers")}


def job_fingerprint(*, model_dir: str | Path, benchmark_dir: str | Path, benchmark_module: str, options: Mapping,
                    method: str, budget: str, params: Mapping, template: str, dtype: str,
                    image_preprocessing: str, batch_size: int, device: str, shard: int, shards: int,
                    limit: int | None, text_tower: bool = False) -> Fingerprint:
    """The fingerprint of one evaluate job, from the fetched directories' manifests and its arguments
    (`text_tower`: the method reads the model's CLIP companion, whose identity joins it)."""
    model, bench = read_manifest(model_dir), read_manifest(benchmark_dir)
    return Fingerprint(
        model_id=model.get("id"), model_revision=model.get("revision"),
        model_resolved_revision=model.get("resolved_revision"),
        benchmark_id=bench.get("id"), benchmark_checksum=bench.get("checksum"), benchmark_rows=bench.get("rows"),
        benchmark_subset=bench.get("subset"), benchmark_module=benchmark_module, benchmark_options=dict(options),
        method=method, budget=str(budget), params=dict(params), template=template, dtype=dtype,
        image_preprocessing=image_preprocessing, batch_size=int(batch_size), device=device, shard=int(shard),
        shards=int(shards), limit=limit, text_tower=model.get("clip") if text_tower else None, **library_versions(),
        code=package_code_digest(),
    )


def run_id(fingerprint_digest: str, started: str, job: Mapping | None) -> str:
    """The W&B run id of one journal: deterministic in the job keys, the fingerprint and the journal's
    start time, so every resumption of that journal continues the same run, and a fresh journal (a
    parameter change, `-R`) is a new run."""
    return sha256_text(canonical_json({"job": dict(job or {}), "fingerprint": fingerprint_digest,
                                       "started": started}))[:20]

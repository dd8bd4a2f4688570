"""Download models (HF hub snapshots at pinned revisions) and benchmarks into `resources/`.

These run in Snakemake local rules: on a cluster that is the login node, which has internet.
Evaluate jobs read only the local copies, with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1.
"""
from __future__ import annotations

import argparse
import datetime
import re
import shutil
import sys
import warnings
from pathlib import Path

from ficoco.journal import atomic_write_json, staged_directory

COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# what an evaluate job needs; the original (non-HF) weights and other formats are skipped
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# the CLIP companion: openai's checkpoints keep their PyTorch weights as pytorch_model.bin
COMPANION_FILES = [*MODEL_FILES, "pytorch_model.bin"]


def is_pinned(revision: str | None) -> bool:
    return bool(revision) and bool(COMMIT_SHA.match(revision))


def model_pin(entry: dict) -> dict:
    """What a registry entry pins: hub id, revision, and its CLIP companion's id and revision."""
    tower = entry.get("text_tower")
    return {"id": entry.get("id"), "revision": entry.get("revision", "main"),
            "text_tower": {"id": tower.get("id"), "revision": tower.get("revision")} if tower else None}


def fetched_model_pin(manifest: dict) -> dict:
    """What a fetched copy holds (its manifest), in `model_pin`'s form."""
    clip = manifest.get("clip")
    return {"id": manifest.get("id"), "revision": manifest.get("revision"),
            "text_tower": {"id": clip.get("id"), "revision": clip.get("revision")} if clip else None}


def fetch_model(name: str, entry: dict, out_dir: str | Path, endpoint_dir: str | Path | None = None) -> dict:
    """Snapshot a hub model at its pinned revision into `out_dir` and write `out_dir/manifest.json`.

    A `text_tower` entry (the CLIP checkpoint the vision tower came from) is snapshotted into
    `out_dir/clip/` at its own revision and recorded under the manifest's "clip". `endpoint_dir`
    (default: the entry's `source_dir`) replaces the hub with a local directory holding the model at
    that revision (and its companion in clip/; tests, mirrors, a cluster without internet); the
    manifest records it. The manifest is written last, so a directory without one is incomplete and
    is fetched again.
    """
    from ficoco.models.companion import COMPANION_DIR

    out_dir = Path(out_dir)
    if endpoint_dir is None:
        endpoint_dir = entry.get("source_dir")
    repo_id, revision = entry["id"], entry.get("revision", "main")
    text_tower = entry.get("text_tower")
    with staged_directory(out_dir) as staging:   # the manifest is written last, inside the staged copy
        resolved = _snapshot(name, repo_id, revision, staging, endpoint_dir, exclude=(COMPANION_DIR,))
        companion = None
        if text_tower:
            source = None if endpoint_dir is None else Path(endpoint_dir) / COMPANION_DIR
            companion = {"dir": COMPANION_DIR, "id": text_tower["id"], "revision": text_tower["revision"],
                         "resolved_revision": _snapshot(f"{name} text tower", text_tower["id"], text_tower["revision"],
                                                        staging / COMPANION_DIR, source, COMPANION_FILES)}
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        manifest = {
            "name": name, "id": repo_id, "revision": revision, "resolved_revision": resolved,
            "source": entry.get("source", "hub"), "files": files,
            **({"source_dir": str(Path(endpoint_dir).resolve())} if endpoint_dir is not None else {}),
            "fetched_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **({"clip": companion} if companion else {}),
        }
        atomic_write_json(staging / "manifest.json", manifest)
    return manifest


def _snapshot(what: str, repo_id: str, revision: str, destination: Path, endpoint_dir: Path | str | None,
              patterns: list[str] = MODEL_FILES, exclude: tuple[str, ...] = ()) -> str:
    """One hub repository at `revision` into `destination` (or a local copy without the top-level folders
    `exclude`); returns the resolved commit."""
    if not is_pinned(revision):
        warnings.warn(f"model {what}: revision {revision!r} is not a 40-hex commit; the resolved commit is "
                      f"recorded in the manifest, pin it in config/models.yaml", stacklevel=3)
    if endpoint_dir is not None:
        source = Path(endpoint_dir)
        if not (source / "config.json").is_file():
            raise FileNotFoundError(f"model {what}: local source {source} is not a model directory (no config.json)")

        def excluded(folder, names):
            return [name for name in names if Path(folder) == source and name in exclude]

        shutil.copytree(source, destination, dirs_exist_ok=True, ignore=excluded)
        return revision
    from huggingface_hub import HfApi, snapshot_download

    resolved = HfApi().model_info(repo_id, revision=revision).sha or revision
    snapshot_download(repo_id, revision=resolved, local_dir=destination, allow_patterns=patterns)
    shutil.rmtree(destination / ".cache", ignore_errors=True)
    return resolved


def _registry(path: str) -> dict:
    import yaml

    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def main_model(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ficoco fetch-model", description=__doc__)
    parser.add_argument("name", help="a model name from the model registry")
    parser.add_argument("--out", help="output directory (default resources/models/<name>)")
    parser.add_argument("--registry", default="config/models.yaml")
    parser.add_argument("--source-dir", help="copy from this local directory instead of the hub")
    args = parser.parse_args(argv)
    models = _registry(args.registry)
    if args.name not in models:
        print(f"fetch-model: {args.name!r} is not in {args.registry}; valid: {', '.join(sorted(models))}", file=sys.stderr)
        return 2
    entry = models[args.name]
    out = args.out or f"resources/models/{args.name}"
    if entry.get("source") == "toy":
        print(f"fetch-model: {args.name} is built locally: run `ficoco toy build-model --out {out}`", file=sys.stderr)
        return 2
    manifest = fetch_model(args.name, entry, out, endpoint_dir=args.source_dir)
    print(f"{args.name}: {manifest['id']}@{manifest['resolved_revision']} -> {out} ({len(manifest['files'])} files)")
    return 0

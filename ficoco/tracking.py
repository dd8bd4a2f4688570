"""Weights & Biases, kept out of the way.

- The mode is never hard-coded: `WANDB_MODE` decides (online / offline / disabled). When it is unset
  and no API key is configured, runs are written offline, so nothing ever tries the network by
  surprise. `WANDB_MODE=disabled` turns tracking off.
- Project and entity come from `WANDB_PROJECT` / `WANDB_ENTITY` (the Snakefile exports them from
  the config), so changing them never changes a job's parameters and reruns nothing.
- An evaluate job's offline run folders land in its shard directory,
  `results/runs/{model}/{benchmark}/{method}/b{budget}/shard{i}of{n}/wandb/offline-run-*`; upload
  them later with `wandb sync results/runs/*/*/*/*/shard*/wandb/offline-run-*` (the report's
  aggregate run: `results/wandb/aggregate/wandb/offline-run-*`).
- One journal is one W&B run: its id is fixed by the journal header (`ficoco.fingerprint.run_id`),
  and a rerun that resumes the journal after a kill resumes that run (`resume="allow"`). Offline, each
  attempt writes its own `offline-run-<time>-<id>` folder; `wandb sync` uploads them to the one run
  in start-time order, so history continues (every point is logged at step = samples done) and the
  final summary is the last attempt's. A journal that is set aside takes its run folders with it
  (`set-aside/<time>-<reason>/wandb/`), out of the sync path above, so a superseded attempt is
  never uploaded beside the run that replaced it.
- Secrets never enter configs or results: the key is read by wandb itself from the environment
  or ~/.netrc.
"""
from __future__ import annotations

import os
import re
from pathlib import Path


def _has_api_key() -> bool:
    """A key in the environment, or a `wandb login` entry for the configured host in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def effective_mode() -> str:
    """The mode wandb will use: WANDB_MODE if set, else online with a key, else offline."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if _has_api_key() else "offline"


def init_run(job_type: str, name: str, group: str, config: dict, run_dir: str | Path, tags=(),
             run_id: str | None = None):
    """Start a W&B run, or return None when tracking is disabled.

    `run_dir` gets the `wandb/` folder (offline runs: `run_dir/wandb/offline-run-*`). With `run_id`
    the run has that id and a second start with the same id continues it (`resume="allow"`).
    """
    mode = effective_mode()
    if mode == "disabled":
        return None
    if "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = mode      # offline without a key; the environment decides, not `mode=`
    import wandb

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "ficoco"),
        entity=os.environ.get("WANDB_ENTITY") or None,
        job_type=job_type,
        name=name,
        group=group,
        tags=[str(tag) for tag in tags if str(tag)],   # W&B refuses an empty tag
        config=config,
        dir=str(run_dir),
        reinit="finish_previous",
        id=run_id,
        resume="allow" if run_id else None,
    )


def run_folders(run_dir: str | Path, run_id: str) -> list[Path]:
    """The local folders of W&B run `run_id` under `run_dir/wandb/` (offline-run-* and run-*)."""
    wandb_dir = Path(run_dir) / "wandb"
    if not run_id or not wandb_dir.is_dir():
        return []
    # `offline-run-<time>-<id>`; a second start within the same second gets `-<id>-1`, `-<id>-2`, ...
    name = re.compile(rf"(offline-)?run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?")
    return sorted(path for path in wandb_dir.iterdir()
                  if name.fullmatch(path.name) and path.is_dir() and not path.is_symlink())


def move_run_folders(run_dir: str | Path, run_id: str, target: str | Path) -> list[Path]:
    """Move every local folder of run `run_id` into `target/wandb/`; returns their new paths."""
    moved = []
    for folder in run_folders(run_dir, run_id):
        destination = Path(target) / "wandb" / folder.name
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, destination)
        moved.append(destination)
    return moved


def log_summary(run, metrics: dict, prefix: str = "") -> None:
    """Put flat numeric metrics into the run summary (nested dicts are flattened with '/')."""
    if run is None:
        return
    for key, value in _flatten(metrics, prefix).items():
        run.summary[key] = value


def _flatten(metrics: dict, prefix: str) -> dict:
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def finish(run) -> None:
    if run is not None:
        run.finish()

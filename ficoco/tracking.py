"""Weights & Biases, kept out of the way.

- The mode is never hard-coded: `WANDB_MODE` decides (online / offline / disabled). When it is unset
  and no API key is configured, runs are written offline, so nothing ever tries the network by
  surprise. `WANDB_MODE=disabled` turns tracking off.
- Project and entity come from `WANDB_PROJECT` / `WANDB_ENTITY` (the Snakefile exports them from
  the config), so changing them never changes a job's parameters and reruns nothing.
- Offline run folders land under `results/wandb/...`; upload later with
  `wandb sync results/wandb/**/offline-run-*`.
- Secrets never enter configs or results: the key is read by wandb itself from the environment
  or ~/.netrc.
"""
from __future__ import annotations

import os
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


def init_run(job_type: str, name: str, group: str, config: dict, run_dir: str | Path, tags=()):
    """Start a W&B run, or return None when tracking is disabled.

    `run_dir` gets the `wandb/` folder (offline runs: `run_dir/wandb/offline-run-*`).
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
        tags=list(tags),
        config=config,
        dir=str(run_dir),
        reinit="finish_previous",
    )


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

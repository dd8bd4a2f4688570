"""`ficoco doctor`: is this environment fit to produce numbers?

One item per line: Python, torch and its accelerators, transformers against the versions the adapter
was tested on (and the override variable), the adapter self-check (ficoco/models/selfcheck.py), the
W&B mode (never a key), and whether the Hugging Face caches can be written. Exit code 0 when all is
well; 1 when transformers is untested without the override, the self-check fails, or a cache is not
writable.

`log_environment(emit)` writes the same lines through `emit` (print, or a logger's info) and returns
the report: evaluate jobs call it at the start of their log, so every result says what produced it.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ficoco.models.guard import OVERRIDE_VARIABLE, TransformersStatus, transformers_status
from ficoco.models.selfcheck import FAMILIES, SelfCheckResult, selfcheck_once


@dataclass(frozen=True)
class CacheDir:
    name: str                          # HF_HOME, HF_HUB_CACHE or HF_DATASETS_CACHE
    path: str
    writable: bool
    error: str = ""                    # why it is not writable


@dataclass(frozen=True)
class DoctorReport:
    python: str
    torch: str
    accelerators: tuple[str, ...]      # CUDA device names; empty: cpu only
    cpu: str                           # logical CPUs, torch threads, the vector kernels torch dispatches to
    transformers: TransformersStatus
    selfchecks: tuple[SelfCheckResult, ...]   # one per adapter family (selfcheck.FAMILIES); empty: not run
    wandb_mode: str
    wandb_mode_source: str
    caches: tuple[CacheDir, ...]

    def problems(self) -> list[str]:
        """What makes the environment unfit; empty when all is well."""
        found = []
        if not self.transformers.allowed:
            found.append(self.transformers.untested_message())
        for result in self.selfchecks:
            if not result.passed:
                failure = result.first_failure
                found.append(f"the {FAMILIES[result.family]} adapter self-check failed: "
                             f"{failure.line() if failure else 'incomplete'}")
        found += [f"{cache.name} {cache.path} is not writable: {cache.error}" for cache in self.caches
                  if not cache.writable]
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()

    def lines(self) -> list[str]:
        status = self.transformers
        tested = "tested" if status.tested else "NOT TESTED"
        override = f"{OVERRIDE_VARIABLE}={'1' if status.override else 'unset'}"
        lines = [
            f"python: {self.python}",
            f"torch: {self.torch}",
            (f"cuda: available, {len(self.accelerators)} device(s): {', '.join(self.accelerators)}"
             if self.accelerators else "cuda: not available (cpu only)"),
            f"cpu: {self.cpu}",
            f"transformers: {status.installed} ({tested}; tested: {', '.join(status.tested_versions)}; {override})",
        ]
        if not self.selfchecks:
            lines.append("adapter self-check: not run")
        for result in self.selfchecks:
            family = FAMILIES[result.family]
            verdict = "passed" if result.passed else "FAILED"
            lines.append(f"adapter self-check ({family}): {verdict} ({result.method} on a tiny random {family}, "
                         f"{result.seconds:.1f} s)")
            lines += [f"  {check.line()}" for check in result.checks]
        lines.append(f"wandb mode: {self.wandb_mode} ({self.wandb_mode_source})")
        for cache in self.caches:
            state = "writable" if cache.writable else f"NOT WRITABLE ({cache.error})"
            lines.append(f"{cache.name}: {cache.path} ({state})")
        lines.append("status: ok" if self.ok else f"status: {len(self.problems())} problem(s)")
        lines += [f"  problem: {problem}" for problem in self.problems()]
        return lines


def diagnose(*, selfcheck: bool = True, families: Sequence[str] = tuple(FAMILIES)) -> DoctorReport:
    """Inspect the environment now, with the adapter self-checks of `families` (default: every family; keys of
    `selfcheck.FAMILIES`). `selfcheck=False` skips them (about a second)."""
    import torch

    from ficoco.tracking import effective_mode

    accelerators = ()
    if torch.cuda.is_available():
        accelerators = tuple(f"cuda:{index} {torch.cuda.get_device_name(index)}"
                             for index in range(torch.cuda.device_count()))
    status = transformers_status()
    source = "WANDB_MODE" if os.environ.get("WANDB_MODE") else "WANDB_MODE unset: online with an API key, else offline"
    return DoctorReport(
        python=f"{platform.python_version()} ({platform.python_implementation()}, {platform.platform()})",
        torch=f"{torch.__version__} (CUDA build {torch.version.cuda})" if torch.version.cuda else torch.__version__,
        accelerators=accelerators,
        # CPU timings depend on these; recorded with every measured time in docs/pipeline.md
        cpu=(f"{os.cpu_count()} logical, torch threads {torch.get_num_threads()}, "
             f"kernels {torch.backends.cpu.get_cpu_capability()}"),
        transformers=status,
        selfchecks=tuple(selfcheck_once(status.installed, family) for family in families) if selfcheck else (),
        wandb_mode=effective_mode(),
        wandb_mode_source=source,
        caches=tuple(_writable(name, path) for name, path in hf_cache_dirs().items()),
    )


def log_environment(emit: Callable[[str], object] = print, *, selfcheck: bool = True,
                    families: Sequence[str] = tuple(FAMILIES)) -> DoctorReport:
    """Write the doctor's lines through `emit` (e.g. `print` or `logging.getLogger(...).info`); returns the report.
    `families`: whose adapter self-checks run (a job: its model's)."""
    report = diagnose(selfcheck=selfcheck, families=families)
    for line in report.lines():
        emit(line)
    return report


def hf_cache_dirs() -> dict[str, Path]:
    """HF_HOME, the hub cache and the datasets cache, from the environment as it is now.

    The same rules huggingface_hub.constants and datasets.config apply when imported (they read the
    environment once, at import), so this also sees a change made after those imports.
    """
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    home = Path(os.path.expanduser(os.path.expandvars(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface"))))
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or str(home / "hub")
    datasets = os.environ.get("HF_DATASETS_CACHE") or str(home / "datasets")
    return {"HF_HOME": home,
            "HF_HUB_CACHE": Path(os.path.expanduser(os.path.expandvars(hub))),
            "HF_DATASETS_CACHE": Path(os.path.expanduser(os.path.expandvars(datasets)))}


def _writable(name: str, path: Path) -> CacheDir:
    """Create the directory if needed (the libraries would), then create and delete a file in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ficoco-doctor-"):
            pass
    except OSError as error:
        return CacheDir(name, str(path), False, f"{type(error).__name__}: {error.strerror or error}")
    return CacheDir(name, str(path), True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ficoco doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--no-selfcheck", action="store_true", help="skip the adapter self-check")
    args = parser.parse_args(argv)
    try:
        report = log_environment(print, selfcheck=not args.no_selfcheck)
    except RuntimeError as error:                  # e.g. a bad FICOCO_ALLOW_UNTESTED_TRANSFORMERS value
        print(f"ficoco doctor: {error}")
        return 1
    return 0 if report.ok else 1

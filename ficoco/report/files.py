"""Atomic output files: every writer writes a temporary sibling, which is then renamed over the target."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name, created by the writer itself, so the file gets the usual umask permissions.
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp{path.suffix}"
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False)


def write_parquet(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as temporary:
        frame.to_parquet(temporary, index=False)

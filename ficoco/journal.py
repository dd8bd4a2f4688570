"""Crash-safe files: atomic writes and an append-only per-sample journal.

A job killed at any instant (SIGKILL included) leaves either no output file or a complete one, and
a journal whose complete lines are all valid records. A rerun reads the journal, drops a torn last
line, and continues with the samples not yet recorded.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextmanager
def staged_directory(out_dir: str | Path) -> Iterator[Path]:
    """A fresh sibling directory to fill; on success it replaces `out_dir` by renames, so `out_dir`
    is never half-written (an older copy is moved aside first, then removed); on error it is removed."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old = None
    try:
        yield staging
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            old.rmdir()
            out_dir.rename(old)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value):
    if hasattr(value, "item"):       # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps_line(record: dict) -> str:
    return json.dumps(record, sort_keys=True, default=_json_default, ensure_ascii=False)


class Journal:
    """Append-only JSON-lines file of per-sample records keyed by `id`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> dict[str, dict]:
        """All complete records by id. A torn last line (killed mid-write) is cut off the file."""
        if not self.path.exists():
            return {}
        records: dict[str, dict] = {}
        valid_bytes = 0
        with open(self.path, "rb") as stream:
            for line in stream:
                if not line.endswith(b"\n"):
                    break                       # torn write: the process died inside this line
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break
                records.setdefault(str(record["id"]), record)  # first write wins; never counted twice
                valid_bytes += len(line)
        if valid_bytes != self.path.stat().st_size:
            with open(self.path, "r+b") as stream:
                stream.truncate(valid_bytes)
        return records

    def append(self, records: Iterable[dict]) -> None:
        """Append records and make them durable before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(dumps_line(record) + "\n" for record in records)
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(dumps_line(record) + "\n" for record in records))

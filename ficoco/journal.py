"""Crash-safe files: atomic writes and an append-only per-sample journal.

A job killed at any instant (SIGKILL included) leaves either no output file or a complete one, and
a journal whose complete lines are all valid records. A rerun reads the journal, drops a torn last
line, and continues with the samples not yet recorded.

Journal lines (JSON, one per line):
- the header, first: `{"journal": "header", "format": 1, "fingerprint": {...}, "fingerprint_sha256",
  "started", "run_id"}` (ficoco.fingerprint: everything that determines the predictions);
- one record per sample (contracts §6; records have no "journal" key);
- the finished marker, last, once the shard's predictions.jsonl is written: `{"journal": "finished", ...}`.
A job resumes only an unfinished journal with its own fingerprint (`why_not_resume`); any other is
moved aside (`Journal.set_aside`), never deleted and never reused.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ficoco.fingerprint import differences

JOURNAL_FORMAT = 1


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name opened exclusively (not mkstemp, whose files are 0600): the usual umask permissions
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove what a killed atomic write of `path` left behind (`.{name}.*.tmp*` siblings); returns them.

    Call it where a job starts, for each file it writes: only that job writes those names, so
    whatever matches is debris of an earlier, killed attempt.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for candidate in sorted(path.parent.glob(f".{path.name}.*.tmp*")):
        if candidate.is_file() and not candidate.is_symlink():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


@contextmanager
def staged_directory(out_dir: str | Path) -> Iterator[Path]:
    """A fresh sibling directory to fill; on success it replaces `out_dir` by renames, so `out_dir`
    is never half-written (an older copy is moved aside first, then removed); on error it is removed.
    Staging directories a killed earlier attempt left (`.<name>.tmp-*`, `.<name>.old-*`: a model's can
    hold gigabytes) are removed first; one writer per `out_dir` is assumed (Snakemake runs one job per output)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for leftover in [*out_dir.parent.glob(f".{out_dir.name}.tmp-*"), *out_dir.parent.glob(f".{out_dir.name}.old-*")]:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
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


@dataclass(frozen=True)
class JournalContents:
    """What a journal holds: its header (None: no valid header), records by id, the finished marker."""

    header: dict | None = None
    records: dict[str, dict] = field(default_factory=dict)
    finished: dict | None = None
    empty: bool = True                      # no valid line at all (missing, empty, or only a torn line)


class Journal:
    """Append-only JSON-lines file: a header, per-sample records keyed by `id`, a finished marker."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> JournalContents:
        """Everything valid in the file. A torn last line (killed mid-write) is cut off the file."""
        if not self.path.exists():
            return JournalContents()
        header, finished, records = None, None, {}
        valid_bytes = 0
        lines = 0
        with open(self.path, "rb") as stream:
            for line in stream:
                if not line.endswith(b"\n"):
                    break                       # torn write: the process died inside this line
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    break
                if not isinstance(entry, dict) or ("journal" not in entry and "id" not in entry):
                    break                       # JSON, but neither a control line nor a record: corrupt as well
                kind = entry.get("journal")
                if kind == "header" and lines == 0:
                    header = entry
                elif kind == "finished":
                    finished = entry
                elif kind is None:
                    records.setdefault(str(entry["id"]), entry)  # first write wins; never counted twice
                # any other control line (a header after the first line) is kept in the file and ignored
                valid_bytes += len(line)
                lines += 1
        if valid_bytes != self.path.stat().st_size:
            with open(self.path, "r+b") as stream:
                stream.truncate(valid_bytes)
        return JournalContents(header=header, records=records, finished=finished, empty=lines == 0)

    def read(self) -> dict[str, dict]:
        """All complete records by id (see `load`)."""
        return self.load().records

    def start(self, header: dict) -> None:
        """Begin a fresh journal with `header` as its first line (replacing an empty or torn file)."""
        atomic_write_text(self.path, dumps_line({**header, "journal": "header", "format": JOURNAL_FORMAT}) + "\n")

    def append(self, records: Iterable[dict]) -> None:
        """Append records and make them durable before returning."""
        self._append_lines(dumps_line(record) + "\n" for record in records)

    def finish(self, **details) -> None:
        """Mark the journal finished (its shard's predictions are written): it will never be resumed."""
        self._append_lines([dumps_line({**details, "journal": "finished", "at": utc_now()}) + "\n"])

    def _append_lines(self, lines: Iterable[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(lines)
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())

    def set_aside(self, reason: str, folder: str | Path | None = None) -> Path:
        """Move the journal into a fresh `{folder}/{UTC time}-{reason}/` (default folder: `set-aside/`
        next to it) and return that directory; the journal is kept there, never deleted."""
        root = Path(folder) if folder is not None else self.path.parent / "set-aside"
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = root / f"{stamp}-{reason}"
        suffix = 1
        while target.exists():
            suffix += 1
            target = root / f"{stamp}-{reason}-{suffix}"
        target.mkdir(parents=True)
        os.replace(self.path, target / self.path.name)
        return target


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class SetAside:
    """Why a journal may not be resumed: `slug` names its set-aside folder, `reason` is one log line."""

    slug: str
    reason: str


def why_not_resume(contents: JournalContents, fingerprint: dict, digest: str) -> SetAside | None:
    """None when a job with this fingerprint may resume `contents`; else why not.

    Only an unfinished journal whose header carries the same fingerprint digest is resumed. A finished
    journal never is (a rerun of a finished job, e.g. Snakemake's "Params have changed", `-R` or
    `--forcerun`, recomputes); neither is one without a header (written before fingerprints) or with
    another fingerprint (the reason names the fields that differ).
    """
    if contents.empty:
        return None
    reasons, slug = [], None
    if contents.finished is not None:
        reasons.append("it is finished (a finished journal is never resumed; its job is being rerun)")
        slug = "finished"
    header = contents.header
    if header is None:
        reasons.append("it has no fingerprint header")
        slug = slug or "unfingerprinted"
    elif header.get("fingerprint_sha256") != digest:
        changed = differences(header.get("fingerprint") or {}, fingerprint)
        reasons.append(f"its fingerprint differs in {', '.join(changed) or 'its digest'}")
        slug = slug or "fingerprint-changed"
    if not reasons:
        return None
    return SetAside(slug=slug, reason="; ".join(reasons))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(dumps_line(record) + "\n" for record in records))

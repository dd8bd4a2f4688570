"""Crash-safety of the journal and of atomic writes."""
import json
import os

import pytest

from ficoco.fingerprint import canonical_json, differences
from ficoco.journal import (Journal, JournalContents, atomic_write_json, atomic_write_text, remove_stale_temporaries,
                            staged_directory, why_not_resume)


def test_torn_last_line_is_dropped_and_cut(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append([{"id": "a", "score": 1.0}, {"id": "b", "score": 0.0}])
    with open(journal.path, "a") as stream:          # a process killed inside a write
        stream.write('{"id": "c", "sco')
    records = journal.read()
    assert sorted(records) == ["a", "b"]
    # the torn bytes are gone, so the next append starts on a clean line
    journal.append([{"id": "c", "score": 1.0}])
    assert sorted(Journal(journal.path).read()) == ["a", "b", "c"]
    assert all(json.loads(line) for line in journal.path.read_text().splitlines())


@pytest.mark.parametrize("line", ["[1, 2]", "7", '"text"', '{"score": 1.0}'])
def test_a_json_line_that_is_no_record_is_cut_like_a_torn_one(tmp_path, line):
    """Valid JSON that is neither a record (no id) nor a control line: corrupt, cut with what follows (those rows
    are recomputed), never a crash of the job that resumes it."""
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append([{"id": "a", "score": 1.0}])
    with open(journal.path, "a") as stream:
        stream.write(line + "\n" + '{"id": "b", "score": 0.0}\n')
    assert sorted(journal.read()) == ["a"]
    assert journal.path.read_text() == '{"id": "a", "score": 1.0}\n'


def test_a_sample_is_never_counted_twice(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append([{"id": "a", "score": 1.0}])
    journal.append([{"id": "a", "score": 0.0}])      # e.g. a batch re-run after a kill
    assert journal.read() == {"a": {"id": "a", "score": 1.0}}


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"score": 1})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        atomic_write_json(path, {"score": Unserialisable()})
    assert json.loads(path.read_text()) == {"score": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]   # no temporary left behind


def test_atomic_write_creates_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "c.txt"
    atomic_write_text(path, "done")
    assert path.read_text() == "done"


def test_staged_directory_replaces_the_old_copy_only_when_complete(tmp_path):
    out = tmp_path / "models" / "toy"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_directory(out) as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]                 # the old copy is untouched
    with staged_directory(out) as staging:
        (staging / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()                                    # nothing visible before the end
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["toy"]              # no staging or old copy left


def test_staged_directory_removes_what_a_killed_attempt_left(tmp_path):
    """A SIGKILL runs no cleanup: its staging copy (a model's can hold gigabytes) stays beside the output.
    The next attempt removes those of its own output, and nothing of another output's."""
    import subprocess
    import sys

    out = tmp_path / "models" / "m"
    script = ("import os, signal, sys; from ficoco.journal import staged_directory\n"
              "with staged_directory(sys.argv[1]) as staging:\n"
              "    (staging / 'weights.bin').write_bytes(b'x' * 1000)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    for _ in range(2):
        subprocess.run([sys.executable, "-c", script, str(out)], check=False)
    other = tmp_path / "models" / ".mm.tmp-keep"
    other.mkdir()
    assert len(list(out.parent.glob(".m.tmp-*"))) == 1          # the second attempt removed the first's
    with staged_directory(out) as staging:
        (staging / "weights.bin").write_bytes(b"y")
    assert sorted(p.name for p in out.parent.iterdir()) == [".mm.tmp-keep", "m"]


# ---------------------------------------------------------------------------------------------
# header, finished marker, set-aside, debris

HEADER = {"fingerprint": {"method": "ficoco-v", "params": {"start": 2}}, "fingerprint_sha256": "a" * 64,
          "started": "2026-01-01T00:00:00.000000+00:00", "run_id": "r" * 20}


def test_header_records_and_finished_marker_are_told_apart(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.start(HEADER)
    journal.append([{"id": "a", "score": 1.0}, {"id": "b", "score": 0.0}])
    contents = journal.load()
    assert contents.header["run_id"] == HEADER["run_id"] and contents.header["format"] == 1
    assert sorted(contents.records) == ["a", "b"] and contents.finished is None and not contents.empty
    journal.finish(records=2)
    contents = Journal(journal.path).load()
    assert contents.finished["records"] == 2 and sorted(contents.records) == ["a", "b"]
    assert journal.read() == contents.records


def test_torn_line_after_the_header_is_cut(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.start(HEADER)
    journal.append([{"id": "a"}])
    with open(journal.path, "a") as stream:
        stream.write('{"id": "b", "pred')
    contents = journal.load()
    assert contents.header is not None and sorted(contents.records) == ["a"]
    assert journal.path.read_text().endswith('"id": "a"}\n')


def test_only_an_unfinished_journal_with_the_same_fingerprint_resumes(tmp_path):
    digest, fingerprint = HEADER["fingerprint_sha256"], HEADER["fingerprint"]
    unfinished = JournalContents(header=HEADER, records={"a": {}}, empty=False)
    assert why_not_resume(JournalContents(), fingerprint, digest) is None                  # nothing to resume
    assert why_not_resume(unfinished, fingerprint, digest) is None
    finished = JournalContents(header=HEADER, records={"a": {}}, finished={"journal": "finished"}, empty=False)
    assert why_not_resume(finished, fingerprint, digest).slug == "finished"
    other = why_not_resume(unfinished, {**fingerprint, "params": {"start": 4}}, "b" * 64)
    assert other.slug == "fingerprint-changed" and other.reason == "its fingerprint differs in params"
    legacy = why_not_resume(JournalContents(records={"a": {}}, empty=False), fingerprint, digest)
    assert legacy.slug == "unfingerprinted"


def test_set_aside_keeps_every_journal(tmp_path):
    kept = []
    for _ in range(2):                                  # twice within one second: two folders
        journal = Journal(tmp_path / "journal.jsonl")
        journal.append([{"id": "a"}])
        kept.append(journal.set_aside("finished"))
    assert len(set(kept)) == 2 and all((folder / "journal.jsonl").exists() for folder in kept)
    assert all(folder.parent == tmp_path / "set-aside" for folder in kept)
    assert not (tmp_path / "journal.jsonl").exists()


def test_debris_of_a_killed_atomic_write_is_removed_and_nothing_else(tmp_path):
    out = tmp_path / "predictions.jsonl"
    debris = [tmp_path / ".predictions.jsonl.k3j2h1.tmp", tmp_path / ".predictions.jsonl.0a1b.tmp.jsonl"]
    keep = [tmp_path / ".metrics.json.x.tmp", tmp_path / "predictions.jsonl", tmp_path / "journal.jsonl"]
    for path in debris + keep:
        path.write_text("x")
    assert remove_stale_temporaries(out) == sorted(debris)
    assert sorted(tmp_path.iterdir()) == sorted(keep)
    assert remove_stale_temporaries(tmp_path / "missing" / "x.json") == []


def test_fingerprint_differences_and_canonical_json():
    assert canonical_json({"b": (1, 2), "a": None}) == '{"a":null,"b":[1,2]}'
    assert differences({"a": 1, "b": [1], "c": 0}, {"a": 1, "b": (1,), "d": 0}) == ["c", "d"]


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "predictions.jsonl"
    atomic_write_text(path, "x\n")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

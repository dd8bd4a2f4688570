"""Crash-safety of the journal and of atomic writes."""
import json

import pytest

from ficoco.journal import Journal, atomic_write_json, atomic_write_text, staged_directory


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

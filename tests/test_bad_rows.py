"""Bad rows never stop a job ("Numbers you can trust", item 3).

Each kind of bad row below is put between two good rows of a tiny benchmark directory (the toy
benchmark's rows, written like a fetched benchmark), and the real evaluate path runs on the toy
model, in-process. For every kind: no exception; exactly one failure record, whose reason names
the problem and the bad value; the good rows get exactly the records they get without it;
`summarise(...)["failures"]` counts it; `score` merges the predictions. Fetch flags each kind it
can see in the manifest, and duplicate ids are refused at fetch and at evaluate.

The evaluate kinds are stored rows, read as `evaluate_shard` reads them (`load_local(...,
safe=True)`) and run through `Generator.records_for` one kind at a time (one model for all), then
all at once through `evaluate_shard` itself (batched, sharded, resumed). Kinds an Arrow column
cannot hold (a lone surrogate, a question that is a number, ...) go to `Generator.records_for` as
row dicts.
"""
from __future__ import annotations

import copy
import datetime
import io
import json
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Features, Image, List, Value, load_from_disk
from datasets.table import InMemoryTable
from PIL import Image as PILImage

from ficoco import benchmarks
from ficoco.benchmarks.base import normalised_features
from ficoco.benchmarks.fetch import fetch_benchmark, load_local
from ficoco.evaluate import evaluate_shard, score, summarise
from ficoco.invariants import InvariantViolation
from ficoco.journal import read_jsonl, write_jsonl_atomic

S = Value("string")
JOB = {"model": "toy-llava", "method": "vanilla", "phase": "none", "budget": "full", "benchmark": "toy-shapes"}


def encoded(image_format: str, color=(200, 30, 30), size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", size, color).save(buffer, format=image_format)
    return buffer.getvalue()


PNG, JPEG = encoded("PNG"), encoded("JPEG")
NOT_AN_IMAGE = b"<html>404 not found</html>"

# kind -> (changes to a good row, the reason code, text the reason must contain: the bad value).
# A change `("invalid", column, value)` writes bytes that are not UTF-8 into a string column.
EVALUATE_KINDS = {
    "truncated_png": ({"image": {"bytes": PNG[:len(PNG) // 2], "path": None}}, "undecodable_image", "truncated"),
    "truncated_jpeg": ({"image": {"bytes": JPEG[:-40], "path": None}}, "undecodable_image", "Truncated File Read"),
    "non_image_bytes": ({"image": {"bytes": NOT_AN_IMAGE, "path": None}}, "undecodable_image", "<html>404"),
    "image_file_not_an_image": ({"image": {"bytes": None, "path": __file__}}, "undecodable_image",
                                "UnidentifiedImageError"),
    "empty_image_bytes": ({"image": {"bytes": b"", "path": None}}, "missing_image", "missing_image"),
    "null_image": ({"image": None}, "missing_image", "missing_image"),
    "null_answers": ({"answers": None}, "missing_answers", "missing_answers"),
    "empty_answers": ({"answers": []}, "empty_answers", "empty_answers"),
    "blank_answers": ({"answers": ["", "  "]}, "empty_answers", "empty_answers"),
    "null_in_answers": ({"answers": ["red", None]}, "null_answer", "['red', None]"),
    "empty_question": ({"question": ""}, "empty_question", "''"),
    "whitespace_question": ({"question": " \n\t"}, "empty_question", r"' \n\t'"),
    "null_question": ({"question": None}, "missing_question", "missing_question"),
    "non_json_meta": ({"meta": "{kind: color"}, "bad_meta", "{kind: color"),
    "meta_not_an_object": ({"meta": "[1, 2]"}, "bad_meta", "[1, 2]"),
    "null_in_choices": ({"choices": ["a", None]}, "bad_choices", "['a', None]"),
    "null_id": ({"id": None}, "missing_id", "missing_id"),
    "flagged_at_fetch": ({"meta": json.dumps({"bad_row": "answer_not_yes_no"})}, "answer_not_yes_no",
                         "answer_not_yes_no"),
    "question_not_utf8": ({"invalid": ("question", b"what \xff colour?")}, "undecodable_text",
                          r"question b'what \xff colour?'"),
    "answer_not_utf8": ({"invalid": ("answers", [b"r\xe9d"])}, "undecodable_text", r"answers [b'r\xe9d']"),
    "meta_not_utf8": ({"invalid": ("meta", b'{"kind": "c\xc3("}')}, "undecodable_text", "meta"),
    "id_not_utf8": ({"invalid": ("id", b"toy-\xfe-1")}, "undecodable_text", r"id b'toy-\xfe-1'"),
}

# kinds that only a row dict can carry (an Arrow column holds one type and valid UTF-8 only)
ROW_KINDS = {
    "surrogate_in_question": ({"question": "what \ud800 colour?"}, "undecodable_text", r"\ud800"),
    "surrogate_in_answer": ({"answers": ["r\udce9d"]}, "undecodable_text", r"\udce9"),
    "question_is_a_number": ({"question": 42}, "bad_question", "int 42"),
    "answers_is_a_string": ({"answers": "red"}, "bad_answers", "str 'red'"),
    "answer_is_a_dict": ({"answers": [{"answer": "red"}]}, "bad_answers", "dict"),
    "image_is_a_number": ({"image": 7}, "bad_image", "int 7"),
    "image_file_missing": ({"image": {"bytes": None, "path": "/nonexistent/picture.png"}}, "undecodable_image",
                           "FileNotFoundError"),
    "meta_is_a_number": ({"meta": 3.5}, "bad_meta", "float 3.5"),
    "meta_not_serialisable": ({"meta": {"when": datetime.date(2024, 1, 2)}}, "bad_meta", "date"),
    "lazy_truncated_image": ({"image": "lazy-truncated"}, "undecodable_image", "truncated"),
    "no_fields_at_all": ({"question": "drop", "answers": "drop", "image": "drop", "meta": "drop"},
                         "missing_question", "missing_answers"),
}


# ---------------------------------------------------------------------------------------------
# the world: the toy model (random weights) and two good toy rows, built once

@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread: on a busy 2-core machine two spinning threads are many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    from ficoco.toy.cli import build_benchmark, build_model

    root = tmp_path_factory.mktemp("bad-rows")
    build_model(root / "model", train=False, size="small", progress=False)
    build_benchmark(root / "good", seed=3, rows=2)
    stored = load_from_disk(str(root / "good" / "data")).cast_column("image", Image(decode=False))
    good = [dict(row) for row in stored]
    baseline = run(root, "baseline", good)
    return {"root": root, "good": good, "baseline": baseline}


@pytest.fixture(scope="module")
def generator(world):
    import ficoco
    from ficoco.dims import ModelDims
    from ficoco.evaluate import Generator, load_model
    from ficoco.methods import budget_from_label

    model, processor = load_model(world["root"] / "model", "cpu", "float32")
    handle = ficoco.apply(model, "vanilla", budget_from_label("vanilla", "full"))
    yield Generator(model, processor, handle, benchmarks.get("toy-shapes"), {}, "USER: <image>\n{prompt} ASSISTANT:",
                    "none", ModelDims.from_config(model.config))
    handle.remove()


def write_benchmark(directory: Path, rows: list[dict], invalid: list[tuple] = ()) -> Path:
    """A benchmark directory like a fetched one; each `(row, column, bytes)` in `invalid` puts bytes
    that are not UTF-8 into a string (or list-of-string) cell, as a corrupt or hand-made file could."""
    columns = {name: [row.get(name) for row in rows] for name in normalised_features()}
    dataset = Dataset.from_dict(columns, features=normalised_features())
    table = dataset.data.table
    for index, column, value in invalid:
        text_type = table.schema.field(column).type
        bytes_type = pa.list_(pa.binary()) if pa.types.is_list(text_type) else pa.binary()
        cells = table.column(column).cast(bytes_type).to_pylist()
        cells[index] = value
        array = pa.array(cells, bytes_type).view(text_type)      # no UTF-8 check: written as is
        table = table.set_column(table.schema.get_field_index(column), column, array)
    if invalid:
        dataset = Dataset(InMemoryTable(table), info=dataset.info)
    dataset.save_to_disk(str(directory / "data"))
    (directory / "manifest.json").write_text(json.dumps({"benchmark": "toy", "rows": len(rows)}))
    return directory


def run(root: Path, name: str, rows: list[dict]) -> list[dict]:
    """`evaluate_shard` over `rows` (one batch of 3) -> its predictions."""
    bench_dir = write_benchmark(root / name / "bench", rows)
    out = evaluate_shard(model_dir=root / "model", benchmark_dir=bench_dir, benchmark="toy-shapes",
                         method="vanilla", budget="full", out=root / name / "run" / "predictions.jsonl",
                         batch_size=3, device="cpu", progress=False)
    return read_jsonl(out)


def bad_row(good: dict, changes: dict) -> tuple[dict, tuple | None]:
    row = {**copy.deepcopy(good), "id": "the-bad-row"}
    invalid = None
    for key, value in changes.items():
        if key == "invalid":
            invalid = value
        else:
            row[key] = value
    return row, invalid


def comparable(record: dict) -> dict:
    """A record without wall-clock time and its row index."""
    return {k: v for k, v in record.items() if k not in ("latency_s", "row")}


# ---------------------------------------------------------------------------------------------
# evaluate: stored rows

def test_there_are_at_least_twelve_kinds():
    assert len(EVALUATE_KINDS) + len(ROW_KINDS) >= 12
    assert len(EVALUATE_KINDS) >= 12


@pytest.mark.parametrize("kind", sorted(EVALUATE_KINDS))
def test_a_bad_row_becomes_one_counted_failure(world, generator, kind, tmp_path):
    """The evaluate job's loop on one batch: rows read from the stored benchmark the way
    `evaluate_shard` reads them (`load_local(..., safe=True)`), then `Generator.records_for`."""
    changes, code, named = EVALUATE_KINDS[kind]
    first, last = world["good"]
    bad, invalid = bad_row(first, changes)
    bench_dir = write_benchmark(tmp_path / "bench", [first, bad, last], [] if invalid is None else [(1, *invalid)])
    rows, _ = load_local(bench_dir, safe=True)
    records = generator.records_for([dict(rows[index], _row=index) for index in range(len(rows))])

    assert [r["row"] for r in records] == [0, 1, 2]
    assert [r["id"] for r in records] == [str(rows[index]["id"]) for index in range(3)]   # the journal keys
    failure = records[1]
    assert failure["error"].startswith("bad row: ") and failure["score"] is None
    assert code in failure["error"] and named in failure["error"], failure["error"]
    assert failure["scoring"] == {"score": None}
    # the good rows are scored exactly as without the bad row between them
    assert [comparable(r) for r in (records[0], records[2])] == [comparable(r) for r in world["baseline"]]
    assert all(r["error"] is None and r["score"] is not None for r in (records[0], records[2]))
    summary = summarise(benchmarks.get("toy-shapes"), records)
    assert summary["failures"] == 1 and summary["samples"] == 3
    assert summary["metrics"]["failures"] == 1
    # the merge step accepts it: no "shards overlap", the bad row counted once
    write_jsonl_atomic(tmp_path / "predictions.jsonl", records)
    metrics = score([tmp_path / "predictions.jsonl"], "toy-shapes", tmp_path / "metrics.json", JOB,
                    benchmark_manifest=bench_dir / "manifest.json")
    assert metrics["failures"] == 1 and metrics["samples"] == 3


def test_every_kind_at_once_in_batches_and_shards_then_resumed(world):
    """All evaluate kinds in one benchmark, 4 rows a batch over two shards, each shard run twice (the
    rerun sets the finished journal aside and recomputes): every sample is journaled once, and the
    shards merge with one failure per bad row."""
    first, last = world["good"]
    rows, invalid = [first], []
    for kind, (changes, _, _) in sorted(EVALUATE_KINDS.items()):
        row, this_invalid = bad_row(first, changes)
        if row["id"] is not None:                       # the null_id kind keeps its null
            row["id"] = f"bad-{kind}"
        if this_invalid is not None:
            invalid.append((len(rows), *this_invalid))
        rows.append(row)
    rows.append(last)
    bench_dir = write_benchmark(world["root"] / "all" / "bench", rows, invalid)
    outs = []
    for shard in range(2):
        out = world["root"] / "all" / f"shard{shard}of2" / "predictions.jsonl"
        for _ in range(2):
            evaluate_shard(model_dir=world["root"] / "model", benchmark_dir=bench_dir, benchmark="toy-shapes",
                           method="vanilla", budget="full", out=out, shard=shard, shards=2, batch_size=4,
                           device="cpu", progress=False)
        outs.append(out)
        journaled = [json.loads(line) for line in (out.parent / "journal.jsonl").read_text().splitlines()]
        assert len([r for r in journaled if "id" in r]) == len(read_jsonl(out))     # each sample once
    metrics = score(outs, "toy-shapes", world["root"] / "all" / "metrics.json", JOB,
                    benchmark_manifest=bench_dir / "manifest.json")
    assert metrics["samples"] == len(rows) == len(EVALUATE_KINDS) + 2
    assert metrics["failures"] == len(EVALUATE_KINDS)
    records = [r for out in outs for r in read_jsonl(out)]
    assert [(r["prediction"], r["score"]) for r in (records[0], records[-1])] == [
        (r["prediction"], r["score"]) for r in world["baseline"]]


# ---------------------------------------------------------------------------------------------
# evaluate: row dicts through Generator.records_for

@pytest.mark.parametrize("kind", sorted(ROW_KINDS))
def test_a_bad_row_dict_becomes_one_failure_record(world, generator, kind):
    changes, code, named = ROW_KINDS[kind]
    first, last = world["good"]
    bad = {**copy.deepcopy(first), "id": "the-bad-row"}
    for key, value in changes.items():
        if value == "drop":
            bad.pop(key)
        elif value == "lazy-truncated":                 # opened but not decoded, as PIL.Image.open leaves it
            bad[key] = PILImage.open(io.BytesIO(PNG[:len(PNG) // 2]))
        else:
            bad[key] = value
    rows = [dict(first, _row=0), dict(bad, _row=1), dict(last, _row=2)]
    records = generator.records_for(rows)

    assert [r["row"] for r in records] == [0, 1, 2]
    assert records[1]["error"].startswith("bad row: ") and records[1]["score"] is None
    assert code in records[1]["error"] and named in records[1]["error"], records[1]["error"]
    assert [comparable(r) for r in (records[0], records[2])] == [comparable(r) for r in world["baseline"]]
    assert summarise(benchmarks.get("toy-shapes"), records)["failures"] == 1
    json.dumps(records, ensure_ascii=False).encode("utf-8")      # the journal can write every record


def test_a_generation_error_fails_only_its_row(world, generator, monkeypatch):
    first, last = world["good"]
    original = generator.benchmark.prompt

    def prompt(row, options=None):
        if row["id"] == "explodes":
            raise RuntimeError("prompt exploded")
        return original(row, options)

    monkeypatch.setattr(generator.benchmark, "prompt", prompt)
    rows = [dict(first, _row=0), dict(first, id="explodes", _row=1), dict(last, _row=2)]
    records = generator.records_for(rows)
    assert records[1]["error"] == "RuntimeError: prompt exploded"
    assert [comparable(r) for r in (records[0], records[2])] == [comparable(r) for r in world["baseline"]]


def test_numbers_that_cannot_be_true_fail_the_job_and_never_become_a_counted_failure(world, generator, monkeypatch):
    """A record off its plan is an InvariantViolation out of `records_for` (the job fails), not one more
    failure record among the generation errors that are isolated per row."""
    from dataclasses import replace

    first, _ = world["good"]
    wrong = replace(generator.handle.plan, delivered=generator.handle.plan.delivered - 1)
    monkeypatch.setattr(generator.handle, "row_plans", lambda: [wrong, wrong])
    with pytest.raises(InvariantViolation, match="visual tokens delivered to the LLM: expected 143, found 144"):
        generator.records_for([dict(first, _row=0), dict(first, id="second", _row=1)])


@pytest.mark.parametrize("corrupt, message", [
    (lambda counts: {**counts, "llm": counts["llm"][:-1], "llm_visual": counts["llm_visual"][:-1]},
     "counts\\['llm'\\] lists 3 layers; the model has 4"),                 # refused by the cost formulas
    (lambda counts: {**counts, "llm": [length + 5 for length in counts["llm"]]},
     "text tokens of LLM layer 0: expected"),                               # consistent, but not the prompt's
])
def test_counts_the_costs_or_the_prompt_refuse_fail_the_job(world, generator, monkeypatch, corrupt, message):
    """Counts a hook got wrong fail the job with a one-line InvariantViolation, never as one more failure record
    per row: refused by `sample_cost` (a layer missing) or by the prompt's own text tokens."""
    first, _ = world["good"]
    recorded = generator.handle.last_counts

    monkeypatch.setattr(generator.handle, "last_counts", lambda: [corrupt(counts) for counts in recorded()])
    with pytest.raises(InvariantViolation, match=message):
        generator.records_for([dict(first, _row=0), dict(first, id="second", _row=1)])


def test_a_budget_an_image_cannot_reach_fails_the_job_not_the_row(world, generator, monkeypatch):
    """On LLaVA-NeXT and Qwen2-VL a sample keeps its image's share of the budget; a small image whose share the
    method cannot reach must not be left out as a counted failure (the score would be of the larger images)."""
    from ficoco.budget import InfeasibleBudget

    first, _ = world["good"]

    def small_image(rows):
        raise InfeasibleBudget("fastv: budget B=5 is infeasible for a span of 64 tokens")

    monkeypatch.setattr(generator, "generate", small_image)
    with pytest.raises(InfeasibleBudget, match="B=5 is infeasible"):
        generator.records_for([dict(first, _row=0), dict(first, id="second", _row=1)])


def test_safe_rows_never_raise_and_always_have_the_normalised_columns(tmp_path):
    from ficoco.benchmarks.rows import SafeRows

    features = Features({"id": S, "image": Image(), "question": S})         # no answers, choices, meta
    dataset = Dataset.from_dict({"id": ["a", "b", None], "question": ["q", "q", "q"],
                                 "image": [{"bytes": b"", "path": None}, {"bytes": PNG, "path": None}, None]},
                                features=features)
    table = dataset.data.table
    table = table.set_column(0, "id", pa.array([b"a", b"b\xff", None], pa.binary()).view(pa.string()))
    rows = SafeRows(Dataset(InMemoryTable(table), info=dataset.info))
    assert len(rows) == 3
    assert rows[0]["image"] is None and rows[0]["answers"] is None and rows[0]["meta"] is None
    assert rows[1]["image"] == {"bytes": PNG, "path": None}                     # not decoded
    assert rows[1]["id"] == "b\\xff" and rows[1]["_problems"] == ["undecodable_text: id b'b\\xff'"]
    assert rows[2]["id"] == "<no id: row 2>" and rows[2]["_problems"] == ["missing_id: None"]


# ---------------------------------------------------------------------------------------------
# duplicate ids: refused, never replaced

def test_duplicate_ids_are_refused_at_evaluate_before_any_sample_runs(world):
    first, last = world["good"]
    rows = [first, dict(last, id=first["id"]), first]
    with pytest.raises(ValueError, match=rf"1 duplicate id\(s\) on 3 rows \(e.g. '{first['id']}' x3\).*refetch"):
        run(world["root"], "duplicates", rows)
    assert not (world["root"] / "duplicates" / "run" / "journal.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# fetch: every image decoded in full, each bad row flagged in the manifest



def textvqa_repo(root: Path) -> Path:
    """A hub-like TextVQA repository (parquet + README configs) whose `question` column is binary,
    so that a raw question can be bytes that are not UTF-8."""
    features = Features({"image_id": S, "question_id": Value("int64"), "question": Value("binary"),
                         "image": Image(), "answers": List(S), "set_name": S, "ocr_tokens": List(S)})
    good_image = {"bytes": PNG, "path": None}
    rows = [
        # (question_id, question, image, answers)
        (1, b"what is the sign?", good_image, ["stop"] * 10),
        (2, b"what brand is this?", {"bytes": PNG[:len(PNG) // 2], "path": None}, ["nokia"] * 10),
        (3, b"what is written?", {"bytes": NOT_AN_IMAGE, "path": None}, ["hello"] * 10),
        (4, b"what colour?", {"bytes": JPEG[:-40], "path": None}, ["red"] * 10),
        (5, b"who made it?", good_image, []),
        (6, b"who made it?", good_image, None),
        (7, b"who made it?", good_image, ["acme", None]),
        (8, b"", good_image, ["x"] * 10),
        (9, b"   ", good_image, ["x"] * 10),
        (10, None, good_image, ["x"] * 10),
        (11, b"what \xff is this?", good_image, ["x"] * 10),
        (12, b"where is it?", None, ["x"] * 10),
        (13, b"unreadable by to_row", good_image, ["x"] * 10),
        (14, b"what time is it?", good_image, ["noon"] * 10),
        (15, b"which set?", good_image, ["val"] * 10),              # its set_name is not UTF-8 (below)
    ]
    data = {"image_id": [f"i{r[0]}" for r in rows], "question_id": [r[0] for r in rows],
            "question": [r[1] for r in rows], "image": [r[2] for r in rows], "answers": [r[3] for r in rows],
            "set_name": ["val"] * len(rows), "ocr_tokens": [["STOP"]] * len(rows)}
    table = Dataset.from_dict(data, features=features).data.table
    set_names = [b"val"] * (len(rows) - 1) + [b"v\xe1l"]
    table = table.set_column(table.schema.get_field_index("set_name"), "set_name",
                             pa.array(set_names, pa.binary()).view(pa.string()))
    (root / "data").mkdir(parents=True)
    pq.write_table(table, str(root / "data" / "validation-00000-of-00001.parquet"))
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                    "  - split: validation\n    path: data/validation-*\n---\n")
    return root


FETCH_FLAGS = {  # question_id -> reason code and text the reason must contain
    "2": ("undecodable_image", "truncated"), "3": ("undecodable_image", "<html>404"),
    "4": ("undecodable_image", "Truncated File Read"), "5": ("empty_answers", "empty_answers"),
    "6": ("empty_answers", "empty_answers"), "7": ("null_answer", "['acme', None]"),
    "8": ("empty_question", "''"), "9": ("empty_question", "'   '"), "10": ("missing_question", "missing_question"),
    "11": ("undecodable_text", r"question b'what \xff is this?'"), "12": ("missing_image", "missing_image"),
    "<unreadable row 12>": ("unreadable_row", "cannot read raw row 12"),
    "15": ("undecodable_text", r"set_name b'v\xe1l'"),
}


def test_fetch_decodes_every_image_and_flags_each_bad_row_then_evaluate_counts_them(world, tmp_path, monkeypatch):
    bench = benchmarks.get("textvqa")
    to_row = type(bench).to_row

    def fragile(self, raw, index, context):
        if raw["question_id"] == 13:
            raise KeyError(f"cannot read raw row {index}")
        return to_row(self, raw, index, context)

    monkeypatch.setattr(type(bench), "to_row", fragile)
    registry = {"textvqa": {"source": "hub", "id": "lmms-lab/textvqa", "split": "validation", "config": None,
                            "revision": "main", "rows": 15}}
    out = tmp_path / "textvqa"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = fetch_benchmark("textvqa", out, registry=registry, source=textvqa_repo(tmp_path / "repo"),
                                   cache_dir=tmp_path / "hf-cache")

    flagged = {row["id"]: row["reason"] for row in manifest["bad_rows"]["rows"]}
    assert set(flagged) == set(FETCH_FLAGS), flagged
    for rid, (code, named) in FETCH_FLAGS.items():
        assert flagged[rid].split(":")[0] == code and named in flagged[rid], (rid, flagged[rid])
    assert manifest["bad_rows"]["count"] == len(FETCH_FLAGS) and manifest["rows"] == 15
    assert manifest["bad_rows"]["by_reason"]["undecodable_image"] == 3
    dataset, _ = load_local(out)
    stored = dataset.cast_column("image", Image(decode=False))
    assert stored[1]["image"]["bytes"] == PNG[:len(PNG) // 2]        # kept as it came, flagged

    # the evaluate job runs every row: one failure per flagged row, the good rows scored
    monkeypatch.undo()
    predictions = evaluate_shard(model_dir=world["root"] / "model", benchmark_dir=out, benchmark="textvqa",
                                 method="vanilla", budget="full", out=tmp_path / "run" / "predictions.jsonl",
                                 batch_size=4, device="cpu", progress=False)
    records = {r["id"]: r for r in read_jsonl(predictions)}
    assert {rid for rid, r in records.items() if r["error"]} == set(FETCH_FLAGS)
    assert all(records[rid]["error"] == f"bad row: {flagged[rid]}" for rid in FETCH_FLAGS)
    assert all(records[rid]["score"] is not None for rid in ("1", "14"))
    summary = summarise(benchmarks.get("textvqa"), list(records.values()))
    assert summary["failures"] == len(FETCH_FLAGS) and summary["metrics"]["bad_rows"] == len(FETCH_FLAGS)
    assert summary["metrics"]["scored"] == 2


def test_fetch_refuses_duplicate_ids_naming_their_count_and_examples(tmp_path):
    features = Features({"question_id": S, "image": Image(), "question": S, "answer": S, "category": S})
    data = {"question_id": ["a", "a", "b", "b", "b", "c"], "image": [{"bytes": PNG, "path": None}] * 6,
            "question": ["Is it red?"] * 6, "answer": ["Yes"] * 6}
    data["category"] = ["random"] * 6
    (tmp_path / "repo" / "data").mkdir(parents=True)
    Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / "repo" / "data" / "test-0.parquet"))
    (tmp_path / "repo" / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                                 "  - split: test\n    path: data/test-*\n---\n")
    registry = {"pope": {"source": "hub", "id": "lmms-lab/POPE", "split": "test", "config": None, "revision": "main"}}
    with warnings.catch_warnings(), pytest.raises(ValueError) as error:
        warnings.simplefilter("ignore")
        fetch_benchmark("pope", tmp_path / "pope", registry=registry, source=tmp_path / "repo",
                        cache_dir=tmp_path / "hf-cache")
    message = str(error.value)
    assert "\n" not in message
    assert "2 duplicate id(s) on 5 rows (e.g. 'random/a' x2, 'random/b' x3)" in message
    assert not (tmp_path / "pope").exists()


# ---------------------------------------------------------------------------------------------
# the report lists every failure reason

def test_the_report_failures_section_lists_reasons_and_examples(tmp_path):
    import pandas as pd

    from ficoco.report.page import failures_section

    run_dir = tmp_path / "runs" / "toy" / "toy-shapes" / "vanilla" / "bfull"
    (run_dir / "shard0of1").mkdir(parents=True)
    records = [{"id": "a", "row": 0, "error": None, "score": 1.0},
               {"id": "b", "row": 1, "error": "bad row: undecodable_image: OSError: image file is truncated"},
               {"id": "c", "row": 2, "error": "bad row: empty_question: '';missing_image"},
               {"id": "d", "row": 3, "error": "RuntimeError: CUDA out of memory"}]
    (run_dir / "shard0of1" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    results = pd.DataFrame([{"model": "toy", "method": "vanilla", "budget": "full", "benchmark": "toy-shapes",
                             "headline": True, "samples": 4, "failures": 3, "value": 100.0,
                             "source": str(run_dir / "metrics.json")}])
    page = failures_section(results)
    for text in ("bad row: undecodable_image", "bad row: empty_question", "bad row: missing_image",
                 "RuntimeError", "image file is truncated", "CUDA out of memory"):
        assert text in page, text
    assert "Every job scored every sample" in failures_section(results.assign(failures=0))

"""Sharding: contiguous deterministic blocks, and merged shards score exactly like one run."""
from __future__ import annotations

import json
import random

import pytest

from ficoco import benchmarks
from ficoco.benchmarks import merge_records, shard_rows
from ficoco.benchmarks.fetch import shard_rows as shard_rows_from_fetch


def test_shard_rows_blocks():
    # 10 rows in 3 shards: 10 = 3 * 3 + 1 -> the first shard gets the extra row
    assert [shard_rows(10, i, 3) for i in range(3)] == [range(0, 4), range(4, 7), range(7, 10)]
    # fewer rows than shards: the last shards are empty
    assert [list(shard_rows(2, i, 3)) for i in range(3)] == [[0], [1], []]
    assert shard_rows(5, 0, 1) == range(0, 5)
    assert shard_rows_from_fetch is shard_rows          # the evaluate job imports it from fetch


@pytest.mark.parametrize("n_rows", [0, 1, 7, 12, 13])
@pytest.mark.parametrize("num_shards", [1, 2, 5])
def test_shards_cover_every_row_exactly_once_in_order(n_rows, num_shards):
    shards = [shard_rows(n_rows, i, num_shards) for i in range(num_shards)]
    assert [row for shard in shards for row in shard] == list(range(n_rows))
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert shards == [shard_rows(n_rows, i, num_shards) for i in range(num_shards)]   # deterministic


@pytest.mark.parametrize("args, message", [
    ((10, 3, 3), r"shard_index must be in 0\.\.2, got 3"),
    ((10, -1, 3), r"shard_index must be in 0\.\.2, got -1"),
    ((10, 0, 0), "num_shards must be >= 1, got 0"),
    ((-1, 0, 1), "n_rows must be >= 0, got -1"),
    ((10.0, 0, 1), "n_rows must be an integer, got 10.0"),
])
def test_shard_rows_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        shard_rows(*args)


def test_merge_records_orders_by_row_and_rejects_overlaps():
    shard_b = [{"id": "c", "row": 2}, {"id": "d", "row": 3}]
    shard_a = [{"id": "a", "row": 0}, {"id": "b", "row": 1}]
    assert [r["id"] for r in merge_records([shard_b, shard_a])] == ["a", "b", "c", "d"]
    # records without a row index are placed by their id in the dataset's id column
    assert [r["id"] for r in merge_records([[{"id": "y"}], [{"id": "x"}]], ids=["x", "y"])] == ["x", "y"]
    with pytest.raises(ValueError, match="two records for row 1"):
        merge_records([shard_a, [{"id": "b2", "row": 1}]])
    with pytest.raises(ValueError, match="has no 'row'"):
        merge_records([[{"id": "z"}]])


def _mmbench_rows():
    """9 MMBench rows, base rows first and rotations after: circular groups straddle every shard
    boundary below."""
    rows = []
    for index, answer, category in [(3, "A", "x"), (5, "B", "y"), (8, "A", "x"), (9, "B", "y"),
                                    (1_000_003, "B", "x"), (1_000_005, "A", "y"), (1_000_008, "B", "x"),
                                    (1_000_009, "A", "y"), (2_000_003, "A", "x")]:
        rows.append({"id": str(index), "image": "img", "question": "q", "answers": [answer], "choices": ["c", "d"],
                     "meta": json.dumps({"options": {"A": "c", "B": "d"}, "group": index % 1_000_000,
                                         "round": index // 1_000_000, "category": category})})
    return rows


@pytest.mark.parametrize("name", ["mmbench", "vqav2"])
@pytest.mark.parametrize("num_shards", [2, 4])
def test_scoring_merged_shards_equals_scoring_the_whole_run(name, num_shards):
    bench = benchmarks.get(name)
    if name == "mmbench":
        rows = _mmbench_rows()
        rng = random.Random(1)
        predictions = [rng.choice(["A", "B", "the answer is B.", "no idea"]) for _ in rows]
    else:
        rows = [{"id": str(i), "image": "img", "question": "q", "answers": ["two"] * (i % 4) + ["one"] * (10 - i % 4),
                 "choices": [], "meta": json.dumps({"answer_type": "number"})} for i in range(11)]
        predictions = ["2" if i % 3 else "one" for i in range(11)]

    def record(index):
        return {"id": rows[index]["id"], "row": index, "prediction": predictions[index],
                "scoring": bench.score_sample(predictions[index], rows[index])}

    whole = [record(i) for i in range(len(rows))]
    shards = [[record(i) for i in shard_rows(len(rows), s, num_shards)] for s in range(num_shards)]
    random.Random(0).shuffle(shards)                    # shard outputs arrive in any order
    merged = merge_records(shards)
    assert [r["row"] for r in merged] == list(range(len(rows)))
    assert bench.aggregate(merged) == bench.aggregate(whole)
    if name == "mmbench":
        # a group split across shards is judged on all its variants, not per shard
        assert any(len({json.loads(rows[i]["meta"])["group"] for i in shard_rows(len(rows), s, num_shards)} &
                       {json.loads(rows[i]["meta"])["group"] for i in shard_rows(len(rows), s + 1, num_shards)})
                   for s in range(num_shards - 1))

"""The toy benchmark: held-out questions of the embedded toy world (see docs/toy.md).

Follows the benchmark module contract (docs/contracts.md §5). The data is not downloaded: `fetch`
renders it with the toy generator (`ficoco.toy.shapes`) into the same directory format as a fetched
benchmark. Scoring is exact match after lower-casing, stripping and removing trailing periods
(the GQA rule); the headline `score` is the percentage of correct answers, with a breakdown per
question kind (color, shape, count, position).
"""
from __future__ import annotations

import json

name = "toy"
max_new_tokens = 4            # one answer word + </s>; a little slack for a wrong model
headline_percent = True       # the headline is a percentage: it joins the report's Avg


def prompt(row: dict, options: dict | None = None) -> str:
    """The text after `<image>\\n`: the question as the toy model was trained on it."""
    return row["question"].strip()


def fetch_option_values(options: dict | None) -> dict:
    """The options that change an evaluate job's rows: none (they come from the registry's rows and seed)."""
    if options:
        raise ValueError(f"toy benchmark: options {sorted(options)}; it takes none (its rows and seed are set in "
                         "its benchmark registry entry)")
    return {}


def normalise(text: str) -> str:
    """Lower-case, strip whitespace and trailing periods."""
    return text.strip().lower().rstrip(".").strip()


def score_sample(prediction: str | None, row: dict) -> dict:
    """{"score": 1.0 | 0.0, "parsed": normalised prediction}; None when there is no prediction."""
    if prediction is None:
        return {"score": None, "parsed": None}
    parsed = normalise(prediction)
    answers = {normalise(answer) for answer in row["answers"]}
    return {"score": 1.0 if parsed in answers else 0.0, "parsed": parsed, "kind": _kind(row)}


def _kind(row: dict) -> str | None:
    meta = row.get("meta")
    if isinstance(meta, str) and meta:
        meta = json.loads(meta)
    return meta.get("kind") if isinstance(meta, dict) else None


def aggregate(records: list[dict]) -> dict:
    """Headline `score` = % correct over scorable records; `score_<kind>` per question kind.

    A record needs "score" (float or None) and may carry "scoring": {"kind": ...} from
    `score_sample`. None scores are failures: counted, not averaged.
    """
    scored = [r for r in records if r.get("score") is not None]
    metrics: dict = {
        "score": 100.0 * sum(r["score"] for r in scored) / len(scored) if scored else None,
        "samples": len(records),
        "failures": len(records) - len(scored),
    }
    kinds = sorted({(r.get("scoring") or {}).get("kind") for r in scored} - {None})
    for kind in kinds:
        of_kind = [r["score"] for r in scored if (r.get("scoring") or {}).get("kind") == kind]
        metrics[f"score_{kind}"] = 100.0 * sum(of_kind) / len(of_kind)
    return metrics


def fetch(out_dir, revision: str | None = None, options: dict | None = None) -> dict:
    """Build the held-out split into `out_dir` (benchmark directory format); returns the manifest.

    options: {"seed": int (default 1234), "rows": int (default 500)}. `revision` is not used: the
    data is a pure function of (seed, rows) and the manifest's checksum pins it.
    """
    from ficoco.toy.cli import build_benchmark

    options = dict(options or {})
    unknown = sorted(set(options) - {"seed", "rows"})
    if unknown:
        raise ValueError(f"toy benchmark options {unknown}: valid options are ['rows', 'seed']")
    return build_benchmark(out_dir, seed=int(options.get("seed", 1234)), rows=int(options.get("rows", 500)))

"""Every metrics.json and measure JSON -> the tidy summary tables under results/summary/.

Files written (each atomically), schema in docs/report.md:
- results.csv / results.parquet: one row per job x metric (the tidy table);
- schedules.csv: mean visual tokens per LLM layer, one row per job x layer;
- measure.csv: latency / memory / throughput, one row per (model, method, budget);
- samples.parquet: one row per job x sample, read from the shard predictions beside each
  metrics.json (the per-sample scores behind the report's confidence intervals and drill-down).

Job keys are required (a missing one is an error naming the file); everything else is optional
and becomes NaN / NA when absent. Impossible costs are refused (`check_costs`): a run whose samples
ran must have positive mean total and prefill FLOPs (and vision FLOPs when it delivered visual tokens),
and no mean cost may be negative or non-finite.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ficoco.budget_labels import ADAPTIVE, VALID_LABELS, is_label, is_token_budget, tflops_target
from ficoco.report import files

JOB_KEYS = ("model", "method", "phase", "budget", "benchmark")

RESULTS_COLUMNS = {
    "model": "string",
    "method": "string",
    "phase": "string",
    "budget": "string",                  # the label: "full", "adaptive", "128", "t2.4", "t1.5-nominal"
    "budget_tokens": "Int64",            # the token budget the job ran (a TFLOPs label's solved budget); NA for
                                         # "full" and "adaptive" (an adaptive run's realised tokens are
                                         # visual_tokens_layer_avg)
    "predicted_tflops": "float64",       # a TFLOPs label's solved cost under its convention; NaN otherwise
    "benchmark": "string",
    "metric": "string",                  # key in metrics.json "metrics"; nested keys joined with "/"
    "headline": "boolean",               # metric is the job's headline (normally "score")
    "value": "float64",
    "samples": "Int64",
    "failures": "Int64",
    "tflops_exact": "float64",           # cost_mean.total_flops / 1e12 (mean per sample)
    "tflops_overhead": "float64",        # cost_mean.overhead_flops / 1e12: selection work, not in tflops_exact
    "tflops_prefill": "float64",         # cost_mean.prefill_flops / 1e12
    "tflops_vision": "float64",          # cost_mean.vision_flops / 1e12
    "tflops_decode": "float64",          # cost_mean.decode_flops / 1e12
    "tflops_legacy": "float64",          # cost_mean.legacy_nominal_tflops (the paper-style label)
    "tflops_first_token": "float64",     # tflops_exact - tflops_decode: the exact convention of a TFLOPs budget
    "visual_tokens_layer_avg": "float64",
    "visual_tokens_delivered": "float64",
    "benchmark_module": "string",        # the registered module that scored the job (metrics.json)
    "eval_s_per_sample": "float64",      # latency.mean_s_per_sample of the evaluate job
    "prefill_s": "float64",              # from the measure file of (model, method, budget)
    "per_token_s": "float64",
    "end_to_end_s": "float64",
    "peak_memory_bytes": "float64",
    "throughput": "float64",             # images per second
    "rows_limit": "Int64",               # the config's `limit` (rows per benchmark) the job ran under; NA: all rows
    "fallback_data": "string",           # "<id>@<revision>" when the benchmark came from its fallback namespace
    "source": "string",                  # the metrics.json the row came from
}

SCHEDULE_COLUMNS = {
    "model": "string", "method": "string", "phase": "string", "budget": "string", "budget_tokens": "Int64",
    "benchmark": "string", "layer": "int64", "visual_tokens": "float64",
}

MEASURE_COLUMNS = {
    "model": "string", "method": "string", "budget": "string", "budget_tokens": "Int64",
    "prefill_s": "float64", "per_token_s": "float64", "end_to_end_s": "float64", "decode_s": "float64",
    "peak_memory_bytes": "float64", "throughput": "float64",
    "tflops_exact": "float64", "tflops_prefill": "float64",
    "tflops_first_token": "float64",     # tflops_exact - decode: what the time to the first token (prefill_s) runs
    # where and how it was timed: one model's measure files must agree on these (`check_one_setting`)
    "device_name": "string", "dtype": "string", "attn_implementation": "string", "torch": "string",
    "transformers": "string", "batch_size": "string", "new_tokens": "string", "prompt_tokens": "string",
    "image_size": "string", "source": "string",
}
MEASURE_SETTING = ("device_name", "dtype", "attn_implementation", "torch", "transformers", "batch_size", "new_tokens",
                   "prompt_tokens", "image_size")
SAMPLE_COLUMNS = {
    "model": "string", "method": "string", "phase": "string", "budget": "string", "benchmark": "string",
    "id": "string",                      # the sample id (the same id across every job of a benchmark)
    "row": "Int64",                      # the row index in the fetched benchmark (resources/benchmarks/...)
    "score": "float64",                  # the per-sample score in [0, 1]; NaN when it has none (failure, bad row)
    "prediction": "string",
    "answers": "string",                 # the reference answers, joined by " | "
    "error": "string",                   # why the sample has no score (NA when it has one)
    "scoring": "string",                 # the record's scoring dict as JSON (what the benchmark aggregates)
    "predictions": "string",             # the shard predictions file the record came from
}
MEASURE_VALUES = ("prefill_s", "per_token_s", "end_to_end_s", "peak_memory_bytes", "throughput")

RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
SCHEDULES_CSV = "schedules.csv"
MEASURE_CSV = "measure.csv"
SAMPLES_PARQUET = "samples.parquet"


@dataclass(frozen=True)
class Summary:
    results: pd.DataFrame
    schedules: pd.DataFrame
    measure: pd.DataFrame
    samples: pd.DataFrame


# ---------------------------------------------------------------------------------------------- finding


def find_metrics_files(results_dir: str | Path) -> list[Path]:
    return sorted(Path(results_dir).glob("runs/*/*/*/b*/metrics.json"))


def find_measure_files(results_dir: str | Path) -> list[Path]:
    return sorted(Path(results_dir).glob("measure/*/*/b*.json"))


# ---------------------------------------------------------------------------------------------- values


def number(value) -> float:
    """A float for int/float values (bools excluded); NaN for anything else, None included."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def nested(data: dict, *path):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def scaled(value, factor: float) -> float:
    return number(value) / factor


def normalise_budget(value, where: str) -> str:
    """A budget label (ficoco.budget_labels; an integer budget as its decimal text); anything else is an
    error naming `where`."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return str(value)
    if isinstance(value, str) and value.isdigit() and int(value) > 0:
        return str(int(value))
    if is_label(value):
        return value
    raise ValueError(f"{where}: budget {value!r} is not valid; valid: {VALID_LABELS}")


def budget_tokens(job: dict, where: str):
    """The token budget a job ran: its integer label, or the budget a TFLOPs label was solved into
    (`run_budget`, required then); NA for "full" and "adaptive", which have none."""
    label = job["budget"]
    if is_token_budget(label):
        return int(label)
    if tflops_target(label) is None:
        return pd.NA
    run_budget = str(job.get("run_budget", ""))
    if not is_token_budget(run_budget):
        raise ValueError(f"{where}: budget {label!r} is a TFLOPs target but the job records no solved token budget "
                         f"(run_budget {job.get('run_budget')!r}); valid: a positive integer (rerun the job)")
    return int(run_budget)


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict, keys joined with '/'. None counts as NaN."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}/"))
        elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            flat[name] = number(value)
    return flat


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------- runs


def read_job(data: dict, path: Path) -> dict:
    job = data.get("job")
    if not isinstance(job, dict):
        raise ValueError(f"{path}: no 'job' object; metrics.json needs job keys {', '.join(JOB_KEYS)}")
    missing = [key for key in JOB_KEYS if job.get(key) in (None, "")]
    if missing:
        raise ValueError(f"{path}: job is missing {', '.join(missing)}; required job keys: {', '.join(JOB_KEYS)}")
    keys = {
        "model": str(job["model"]), "method": str(job["method"]), "phase": str(job["phase"]),
        "budget": normalise_budget(job["budget"], str(path)), "benchmark": str(job["benchmark"]),
    }
    return {**keys, "budget_tokens": budget_tokens({**job, **keys}, str(path)),
            "predicted_tflops": number(job.get("predicted_tflops"))}


POSITIVE_COST_MEANS = ("total_flops", "prefill_flops")   # every sample that ran pays these


def check_costs(data: dict, path: Path) -> None:
    """Refuse a metrics.json whose costs cannot be true, naming the file, the key and the value.

    Applies when samples ran (`samples` - `failures` > 0): cost_mean must exist, total and prefill
    FLOPs must be > 0, vision FLOPs > 0 when visual tokens were delivered, and every numeric mean
    cost must be finite and >= 0. (A zero cost is what a run that recorded no real counts reports.)
    """
    samples, failures = data.get("samples"), data.get("failures") or 0
    if isinstance(samples, bool) or not isinstance(samples, int) or not isinstance(failures, int):
        return
    ran = samples - failures
    if ran <= 0:
        return
    cost = data.get("cost_mean")
    if not isinstance(cost, dict) or not cost:
        raise ValueError(f"{path}: {ran} samples ran but cost_mean is missing; refusing a run without costs "
                         f"(rerun its evaluate and score jobs)")
    required = POSITIVE_COST_MEANS
    if number(nested(data, "visual_tokens", "delivered")) > 0:
        required += ("vision_flops",)
    for key in required:
        value = number(cost.get(key))
        if not value > 0:
            raise ValueError(f"{path}: cost_mean.{key} = {cost.get(key)!r} over {ran} samples that ran; it must "
                             f"be > 0 (an impossible cost: rerun its evaluate and score jobs)")
    for key, value in cost.items():
        value = number(value)                       # NaN for None and non-numbers, which are left alone
        if math.isinf(value) or value < 0:
            raise ValueError(f"{path}: cost_mean.{key} = {cost[key]!r}; a cost must be finite and >= 0")


def run_rows(data: dict, path: Path) -> list[dict]:
    """The tidy rows of one metrics.json (measure columns left NaN; `attach_measure` fills them)."""
    job = read_job(data, path)
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: no 'metrics' object")
    headline = str(data.get("headline") or "score")
    values = flatten_metrics(metrics)
    values.setdefault(headline, math.nan)
    cost = data.get("cost_mean") or {}
    shared = {
        **job,
        "samples": _count(data.get("samples")),
        "failures": _count(data.get("failures")),
        "tflops_exact": scaled(cost.get("total_flops"), 1e12),
        "tflops_overhead": scaled(cost.get("overhead_flops"), 1e12),
        "tflops_prefill": scaled(cost.get("prefill_flops"), 1e12),
        "tflops_vision": scaled(cost.get("vision_flops"), 1e12),
        "tflops_decode": scaled(cost.get("decode_flops"), 1e12),
        "tflops_legacy": number(cost.get("legacy_nominal_tflops")),
        "tflops_first_token": scaled(number(cost.get("total_flops")) - number(cost.get("decode_flops")), 1e12),
        "visual_tokens_layer_avg": number(nested(data, "visual_tokens", "layer_average")),
        "visual_tokens_delivered": number(nested(data, "visual_tokens", "delivered")),
        "benchmark_module": data.get("benchmark_module") if isinstance(data.get("benchmark_module"), str) else None,
        "eval_s_per_sample": number(nested(data, "latency", "mean_s_per_sample")),
        "rows_limit": _count(data["job"].get("limit")),
        "fallback_data": fallback_data(data.get("benchmark_data")),
        "source": str(path),
    }
    return [{**shared, "metric": name, "headline": name == headline, "value": value}
            for name, value in values.items()]


def fallback_data(benchmark_data) -> str | None:
    """`<source>@<revision>` of a benchmark fetched from its fallback namespace (metrics.json `benchmark_data`);
    None for data from its pinned primary, or a metrics.json from before the field."""
    if not isinstance(benchmark_data, dict) or benchmark_data.get("fallback_used") is not True:
        return None
    return f"{benchmark_data.get('source')}@{benchmark_data.get('revision')}"


def _count(value):
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else pd.NA


def schedule_rows(data: dict, path: Path) -> list[dict]:
    job = read_job(data, path)
    per_layer = nested(data, "visual_tokens", "per_layer")
    if not isinstance(per_layer, list):
        return []
    return [{**job, "layer": layer, "visual_tokens": number(tokens)}
            for layer, tokens in enumerate(per_layer)]


def scored_shard_files(metrics_path: str | Path, data: dict | None = None) -> list[Path] | None:
    """The shard predictions a job's metrics.json (`data`, read from `metrics_path` when not given) was scored
    from: the files it lists (`predictions`, beside it); for a metrics.json from before that list, the
    `shard{i}of{n}/predictions.jsonl` beside it when they are of one shard count n. None when there is none to
    read, a listed file is missing, or shards of several counts lie there (a leftover of an older `shards`
    setting cannot be told from the scored ones)."""
    folder = Path(str(metrics_path)).parent
    if data is None:
        try:
            data = json.loads(Path(str(metrics_path)).read_text())
        except (OSError, ValueError):
            data = None
    listed = data.get("predictions") if isinstance(data, dict) else None
    if isinstance(listed, list):
        files = [folder / str(name) for name in listed]
        return files if files and all(path.is_file() for path in files) else None
    files = sorted(folder.glob("shard*of*/predictions.jsonl"))
    shard_counts = {match.group(1) if (match := re.fullmatch(r"shard\d+of(\d+)", path.parent.name)) else None
                    for path in files}
    return files if len(shard_counts) == 1 and None not in shard_counts else None


def read_predictions(metrics_path: str | Path, data: dict | None = None) -> list[dict] | None:
    """The records of the shard predictions a job was scored from (`scored_shard_files`; `data` its metrics.json
    when already read), each with `_predictions` (its file); None when there is none to read. A line that is not
    a JSON object is skipped: the score job already refused a journal it could not read."""
    shard_files = scored_shard_files(metrics_path, data)
    if not shard_files:
        return None
    records = []
    for path in shard_files:
        with open(path, encoding="utf-8", errors="replace") as stream:
            for line in stream:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append({**record, "_predictions": str(path)})
    return records


def sample_score(record: dict) -> float:
    """A record's per-sample score (its `score`, else its scoring's), NaN when it has none."""
    score = record.get("score")
    if score is None and isinstance(record.get("scoring"), dict):
        score = record["scoring"].get("score")
    return number(score)


def sample_rows(data: dict, path: Path) -> list[dict]:
    job = read_job(data, path)
    records = read_predictions(path, data) or []
    rows = []
    for record in records:
        answers = record.get("answers")
        rows.append({**job, "id": str(record.get("id")), "row": _count(record.get("row")),
                     "score": sample_score(record),
                     "prediction": None if record.get("prediction") is None else str(record["prediction"]),
                     "answers": " | ".join(map(str, answers)) if isinstance(answers, list) else None,
                     "error": None if not record.get("error") else str(record["error"]),
                     "scoring": json.dumps(record["scoring"]) if isinstance(record.get("scoring"), dict) else None,
                     "predictions": record["_predictions"]})
    return rows


# ---------------------------------------------------------------------------------------------- measure


def parse_measure_path(path: Path) -> tuple[str, str, str]:
    """results/measure/{model}/{method}/b{budget}.json -> (model, method, budget)."""
    path = Path(path)
    if path.suffix != ".json" or not path.stem.startswith("b") or len(path.parts) < 3:
        raise ValueError(f"{path}: a measure file must be named measure/{{model}}/{{method}}/b{{budget}}.json")
    budget = normalise_budget(path.stem[1:], str(path))
    return path.parent.parent.name, path.parent.name, budget


def measure_value(data: dict, key: str) -> float:
    """A measured median at the top level, else under 'latency' (a number, a dict with 'median', or the
    list of repeats, whose median is taken)."""
    for value in (data.get(key), nested(data, "latency", key)):
        if isinstance(value, dict):
            value = value.get("median")
        if isinstance(value, list):
            repeats = [number(v) for v in value if not math.isnan(number(v))]
            value = statistics.median(repeats) if repeats else None
        if not math.isnan(number(value)):
            return number(value)
    return math.nan


def measure_throughput(data: dict) -> float:
    value = data.get("throughput")
    if isinstance(value, dict):
        value = value.get("images_per_s", value.get("samples_per_s"))
    return number(value)


def measure_row(data: dict, path: Path) -> dict:
    model, method, budget = parse_measure_path(path)
    job = data.get("job") if isinstance(data.get("job"), dict) else {}
    if job:
        stated = {"model": job.get("model", model), "method": job.get("method", method),
                  "budget": normalise_budget(job.get("budget", budget), str(path))}
        if stated != {"model": model, "method": method, "budget": budget}:
            raise ValueError(f"{path}: job {stated} disagrees with the file's path ({model}, {method}, {budget})")
    row = {"model": model, "method": method, "budget": budget,
           "budget_tokens": budget_tokens({**job, "budget": budget}, str(path)), "source": str(path)}
    row.update({key: measure_value(data, key) for key in MEASURE_VALUES if key != "throughput"})
    row["throughput"] = measure_throughput(data)
    row["decode_s"] = row["end_to_end_s"] - row["prefill_s"]
    cost = data.get("cost") if isinstance(data.get("cost"), dict) else data
    row["tflops_exact"] = scaled(cost.get("total_flops"), 1e12)
    row["tflops_prefill"] = scaled(cost.get("prefill_flops"), 1e12)
    row["tflops_first_token"] = scaled(number(cost.get("total_flops")) - number(cost.get("decode_flops")), 1e12)
    versions = data.get("versions") if isinstance(data.get("versions"), dict) else {}
    setting = {**{key: data.get(key) for key in MEASURE_SETTING}, **versions}
    row.update({key: str(setting[key]) if setting.get(key) is not None else None for key in MEASURE_SETTING})
    return row


def check_one_setting(measure: pd.DataFrame) -> None:
    """Refuse a model whose measure files were timed on different hardware, dtype, attention kernel, library
    versions, batch, prompt, image size or generated tokens: every speedup is a ratio of two of them (a field a
    file does not record is not compared)."""
    for model, group in measure.groupby("model", sort=True):
        for key in MEASURE_SETTING:
            values = group[key].dropna()
            if values.nunique() > 1:
                shown = "; ".join(f"{value} ({', '.join(sorted(group.loc[group[key] == value, 'source']))})"
                                  for value in sorted(values.unique()))
                raise ValueError(f"model {model}: its measure files were timed with different {key}: {shown}. A "
                                 f"speedup is a ratio of two of them: rerun the odd ones where the others ran "
                                 f"(snakemake -R <file>; on Slurm, pin one GPU type for the measure rule)")


# ---------------------------------------------------------------------------------------------- tables


def typed_frame(rows: list[dict], columns: dict[str, str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(columns))
    return frame.astype(columns)


def check_unique_jobs(runs: list[tuple[Path, dict]]) -> None:
    seen: dict[tuple, Path] = {}
    for path, data in runs:
        job = read_job(data, path)
        key = (job["model"], job["method"], job["budget"], job["benchmark"])
        if key in seen:
            raise ValueError(f"two metrics.json files for the same job {key}: {seen[key]} and {path}")
        seen[key] = path


def attach_measure(results: pd.DataFrame, measure: pd.DataFrame) -> pd.DataFrame:
    """The measured speed of each job's (model, method, budget) beside its rows; none beside an adaptive job:
    its measure run chose its own count on random weights and a synthetic image, not the evaluated one (the
    measure table and the speedup figure keep it, with that run's own FLOPs)."""
    keys = ["model", "method", "budget"]
    measured = measure.loc[measure["budget"] != ADAPTIVE, keys + list(MEASURE_VALUES)]
    merged = results.drop(columns=list(MEASURE_VALUES)).merge(measured, on=keys, how="left", validate="many_to_one")
    return merged[list(RESULTS_COLUMNS)].astype(RESULTS_COLUMNS)


def build_summary(metrics_files: list[str | Path], measure_files: list[str | Path]) -> Summary:
    if not metrics_files:
        raise ValueError("no metrics.json files given; expected results/runs/{model}/{benchmark}/{method}/"
                         "b{budget}/metrics.json")
    runs = [(Path(path), read_json(Path(path))) for path in metrics_files]
    check_unique_jobs(runs)
    for path, data in runs:
        check_costs(data, path)
    results = typed_frame([row for path, data in runs for row in run_rows(data, path)], RESULTS_COLUMNS)
    schedules = typed_frame([row for path, data in runs for row in schedule_rows(data, path)], SCHEDULE_COLUMNS)
    measure_rows = [measure_row(read_json(Path(path)), Path(path)) for path in measure_files]
    measure = typed_frame(measure_rows, MEASURE_COLUMNS)
    duplicated = measure.duplicated(subset=["model", "method", "budget"], keep=False)
    if duplicated.any():
        raise ValueError(f"several measure files for one (model, method, budget): "
                         f"{', '.join(measure.loc[duplicated, 'source'])}")
    check_one_setting(measure)
    samples = typed_frame([row for path, data in runs for row in sample_rows(data, path)], SAMPLE_COLUMNS)
    return Summary(results=attach_measure(results, measure), schedules=schedules, measure=measure, samples=samples)


def write_summary(summary: Summary, out_dir: str | Path) -> list[Path]:
    from ficoco.journal import remove_stale_temporaries

    out_dir = Path(out_dir)
    paths = [out_dir / RESULTS_CSV, out_dir / RESULTS_PARQUET, out_dir / SCHEDULES_CSV, out_dir / MEASURE_CSV,
             out_dir / SAMPLES_PARQUET]
    for path in paths:
        remove_stale_temporaries(path)           # what a killed earlier aggregate left (files.atomic_path)
    files.write_csv(summary.results, paths[0])
    files.write_parquet(summary.results, paths[1])
    files.write_csv(summary.schedules, paths[2])
    files.write_csv(summary.measure, paths[3])
    files.write_parquet(summary.samples, paths[4])
    return paths


def read_summary(summary_dir: str | Path) -> Summary:
    """Read what `write_summary` wrote (parquet for the tidy table when present, else its CSV)."""
    summary_dir = Path(summary_dir)
    parquet, csv = summary_dir / RESULTS_PARQUET, summary_dir / RESULTS_CSV
    if parquet.exists():
        results = pd.read_parquet(parquet).astype(RESULTS_COLUMNS)
    elif csv.exists():
        results = read_typed_csv(csv, RESULTS_COLUMNS)
    else:
        raise ValueError(f"{summary_dir}: no {RESULTS_PARQUET} or {RESULTS_CSV}; run `ficoco aggregate` first")
    return Summary(
        results=results,
        schedules=read_optional_csv(summary_dir / SCHEDULES_CSV, SCHEDULE_COLUMNS),
        measure=read_optional_csv(summary_dir / MEASURE_CSV, MEASURE_COLUMNS),
        samples=(pd.read_parquet(summary_dir / SAMPLES_PARQUET).astype(SAMPLE_COLUMNS)
                 if (summary_dir / SAMPLES_PARQUET).exists() else typed_frame([], SAMPLE_COLUMNS)),
    )


def read_typed_csv(path: Path, columns: dict[str, str]) -> pd.DataFrame:
    """A CSV written by `write_summary`, with the schema's dtypes (text columns stay text: "64", not 64)."""
    text_columns = {name: "string" for name, kind in columns.items() if kind in ("string", "boolean")}
    frame = pd.read_csv(path, dtype=text_columns)
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {', '.join(missing)}")
    for name, kind in columns.items():
        if kind == "boolean":
            frame[name] = frame[name].map({"True": True, "False": False}, na_action="ignore")
    return frame[list(columns)].astype(columns)


def read_optional_csv(path: Path, columns: dict[str, str]) -> pd.DataFrame:
    return read_typed_csv(path, columns) if path.exists() else typed_frame([], columns)

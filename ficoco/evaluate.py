"""One evaluate job: model + method + budget + benchmark (+ shard) -> journal -> predictions -> metrics.

    fetched model dir -> HF model -> ficoco.apply(model, method, budget)
    fetched benchmark rows (this shard) -> prompt -> greedy generate in batches
    -> per-sample records appended and fsynced to journal.jsonl after every batch
    -> predictions.jsonl written atomically once every sample of the shard is recorded
    `score`: all shards' predictions -> benchmark metrics + mean costs -> metrics.json (atomic)

A killed job (SIGKILL included) rerun with the same arguments skips the ids already journaled, so no
sample is lost or counted twice and the final metrics equal those of an uninterrupted run. Only an
unfinished journal with the job's own fingerprint (ficoco.fingerprint) is resumed; any other is set
aside and the job starts fresh (docs/contracts.md §6). Every record is checked against the method's
plan before it is journaled (ficoco.invariants).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ficoco.budget_labels import ADAPTIVE, FULL, RUN_LABELS, image_tokens, is_run_label, run_label_problem
from ficoco.journal import Journal, atomic_write_json, read_jsonl, remove_stale_temporaries, write_jsonl_atomic


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_environment() -> None:
    """Jobs read only local copies and never reach for the hub by accident. Called before the first
    Hugging Face import: huggingface_hub and datasets read these variables once, when imported."""
    for name in OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA device is available; valid here: cpu, auto")
    return device


def pad_to_square(image, background: tuple[int, int, int]):
    """LLaVA-1.5's `image_aspect_ratio = pad`: centre the image on a square of the CLIP-mean colour."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def load_model(model_dir: str | Path, device: str, dtype: str):
    """A fetched (or toy-built) model directory, local files only: the model and its processor (Qwen2-VL's
    for images and text, ficoco/models/qwen_processor.py)."""
    import torch
    from transformers import AutoProcessor

    from ficoco.dims import dims_from_config
    from ficoco.models import model_class
    from ficoco.models.qwen_processor import QwenVLImageTextProcessor
    from ficoco.qwen_dims import QwenVLDims

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dims = dims_from_config(config)
    processor = QwenVLImageTextProcessor.from_pretrained(model_dir, dims) if isinstance(dims, QwenVLDims) else \
        AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    processor.tokenizer.padding_side = "left"       # batched generation appends on the right
    model = model_class(config.get("model_type", "llava")).from_pretrained(model_dir, dtype=torch_dtype,
                                                                           local_files_only=True)
    return model.to(device).eval(), processor


def generated_length(tokens, eos_token_id) -> int:
    """How many tokens a row of `generate`'s output (its new tokens) generated: up to and including its first EOS
    (`eos_token_id`: an id, a list of ids, or None), else all of them. What follows the EOS is padding, whatever its
    id: counting the tokens that are not the pad id misses the EOS where the pad id is an EOS id (Qwen2-VL), and
    counts the padding where there is no pad id."""
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    for index, token in enumerate(tokens.tolist()):
        if token in eos:
            return index + 1
    return len(tokens)


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Generator:
    """Turns benchmark rows into records with one model, one method and one benchmark."""

    def __init__(self, model, processor, handle, benchmark, options: dict, template: str,
                 image_preprocessing: str, dims, judge=None, judge_code: str | None = None):
        self.model, self.processor, self.handle, self.judge = model, processor, handle, judge
        self.judge_code = judge_code          # the scoring code a judged sample is scored by (`rescore` checks it)
        self.benchmark, self.options, self.template = benchmark, options, template
        self.image_preprocessing, self.dims = image_preprocessing, dims
        from ficoco.models import IMAGE_MARKERS

        self.image_marker = IMAGE_MARKERS[model.config.model_type]
        mean = getattr(processor.image_processor, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        self.background = tuple(int(255 * m) for m in mean)

    def _text(self, row: dict) -> str:
        prompt = self.benchmark.prompt(row, self.options)
        if row["image"] is not None:         # the template's <image> is the model family's image marker
            template = self.template.replace("<image>", self.image_marker)
        else:
            template = self.template.replace("<image>\n", "").replace("<image>", "")
        return template.replace("{prompt}", prompt)

    def _image(self, row: dict):
        image = row["image"].convert("RGB")
        return pad_to_square(image, self.background) if self.image_preprocessing == "pad" else image

    def inputs(self, rows: list[dict]):
        """The model inputs of rows that all have an image, or all have none (one processor call)."""
        texts = [self._text(row) for row in rows]
        images = [self._image(row) for row in rows] if rows[0]["image"] is not None else None
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True).to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def generate(self, rows: list[dict]) -> list[dict]:
        """Records for rows that all have an image, or all have none (one processor call)."""
        import torch

        from ficoco.flops import sample_cost
        from ficoco.invariants import InvariantViolation, check_record, prompt_text_tokens

        inputs = self.inputs(rows)
        tokenizer = self.processor.tokenizer
        start = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.benchmark.max_new_tokens, do_sample=False,
                                         num_beams=1, pad_token_id=tokenizer.pad_token_id)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        counts, plans = self.handle.last_counts(), self.handle.row_plans()
        if not len(counts) == len(plans) == len(rows):
            raise InvariantViolation(f"{self.handle.method.name}: a batch of {len(rows)} rows recorded {len(counts)} "
                                     f"counts and {len(plans)} plans")
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        text_tokens = prompt_text_tokens(inputs, self.model.config.image_token_id)
        method = self.handle.method.name
        records = []
        for row, tokens, sample_counts, plan, text in zip(rows, new_tokens, counts, plans, text_tokens):
            generated = generated_length(tokens, self.model.generation_config.eos_token_id)
            prediction = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            try:
                cost = sample_cost(self.dims, sample_counts, generated)
            except ValueError as error:      # counts the cost formulas refuse: impossible, never a counted failure
                raise InvariantViolation(f"{method}: sample {row['id']}: {error}") from error
            record = self._record(row, prediction, sample_counts, generated, seconds / len(rows), cost)
            # a count or cost that cannot be true fails the job here, before the record is journaled
            check_record(method, plan, record, row["image"] is not None, text_tokens=text)
            records.append(record)
        return records

    def _record(self, row, prediction, counts, generated, seconds, cost, error=None) -> dict:
        if error is not None:
            scoring = {"score": None}
        elif self.judge is not None:          # GPT-judged benchmarks (MM-Vet, LLaVA-W)
            scoring = {**self.benchmark.score_sample(prediction, row, judge=self.judge), "scoring_code": self.judge_code}
        else:
            scoring = self.benchmark.score_sample(prediction, row)
        return {
            "id": str(row["id"]), "row": row["_row"], "prediction": prediction, "answers": list(row["answers"]),
            "score": scoring.get("score"), "scoring": scoring, "counts": counts, "cost": cost,
            "generated_tokens": generated, "latency_s": seconds, "error": error,
        }

    def failed(self, row: dict, error: str) -> dict:
        return self._record(row, "", None, 0, 0.0, None, error=error)

    def records_for(self, rows: list[dict]) -> list[dict]:
        """Generate a batch; a row that cannot run (bad row, error) becomes a failure record, never a gap.

        Each row is checked first (`ficoco.benchmarks.rows.check_row`: image decoded in full, every
        field checked); a bad row's record carries `error = "bad row: <reasons>"`.
        """
        from ficoco.benchmarks.rows import check_row

        runnable = []
        records = []
        for row in rows:
            row = check_row(row, self.benchmark)
            bad = json.loads(row["meta"]).get("bad_row")
            if bad:
                records.append(self.failed(row, f"bad row: {bad}"))
            else:
                runnable.append(row)
        # one processor call per kind: with images (per span on Qwen), and text-only (e.g. ScienceQA-FULL)
        for group in self._image_spans([r for r in runnable if r["image"] is not None]) + \
                [[r for r in runnable if r["image"] is None]]:
            if group:
                records.extend(self._generate_isolating_errors(group))
        return sorted(records, key=lambda record: record["row"])

    def _image_spans(self, rows: list[dict]) -> list[list[dict]]:
        """Image rows in groups of one visual-token span, in order of first appearance: on a Qwen2-VL-family
        model an image's span follows its size, and an LLM reduction runs a batch of one span at a time (so a
        batch of several sizes would fail and be retried row by row). One group on other models."""
        from ficoco.qwen_dims import QwenVLDims

        if not isinstance(self.dims, QwenVLDims):
            return [rows]
        groups: dict[int, list[dict]] = {}
        for row in rows:
            groups.setdefault(self.dims.image_tokens(*self._image_size(row)), []).append(row)
        return list(groups.values())

    def _image_size(self, row: dict) -> tuple[int, int]:
        """(height, width) of the image `_image` hands the processor, read from the image's size alone (no
        decoding, no conversion, no padding)."""
        width, height = row["image"].size
        if self.image_preprocessing == "pad":
            width = height = max(width, height)         # pad_to_square's square
        return height, width

    def _generate_isolating_errors(self, rows: list[dict]) -> list[dict]:
        """`generate(rows)`; when it raises, each row alone, so only the failing row becomes a failure."""
        from ficoco.budget import InfeasibleBudget
        from ficoco.invariants import InvariantViolation

        try:
            return self.generate(rows)
        except InvariantViolation:
            raise                     # numbers that cannot be true fail the job, never become a counted failure
        except InfeasibleBudget:
            raise                     # a budget an image cannot reach: left out, the score would be of the others
        except Exception as error:  # noqa: BLE001 - isolate the failing sample, keep the job going
            if len(rows) == 1:
                return [self.failed(rows[0], f"{type(error).__name__}: {error}")]
            return [record for row in rows for record in self._generate_isolating_errors([row])]


def evaluate_shard(*, model_dir, benchmark_dir, benchmark: str, method: str, budget: str, out: str | Path,
                   shard: int = 0, shards: int = 1, batch_size: int = 1, device: str = "auto",
                   dtype: str = "float32", overrides: dict | None = None, options: dict | None = None,
                   limit: int | None = None, template: str = "USER: <image>\n{prompt} ASSISTANT:",
                   image_preprocessing: str = "none", job: dict | None = None, progress: bool = True,
                   benchmark_module: str | None = None, calibration: str | Path | None = None) -> Path:
    """Run (or resume) one shard and write `out` (predictions.jsonl) when every sample is recorded.

    `benchmark` names the job; `benchmark_module` the registered prompt/scoring module (default: the same).
    The journal beside `out` is resumed only when it is unfinished and carries this job's fingerprint;
    any other journal is set aside (`set-aside/` beside it) and the job starts fresh, saying why on
    stderr (the job's log). Each record is checked against the method's plan before it is journaled.
    """
    offline_environment()
    import torch
    from tqdm import tqdm

    import ficoco
    from ficoco import benchmarks as benchmark_registry
    from ficoco import methods as method_registry
    from ficoco.benchmarks.fetch import load_local, shard_rows
    from ficoco.calibrate import with_calibration
    from ficoco.dims import dims_from_config
    from ficoco.fingerprint import job_fingerprint
    from ficoco.models.companion import model_text_tower

    budget_value = method_registry.budget_from_label(method, budget)   # a label that does not fit fails first
    # a calibrated method's fitted parameters join the overrides (and so the fingerprint); a stale fit fails here
    overrides = with_calibration(method, budget_value, overrides or {}, calibration, model_dir)
    params = method_registry.get(method).resolve(overrides)            # so do unknown or bad overrides
    reads_text_tower = method_registry.get(method).needs_text_tower

    out = Path(out)
    journal = Journal(out.parent / "journal.jsonl")
    for path in (out, journal.path):                  # what a killed atomic write left behind
        for debris in remove_stale_temporaries(path):
            _say(f"removed {debris}, left by a killed attempt")
    bench = benchmark_registry.get(benchmark_module or benchmark)
    # a judged benchmark without an API key fails here, before the model is loaded
    judge = bench.make_judge(options) if getattr(bench, "needs_judge", False) else None
    dataset, _ = load_local(benchmark_dir, expected_options=options or {}, module=benchmark_module or benchmark,
                            safe=True)
    total = len(dataset) if limit is None else min(limit, len(dataset))
    rows = list(shard_rows(total, shard, shards))
    device = pick_device(device)
    fingerprint = job_fingerprint(
        model_dir=model_dir, benchmark_dir=benchmark_dir, benchmark_module=benchmark_module or benchmark,
        options=options or {}, method=method, budget=budget, params=params, template=template, dtype=dtype,
        image_preprocessing=image_preprocessing, batch_size=batch_size, device=device, shard=shard, shards=shards,
        limit=limit, text_tower=reads_text_tower)
    header = _open_journal(journal, fingerprint, job)
    done = journal.read()
    sample_ids = {index: str(dataset[index]["id"]) for index in rows}     # the journal's keys
    todo = [index for index in rows if sample_ids[index] not in done]

    run = _start_tracking(job, out, len(rows), header=header, params=params, model_dir=model_dir)
    if todo:
        torch.manual_seed(0)
        model, processor = load_model(model_dir, device, dtype)
        dims = dims_from_config(model.config)
        text_tower = model_text_tower(model_dir, processor.tokenizer, template, model, dims.last_vision_layer) \
            if reads_text_tower else None
        handle = ficoco.apply(model, method, budget_value, text_tower=text_tower, **overrides)
        judge_code = benchmark_registry.scoring_code_digest(benchmark_module or benchmark) if judge else None
        generator = Generator(model, processor, handle, bench, options or {}, template, image_preprocessing, dims,
                              judge=judge, judge_code=judge_code)
        recorded = len(rows) - len(todo)
        bar = tqdm(total=len(rows), initial=recorded, desc=f"{benchmark}/{method}/b{budget}",
                   unit="sample", disable=not progress)
        for batch in _batches(todo, batch_size):
            batch_rows = [dict(dataset[index], _row=index) for index in batch]
            records = generator.records_for(batch_rows)     # each checked against its plan (ficoco.invariants)
            journal.append(records)           # durable before we move on: a kill loses at most this batch
            recorded += len(records)
            bar.update(len(records))
            if run is not None:               # independent of the progress bar (--no-progress)
                scored = [r["score"] for r in records if r["score"] is not None]
                run.log({"progress/samples": recorded, "progress/fraction": recorded / len(rows),
                         "batch/score": sum(scored) / max(len(scored), 1)}, step=recorded)
        bar.close()
        handle.remove()

    records = journal.read()
    shard_records = sorted((records[sample_ids[index]] for index in rows), key=lambda r: r["row"])
    write_jsonl_atomic(out, shard_records)
    journal.finish(records=len(shard_records), predictions=out.name)   # never resumed again
    if run is not None:
        from ficoco.tracking import finish, log_summary

        log_summary(run, summarise(bench, shard_records))
        finish(run)
    return out


def _say(message: str) -> None:
    """One line in the job's log (stderr)."""
    print(f"ficoco run: {message}", file=sys.stderr, flush=True)


def _open_journal(journal: Journal, fingerprint, job: dict | None) -> dict:
    """The header of the journal this job continues, or of the fresh one it starts.

    Resumed: an unfinished journal with the same fingerprint. Set aside (with the W&B run folders of
    its run): any other, finished or not (ficoco.journal.why_not_resume says why, in the log).
    """
    from ficoco.fingerprint import run_id
    from ficoco.journal import why_not_resume
    from ficoco.tracking import move_run_folders

    digest = fingerprint.digest()
    contents = journal.load()
    aside = why_not_resume(contents, fingerprint.as_dict(), digest)
    if aside is None and not contents.empty:
        _say(f"resuming {journal.path}: {len(contents.records)} samples recorded under the same fingerprint "
             f"{digest[:12]}")
        return contents.header
    if aside is not None:
        folder = journal.set_aside(aside.slug)
        old_run = (contents.header or {}).get("run_id")
        moved = move_run_folders(journal.path.parent, old_run, folder) if old_run else []
        _say(f"set aside {journal.path} ({len(contents.records)} samples) to {folder}"
             + (f" with its {len(moved)} W&B run folder(s)" if moved else "")
             + f": {aside.reason}; starting fresh")
    started = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    header = {"fingerprint": fingerprint.as_dict(), "fingerprint_sha256": digest, "started": started,
              "run_id": run_id(digest, started, job)}
    journal.start(header)
    _say(f"new journal {journal.path} (fingerprint {digest[:12]})")
    return header


def budget_number(label: str, model_dir: str | Path) -> int | None:
    """A budget label as a number of visual tokens per LLM layer, for plots: the integer; "n600" -> 600 (the
    count of every image); "full" -> the model's visual tokens per image (of its nominal image: unreduced);
    "adaptive" -> None (a count per sample)."""
    if label == ADAPTIVE:
        return None
    if image_tokens(label) is not None:
        return image_tokens(label).tokens
    if label == FULL:
        from ficoco.dims import dims_from_config

        return dims_from_config(json.loads((Path(model_dir) / "config.json").read_text())).visual_tokens
    return int(label)


def _start_tracking(job: dict | None, out: Path, samples: int, *, header: dict, params: dict, model_dir):
    """The W&B run of this journal (its id from the journal header: a resumed journal resumes its run)."""
    from ficoco.tracking import effective_mode, init_run

    if job is None or effective_mode() == "disabled":
        return None
    name = f"{job['method']}-b{job['budget']}-{job['benchmark']}" + (
        f"-shard{job['shard']}of{job['shards']}" if job.get("shards", 1) > 1 else "")
    config = {**job, "budget": budget_number(job.get("run_budget", job["budget"]), model_dir),
              "budget_label": job["budget"],
              "params": params, "samples": samples, "fingerprint": header["fingerprint"],
              "fingerprint_sha256": header["fingerprint_sha256"], "journal_started": header["started"]}
    return init_run(job_type="eval", name=name, group=f"{job['model']}/{job['benchmark']}", config=config,
                    run_dir=out.parent, tags=[job["method"], job["phase"], f"b{job['budget']}", job["benchmark"]],
                    run_id=header["run_id"])


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarise(bench, records: list[dict]) -> dict:
    """Benchmark metrics plus mean costs, visual tokens and latency over the records."""
    metrics = bench.aggregate(records)
    ran = [r for r in records if r.get("counts")]
    cost_keys = sorted({key for r in ran for key, value in (r.get("cost") or {}).items()
                        if isinstance(value, (int, float))})
    per_layer = [r["counts"]["llm_visual"] for r in ran]
    layers = len(per_layer[0]) if per_layer else 0
    return {
        "metrics": metrics,
        "headline": "score",
        "samples": len(records),
        "failures": sum(1 for r in records if r.get("error")),
        "cost_mean": {key: _mean(r["cost"].get(key) for r in ran) for key in cost_keys},
        "visual_tokens": {
            "layer_average": _mean(sum(counts) / len(counts) for counts in per_layer),
            "per_layer": [_mean(counts[layer] for counts in per_layer) for layer in range(layers)],
            "delivered": _mean(r["counts"]["visual_delivered"] for r in ran),
        },
        "latency": {"mean_s_per_sample": _mean(r.get("latency_s") for r in ran),
                    "total_s": sum(r.get("latency_s") or 0.0 for r in ran)},
    }


def rescore(bench, records: list[dict], rows, current_code: str) -> tuple[list[dict], int]:
    """`(records, changed)`: every record that ran scored again by the current code from its prediction and its
    benchmark row (`rows`: the fetched benchmark, `load_local(..., safe=True)`), so a change to the scoring reaches
    predictions already made; `changed` counts the records whose score moved. Failure records keep theirs. A
    GPT-judged benchmark's records keep their judge's scoring (the judge runs only in the evaluate job), which
    must come from the `current_code` (the benchmark's `scoring_code_digest`), else ValueError. A record whose
    row holds another sample id (data refetched since) is refused."""
    if getattr(bench, "needs_judge", False):
        stale = [r["id"] for r in records if r.get("error") is None
                 and (r.get("scoring") or {}).get("scoring_code") != current_code]
        if stale:
            raise ValueError(f"{len(stale)} of {len(records)} samples (e.g. {stale[0]!r}) were judged by other scoring "
                             f"code than today's ({current_code}); the judge runs only in evaluate jobs: rerun them "
                             f"(snakemake -R <their predictions.jsonl>)")
        return records, 0
    out, changed = [], 0
    for record in records:
        if record.get("error") is not None:
            out.append(record)
            continue
        index = record["row"]
        row = rows[index] if 0 <= index < len(rows) else None
        if row is None or str(row["id"]) != str(record["id"]):
            found = "no such row" if row is None else f"sample {row['id']!r}"
            raise ValueError(f"record {record['id']!r} was made on row {index}, which holds {found} in the fetched "
                             f"benchmark ({len(rows)} rows): the predictions are of other data; rerun the evaluate jobs")
        scoring = bench.score_sample(record["prediction"], row)
        changed += scoring.get("score") != record.get("score")
        out.append({**record, "score": scoring.get("score"), "scoring": scoring})
    return out, changed


def score(prediction_files: list[str | Path], benchmark: str, out: str | Path, job: dict,
          overrides: dict | None = None, *, benchmark_manifest: str | Path, scored_out: str | Path | None = None) -> dict:
    """Merge every shard's predictions (in row order), score each sample again with the current scoring code
    (`rescore`, against the rows beside `benchmark_manifest`), write the scored records to `scored_out` (default
    `scored.jsonl` beside `out`) and then metrics.json, each atomically; metrics.json lists the scored records
    (`predictions`: what the report reads) and the shard files they came from (`shards`).

    The benchmark manifest's revision and any subset (VQAv2 `subset_size`) are recorded, so a score on a subset
    is labelled as such.
    """
    from ficoco import benchmarks as benchmark_registry
    from ficoco.benchmarks.fetch import load_local

    out = Path(out)
    scored_out = out.parent / "scored.jsonl" if scored_out is None else Path(scored_out)
    for path in (out, scored_out):                # what a killed earlier attempt's atomic writes left
        remove_stale_temporaries(path)
    records = sorted((r for path in prediction_files for r in read_jsonl(path)), key=lambda r: r["row"])
    ids = [r["id"] for r in records]
    if len(ids) != len(set(ids)):
        raise ValueError(f"{benchmark}: shards overlap: {len(ids) - len(set(ids))} duplicated sample ids")
    bench = benchmark_registry.get(benchmark)
    rows, manifest = load_local(Path(benchmark_manifest).parent, module=benchmark, safe=True)
    code = benchmark_registry.scoring_code_digest(benchmark)
    records, changed = rescore(bench, records, rows, code)
    if changed:
        print(f"ficoco score: {changed} of {len(records)} samples score differently from when they were predicted "
              f"(the scoring code changed since); the scores recomputed now are recorded", file=sys.stderr)
    summary = summarise(bench, records)
    from importlib.metadata import version      # not `import torch`: a score job stays light

    summary["benchmark_data"] = {key: manifest.get(key) for key in
                                 ("id", "config", "split", "resolved_revision", "rows", "checksum", "subset",
                                  "source", "revision", "fallback_used")}
    summary["benchmark_module"] = benchmark        # the report recomputes the headline on resamples with it
    # what the report reads (never a shard left by an older setting), and where those records came from
    summary["predictions"] = [os.path.relpath(scored_out, out.parent)]
    summary["shards"] = [os.path.relpath(path, out.parent) for path in prediction_files]
    summary["scoring_code"] = code
    summary.update(job=job, overrides=overrides or {}, versions={
        "python": platform.python_version(), "torch": version("torch"), "transformers": version("transformers"),
    })
    write_jsonl_atomic(scored_out, records)
    atomic_write_json(out, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ficoco run", description="Run (or resume) one evaluate job shard.")
    parser.add_argument("--model", required=True, help="model name (job key)")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--benchmark", required=True, help="benchmark name (job key)")
    parser.add_argument("--benchmark-module", help="registered benchmark module for prompts and scoring "
                                                   "(default: --benchmark)")
    parser.add_argument("--benchmark-dir", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--phase", help="the method's phase (default: the method's own; a different value is "
                                        "an error)")
    parser.add_argument("--budget", required=True, help="'full', 'adaptive' (an adaptive method's one run) or "
                                                        "average visual tokens per LLM layer")
    parser.add_argument("--budget-label", help="the grid's label for this budget, when it differs: a TFLOPs "
                                               "target ('t2.4') that the grid solved into --budget (default: "
                                               "--budget)")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--out", required=True, help="predictions.jsonl of this shard")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--overrides", default="{}", help="method hyperparameters as JSON")
    parser.add_argument("--options", default="{}", help="benchmark options as JSON")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--template", default=json.dumps("USER: <image>\n{prompt} ASSISTANT:"),
                        help="the prompt template as a JSON string; {prompt} marks the benchmark prompt")
    parser.add_argument("--image-preprocessing", default="none", choices=["none", "pad"])
    parser.add_argument("--calibration", help="a calibrated method's fitted parameters (`ficoco calibrate`'s JSON)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not is_run_label(args.budget):
        parser.error(f"--budget {args.budget!r}: valid values are {RUN_LABELS}")
    problem = run_label_problem(args.budget_label, args.budget)
    if problem:
        parser.error(problem)
    parsed = {}
    for option, kind in (("overrides", dict), ("options", dict), ("template", str)):
        text = getattr(args, option)
        try:
            parsed[option] = json.loads(text)
        except json.JSONDecodeError as error:
            parser.error(f"--{option} {text!r} is not JSON ({error.msg}); give a JSON "
                         f"{'object' if kind is dict else 'string'}")
        if not isinstance(parsed[option], kind):
            parser.error(f"--{option} {text!r} must be a JSON {'object' if kind is dict else 'string'}")
    template = parsed["template"]
    if template.count("<image>") != 1 or "{prompt}" not in template:
        parser.error(f"--template {template!r}: a prompt template holds <image> once and {{prompt}} (the benchmark "
                     f"prompt), e.g. \"USER: <image>\\n{{prompt}} ASSISTANT:\"")
    if args.method == "vanilla" and args.budget != FULL:
        parser.error(f"--method vanilla takes --budget {FULL} (it reduces nothing); got {args.budget}")
    label = args.budget_label or args.budget
    from ficoco import methods
    from ficoco.budget import InfeasibleBudget
    from ficoco.invariants import InvariantViolation

    try:
        phase = methods.get(args.method).phase
    except ValueError as error:
        parser.error(str(error))
    if args.phase not in (None, phase):
        parser.error(f"--phase {args.phase!r} disagrees with method {args.method!r}, whose phase is {phase!r}; "
                     f"omit --phase to use it")
    job = {"model": args.model, "method": args.method, "phase": phase, "budget": label, "run_budget": args.budget,
           "benchmark": args.benchmark, "shard": args.shard, "shards": args.shards}
    # a job is its own process: it never attaches to a W&B service inherited from whatever started it
    # (WANDB_SERVICE), where a killed job's run would stay "in use" and its rerun could not resume it
    os.environ.pop("WANDB_SERVICE", None)
    offline_environment()                       # before the doctor's self-check imports transformers
    from ficoco.doctor import log_environment
    from ficoco.models.selfcheck import FAMILIES, FAMILY_OF_MODEL_TYPE

    # the environment first in every job's log: versions, devices, the self-check of the model's adapter (every
    # family's when its config cannot be read here; loading the model then says why), W&B mode
    config_path = Path(args.model_dir) / "config.json"
    model_type = json.loads(config_path.read_text()).get("model_type", "llava") if config_path.is_file() else None
    families = (FAMILY_OF_MODEL_TYPE[model_type],) if model_type in FAMILY_OF_MODEL_TYPE else tuple(FAMILIES)
    log_environment(lambda line: print(f"ficoco doctor: {line}", file=sys.stderr, flush=True), families=families)
    try:
        evaluate_shard(model_dir=args.model_dir, benchmark_dir=args.benchmark_dir, benchmark=args.benchmark,
                       method=args.method, budget=args.budget, out=args.out, shard=args.shard, shards=args.shards,
                       batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                       overrides=parsed["overrides"], options=parsed["options"], limit=args.limit,
                       template=parsed["template"],
                       image_preprocessing=args.image_preprocessing, job=job, progress=not args.no_progress,
                       benchmark_module=args.benchmark_module, calibration=args.calibration)
    except InvariantViolation as error:          # one line: method, sample, place, expected, found
        print(f"ficoco run: invariant violated: {error}", file=sys.stderr)
        return 1
    except InfeasibleBudget as error:
        print(f"ficoco run: {error}. An image this budget cannot reach is not left out (the score would be of the "
              f"images it can reach, larger ones): choose a budget every image of the benchmark reaches", file=sys.stderr)
        return 1
    return 0


def main_score(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ficoco score", description="Merge shard predictions into metrics.json.")
    parser.add_argument("predictions", nargs="+")
    parser.add_argument("--benchmark", required=True, help="registered benchmark module that scores the records")
    parser.add_argument("--out", required=True)
    parser.add_argument("--job", required=True, help="job keys as JSON")
    parser.add_argument("--overrides", default="{}")
    parser.add_argument("--manifest", required=True,
                        help="the fetched benchmark's manifest.json: its rows rescore the predictions; its revision "
                             "and subset are recorded")
    parser.add_argument("--scored", help="where the scored records go (default: scored.jsonl beside --out)")
    args = parser.parse_args(argv)
    summary = score(args.predictions, args.benchmark, args.out, json.loads(args.job), json.loads(args.overrides),
                    benchmark_manifest=args.manifest, scored_out=args.scored)
    print(f"{args.out}: score {summary['metrics'].get('score')} over {summary['samples']} samples", file=sys.stderr)
    return 0

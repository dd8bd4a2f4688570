# One evaluate job per model x method x budget x benchmark x shard; `score` merges the shards.
# The job keeps shard{i}of{n}/journal.jsonl beside its output (not a Snakemake output): it resumes it
# only when unfinished and written under the same fingerprint (parameters, model and benchmark
# revisions, template, dtype, batch size, versions). A rerun of a finished job ("Params have changed",
# -R, --forcerun) sets the old journal aside in shard{i}of{n}/set-aside/ and recomputes; the log says why.
from ficoco.benchmarks import scoring_code_digest


rule calibrate:
    input:
        model=MODEL_MANIFEST,
        benchmark=lambda wc: BENCHMARK_MANIFEST.format(benchmark=CALIBRATION_BENCHMARK),
    output:
        CALIBRATION,
    log:
        "logs/calibrate/{model}/{method}/b{budget}.log",
    params:
        run_budget=run_budget,
        module=lambda wc: BENCHMARKS[CALIBRATION_BENCHMARK].get("module", CALIBRATION_BENCHMARK),
        rows=config["calibration"]["rows"],
        overrides=overrides_json,
        options=json.dumps(benchmark_options(CALIBRATION_BENCHMARK), sort_keys=True) if CALIBRATION_BENCHMARK else "{}",
        template=lambda wc: json.dumps(MODELS[wc.model]["prompt_template"]),
        dtype=lambda wc: MODELS[wc.model].get("dtype", "float32"),
        preprocessing=lambda wc: MODELS[wc.model].get("image_preprocessing", "none"),
        device=config["device"],
    threads: 1      # see rule evaluate
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m ficoco.cli calibrate --model-dir resources/models/{wildcards.model}"
        " --benchmark-dir resources/benchmarks/{CALIBRATION_BENCHMARK} --benchmark-module {params.module}"
        " --method {wildcards.method} --budget {params.run_budget} --rows {params.rows} --out {output}"
        " --overrides {params.overrides:q} --options {params.options:q} --template {params.template:q}"
        " --dtype {params.dtype} --image-preprocessing {params.preprocessing} --device {params.device} --no-progress"
        " > {log} 2>&1"


rule evaluate:
    input:
        model=MODEL_MANIFEST,
        benchmark=BENCHMARK_MANIFEST,
        calibration=calibration_input,
    output:
        RUN_DIR + "/shard{shard}of{shards}/predictions.jsonl",
    log:
        "logs/evaluate/{model}/{benchmark}/{method}/b{budget}/shard{shard}of{shards}.log",
    params:
        phase=lambda wc: phase_of(wc.method),
        run_budget=run_budget,
        module=lambda wc: BENCHMARKS[wc.benchmark].get("module", wc.benchmark),
        overrides=overrides_json,
        options=lambda wc: json.dumps(benchmark_options(wc.benchmark), sort_keys=True),
        template=lambda wc: json.dumps(MODELS[wc.model]["prompt_template"]),
        dtype=lambda wc: MODELS[wc.model].get("dtype", "float32"),
        preprocessing=lambda wc: MODELS[wc.model].get("image_preprocessing", "none"),
        batch_size=config["batch_size"],
        limit=f"--limit {config['limit']}" if config["limit"] else "",
        device=config["device"],
        calibration=calibration_arg,
    # torch uses OMP_NUM_THREADS threads: two jobs of 2 threads each on 2 cores spin-wait on each
    # other and run tens of times slower than one thread each
    threads: 1
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m ficoco.cli run --model {wildcards.model} --model-dir resources/models/{wildcards.model}"
        " --benchmark {wildcards.benchmark} --benchmark-module {params.module} --benchmark-dir resources/benchmarks/{wildcards.benchmark}"
        " --method {wildcards.method} --phase {params.phase} --budget {params.run_budget} --budget-label {wildcards.budget}"
        " --shard {wildcards.shard} --shards {wildcards.shards} --out {output}"
        " --batch-size {params.batch_size} --device {params.device} --dtype {params.dtype}"
        " --overrides {params.overrides:q} --options {params.options:q} --template {params.template:q}"
        " --image-preprocessing {params.preprocessing} {params.calibration} {params.limit} --no-progress > {log} 2>&1"


def _shard_predictions(wildcards):
    shards = next(r[5] for r in RUNS if r[:3] == (wildcards.model, wildcards.benchmark, wildcards.method)
                  and r[4] == wildcards.budget)
    run_dir = RUN_DIR.format(**wildcards)
    return [f"{run_dir}/shard{index}of{shards}/predictions.jsonl" for index in range(shards)]


rule score:
    input:
        predictions=_shard_predictions,
        benchmark=BENCHMARK_MANIFEST,
    output:
        metrics=RUN_DIR + "/metrics.json",
        scored=RUN_DIR + "/scored.jsonl",       # the records as scored now: what the report reads
    params:
        module=lambda wc: BENCHMARKS[wc.benchmark].get("module", wc.benchmark),
        job=job_json,
        overrides=overrides_json,
        # the code that scores: a change rescores the existing predictions (Snakemake's params trigger)
        code=lambda wc: scoring_code_digest(BENCHMARKS[wc.benchmark].get("module", wc.benchmark)),
    log:
        "logs/score/{model}/{benchmark}/{method}/b{budget}.log",
    shell:
        "{PY} -m ficoco.cli score {input.predictions} --benchmark {params.module} --manifest {input.benchmark}"
        " --out {output.metrics} --scored {output.scored}"
        " --job {params.job:q} --overrides {params.overrides:q} > {log} 2>&1"

# Models and benchmarks into resources/: downloaded at pinned revisions, or built for the toy world.
# Each output is a manifest written last, so an interrupted fetch is redone.
from ficoco.toy import model_code_digest


rule fetch_model:
    output:
        MODEL_MANIFEST,
    wildcard_constraints:
        model=_names_regex(HUB_MODELS),
    log:
        "logs/fetch_model/{model}.log",
    shell:
        "{PY} -m ficoco.cli fetch-model {wildcards.model} --out resources/models/{wildcards.model}"
        " --registry {config[registries][models]} > {log} 2>&1"


rule build_toy_model:
    output:
        MODEL_MANIFEST,
    wildcard_constraints:
        model=_names_regex(TOY_MODELS),
    params:
        seed=config["seed"],
        train=lambda wc: "--train" if MODELS[wc.model].get("train", True) else "--no-train",
        size=lambda wc: MODELS[wc.model].get("size", "default"),
        recipe=lambda wc: MODELS[wc.model].get("recipe", "end-to-end"),
        code=model_code_digest(),       # the toy code that trains it: a change rebuilds (Snakemake's params trigger)
    log:
        "logs/build_toy_model/{model}.log",
    threads: 2
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m ficoco.cli toy build-model --out resources/models/{wildcards.model} --seed {params.seed}"
        " {params.train} --size {params.size} --recipe {params.recipe} > {log} 2>&1"


rule fetch_benchmark:
    output:
        BENCHMARK_MANIFEST,
    wildcard_constraints:
        benchmark=_names_regex(HUB_BENCHMARKS),
    params:
        options=lambda wc: json.dumps(benchmark_options(wc.benchmark), sort_keys=True),
    log:
        "logs/fetch_benchmark/{benchmark}.log",
    shell:
        "{PY} -m ficoco.cli fetch-benchmark {wildcards.benchmark} --out resources/benchmarks/{wildcards.benchmark}"
        " --registry {config[registries][benchmarks]} --options {params.options:q} > {log} 2>&1"


rule build_toy_benchmark:
    output:
        BENCHMARK_MANIFEST,
    wildcard_constraints:
        benchmark=_names_regex(TOY_BENCHMARKS),
    params:
        seed=lambda wc: BENCHMARKS[wc.benchmark].get("seed", config["seed"]),
        rows=lambda wc: BENCHMARKS[wc.benchmark]["rows"],
        split=lambda wc: BENCHMARKS[wc.benchmark].get("split", "test"),
    log:
        "logs/build_toy_benchmark/{benchmark}.log",
    shell:
        "{PY} -m ficoco.cli toy build-benchmark --out resources/benchmarks/{wildcards.benchmark}"
        " --seed {params.seed} --rows {params.rows} --split {params.split} > {log} 2>&1"

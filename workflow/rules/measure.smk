# Latency, peak memory and throughput per (model, method, budget). Speed does not depend on the
# weights, so the model is built from its config.json with random weights.


rule measure:
    input:
        model=MODEL_MANIFEST,
        calibration=calibration_input,
    output:
        "results/measure/{model}/{method}/b{budget}.json",
    params:
        run_budget=run_budget,
        overrides=overrides_json,
        dtype=lambda wc: MODELS[wc.model].get("dtype", "float32"),
        settings=lambda wc: " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(config["measure"].items())
                                     if k not in ("enabled", "methods")),
        device=config["device"],
        calibration=calibration_arg,
    log:
        "logs/measure/{model}/{method}/b{budget}.log",
    threads: 1      # see rule evaluate
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m ficoco.cli measure --model-config resources/models/{wildcards.model}/config.json"
        " --method {wildcards.method} --budget {params.run_budget} --budget-label {wildcards.budget}"
        " --overrides {params.overrides:q} {params.calibration}"
        " --device {params.device} --dtype {params.dtype} {params.settings} --out {output} > {log} 2>&1"

# Every run -> the tidy results table (+ the W&B aggregate run) -> one self-contained HTML page.
# Outputs tagged with report(...) also feed `snakemake --report report/snakemake-report.html`.
REPORT_FIGURES = ["accuracy_vs_flops", "avg_percent_vs_budget", "speedup_vs_flops_reduction",
                  "visual_tokens_per_layer", "latency_breakdown"]


rule aggregate:
    input:
        metrics=METRICS,
        measures=MEASURES,
    output:
        csv=report(SUMMARY, category="Data", caption="../../report/captions/results.rst"),
        parquet=SUMMARY.replace(".csv", ".parquet"),
        samples="results/summary/samples.parquet",
        schedules="results/summary/schedules.csv",
        measure="results/summary/measure.csv",
    log:
        "logs/aggregate.log",
    shell:
        "{PY} -m ficoco.cli aggregate --metrics {input.metrics} --measures {input.measures}"
        " --out results/summary > {log} 2>&1"


rule report:
    input:
        summary=rules.aggregate.output,
        models=expand(MODEL_MANIFEST, model=GRID_MODELS),
        benchmarks=expand(BENCHMARK_MANIFEST, benchmark=GRID_BENCHMARKS),
    output:
        html=REPORT_HTML,
        figures=[report(f"results/report/{name}.png", category="Figures", caption=f"../../report/captions/{name}.rst")
                 for name in REPORT_FIGURES],
        tables=report("results/report/paper_tables.csv", category="Tables",
                      caption="../../report/captions/paper_tables.rst"),
    log:
        "logs/report.log",
    shell:
        "{PY} -m ficoco.cli report --summary results/summary --figures results/report --out {output.html}"
        " --model-manifests {input.models} --benchmark-manifests {input.benchmarks} > {log} 2>&1"

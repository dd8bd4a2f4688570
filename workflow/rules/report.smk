# Every run -> the tidy results table (+ the W&B aggregate run) -> one self-contained HTML page.


rule aggregate:
    input:
        metrics=METRICS,
        measures=MEASURES,
    output:
        csv=SUMMARY,
        parquet=SUMMARY.replace(".csv", ".parquet"),
    log:
        "logs/aggregate.log",
    shell:
        "{PY} -m ficoco.cli aggregate --metrics {input.metrics} --measures {input.measures}"
        " --out results/summary > {log} 2>&1"


rule report:
    input:
        SUMMARY,
    output:
        REPORT_HTML,
    log:
        "logs/report.log",
    shell:
        "{PY} -m ficoco.cli report --summary results/summary --out {output} > {log} 2>&1"

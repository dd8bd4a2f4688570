# ficoco: filter -> correlate -> compress, measured the same way for every method.
#   snakemake --cores 2                                                   # the toy world, offline
#   snakemake --profile slurm --configfile config/paper.yaml              # the paper's grid on Slurm
from snakemake.utils import min_version

min_version("9.0")


# The default config (the toy world) applies only when no --configfile is given: Snakemake would
# otherwise merge it under the given file, and keys it sets (e.g. measure.methods) would leak in.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/report.smk"


# Downloads and light bookkeeping run where Snakemake runs (a cluster's login node has internet).
localrules: all, fetch_model, fetch_benchmark, score, aggregate, report


rule all:
    input:
        REPORT_HTML,


onsuccess:
    print(f"\nficoco: report written to {os.path.abspath(REPORT_HTML)}")

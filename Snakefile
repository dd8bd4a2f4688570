# ficoco: filter -> correlate -> compress, measured the same way for every method.
#   snakemake --cores 2                                                   # the toy world, offline
#   snakemake --profile slurm --configfile config/paper.yaml              # the paper's grid on Slurm (LLaVA-1.5, LLaVA-NeXT)
from snakemake.utils import min_version

min_version("9.0")


# The config is read strictly and validated by ficoco.config before any rule: Snakemake's own reading
# keeps the last of two equal keys, so every problem (file, line, key, bad value, what would be
# valid) stops the run here, in one line, before any job; `--config KEY=VALUE` overrides are checked
# as Snakemake parsed them. (A file given with --configfile that is not YAML at all is refused by
# Snakemake before this runs, without a line number; `ficoco grid --configfile FILE` names it.)
import sys
from pathlib import Path

from ficoco.config import DEFAULT_CONFIG, ConfigError, load_config

try:
    VALIDATED_CONFIG = load_config([str(path) for path in workflow.overwrite_configfiles] or [DEFAULT_CONFIG],
                                   workflow.config_settings.config, Path.cwd())
except ConfigError as error:
    sys.stderr.write(f"{error}\n")
    sys.exit(1)


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

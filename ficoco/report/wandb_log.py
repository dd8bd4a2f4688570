"""The W&B aggregate run: the tidy table, the paper-style tables and every drawn figure.

Goes through `ficoco.tracking.init_run`, so the mode comes from the environment (never `mode=`);
with WANDB_MODE=disabled it returns None and nothing is written.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ficoco.report.plots import Figure


def plain(frame: pd.DataFrame) -> pd.DataFrame:
    """Python objects with None for missing values (W&B tables do not take pandas' NA scalars)."""
    return frame.astype(object).where(frame.notna(), None)


def log_report(results: pd.DataFrame, paper_tables: pd.DataFrame, figures: list[Figure],
               run_dir: Path, config: dict) -> bool:
    """Log to one run (job_type "aggregate"); False when tracking is disabled."""
    from ficoco import tracking

    run = tracking.init_run(job_type="aggregate", name="aggregate", group="summary", config=config, run_dir=run_dir)
    if run is None:
        return False
    import wandb

    try:
        logged = {"results": wandb.Table(dataframe=plain(results)),
                  "paper_tables": wandb.Table(dataframe=plain(paper_tables))}
        logged.update({f"figures/{f.key}": wandb.Image(str(f.path), caption=f.title) for f in figures if not f.note})
        run.log(logged)
        run.summary["jobs"] = int(results["headline"].fillna(False).astype(bool).sum())
    finally:
        tracking.finish(run)
    return True

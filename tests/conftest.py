"""Every test runs offline, on the CPU, with W&B off unless a test turns it on."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

import pytest  # noqa: E402

from pipeline import copy_workflow, run_golden  # noqa: E402


@pytest.fixture
def repo_copy(tmp_path):
    """The workflow files (Snakefile, workflow/, config/, slurm/, report/) copied into a scratch directory."""
    return copy_workflow(tmp_path / "repo")


@pytest.fixture(scope="session")
def golden_run(tmp_path_factory):
    """(repo, config) of the golden toy grid, run once per session (tests/pipeline.py)."""
    repo = tmp_path_factory.mktemp("golden") / "repo"
    return repo, run_golden(repo)

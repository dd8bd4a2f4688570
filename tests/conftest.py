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

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_copy(tmp_path):
    """The workflow files (Snakefile, workflow/, config/, slurm/) copied into a scratch directory."""
    target = tmp_path / "repo"
    target.mkdir()
    shutil.copy(REPO_ROOT / "Snakefile", target)
    for name in ("workflow", "config", "slurm", "report"):
        if (REPO_ROOT / name).exists():
            shutil.copytree(REPO_ROOT / name, target / name, ignore=shutil.ignore_patterns("*.html", "__pycache__"))
    return target

"""Every test runs offline, on the CPU, with W&B off unless a test turns it on."""
import fcntl
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# under pytest-xdist (`make test` runs two workers) one thread each, so the workers do not fight for the cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

import pytest  # noqa: E402

from pipeline import copy_workflow, run_golden  # noqa: E402


@pytest.fixture
def repo_copy(tmp_path):
    """The workflow files (Snakefile, workflow/, config/, slurm/, report/) copied into a scratch directory."""
    return copy_workflow(tmp_path / "repo")


@pytest.fixture(scope="session")
def golden_run(tmp_path_factory):
    """(repo, config) of the golden toy grid (tests/pipeline.py), run once per test session. Under
    pytest-xdist the workers share it: the first to ask runs it under a file lock, the others wait for it
    and reuse it (an xdist worker's base temporary folder is a subfolder of the session's)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    finished = shared / "golden" / "config-path.txt"
    with open(shared / "golden.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                  # released when the file closes
        if not finished.exists():
            config = run_golden(shared / "golden" / "repo")
            finished.write_text(config)
    return shared / "golden" / "repo", finished.read_text()

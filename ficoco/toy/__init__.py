"""The embedded toy world: a synthetic benchmark (shapes.py) and a tiny LLaVA (model.py) trained on it
(clip.py, train.py), built by `ficoco toy` (cli.py)."""
from pathlib import Path

from ficoco.fingerprint import source_digest

# the modules whose code decides a built toy model's weights
MODEL_MODULES = ("model.py", "shapes.py", "clip.py", "train.py", "cli.py")   # cli.py: the build's stages


def model_code_digest() -> str:
    """16 hex digits of sha256 over MODEL_MODULES' source: part of a build's request (a change rebuilds the model,
    never reuses one trained by other code), and a param of the Snakemake rule (a change reruns it)."""
    return source_digest(Path(__file__).parent, MODEL_MODULES)

"""The method/adapter contract (ficoco/contract.py) as import rules: methods import the contract,
`Method` (methods/base.py) and the shared pieces (methods/shared.py), never another method's module
or an adapter; adapters import the contract, never the methods package; the contract imports neither."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ficoco"
METHOD_HELPERS = {"ficoco.methods.base", "ficoco.methods.shared"}


def runtime_imports(path: Path) -> list[str]:
    """Modules `path` imports outside `if TYPE_CHECKING:` blocks (function-level imports included)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
            if node.module == "ficoco":                       # `from ficoco import methods`
                found += [f"ficoco.{alias.name}" for alias in node.names]
    return found


@pytest.mark.parametrize("path", sorted(p for p in (PACKAGE / "methods").glob("*.py")
                                        if p.name not in ("__init__.py", "cli.py")), ids=lambda p: p.name)
def test_a_method_module_imports_no_other_method_and_no_adapter(path):
    imports = runtime_imports(path)
    borrowed = [name for name in imports if name.startswith("ficoco.methods") and name not in METHOD_HELPERS]
    adapters = [name for name in imports if name.startswith("ficoco.models")]
    assert not borrowed and not adapters, f"{path.name} imports {borrowed + adapters}"


@pytest.mark.parametrize("path", sorted(p for p in (PACKAGE / "models").glob("*.py") if p.name != "selfcheck.py"),
                         ids=lambda p: p.name)
def test_an_adapter_module_imports_no_method(path):
    """(selfcheck.py runs one registered method through the adapter: it is the guard's test, not an adapter.)"""
    imports = runtime_imports(path)
    assert not [name for name in imports if name.startswith("ficoco.methods")], f"{path.name}: {imports}"


def test_the_contract_imports_neither_side():
    imports = runtime_imports(PACKAGE / "contract.py")
    assert not [name for name in imports if name.startswith(("ficoco.methods", "ficoco.models"))], imports


def test_loading_the_llava_adapter_loads_no_method():
    code = ("import sys, ficoco.models.llava; "
            "print(sorted(m for m in sys.modules if m.startswith('ficoco.methods')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_an_adapter_refuses_a_name_where_a_method_belongs():
    from helpers_tiny import tiny_llava

    from ficoco.models.llava import install_llava

    with pytest.raises(TypeError, match=r"'ficoco-v' is not a Method; ficoco.apply resolves a name"):
        install_llava(tiny_llava(), "ficoco-v", 4)


# ---------------------------------------------------------------------------------------------
# image layouts and what methods need of them

def layout(crops=(((24, 24), 1),), positions="rope-1d", layout_tokens=0, delivered=False):
    from ficoco.contract import CropLayout, ImageLayout

    return ImageLayout(crops=tuple(CropLayout(grid, prefix) for grid, prefix in crops), prefix_delivered=delivered,
                       layout_tokens=layout_tokens, positions=positions)


def test_a_layout_counts_its_visual_tokens():
    assert layout().visual_tokens == 576
    assert layout(delivered=True).visual_tokens == 577
    # LLaVA-NeXT-like: a base image and four crops of 24x24, one newline token per row of the 48x48 crops' grid
    assert layout(crops=(((24, 24), 1),) * 5, layout_tokens=48).visual_tokens == 5 * 576 + 48


def test_llava_dims_describe_their_layout():
    from ficoco.config import model_dims
    from ficoco.flops import dims_for

    for dims in (dims_for(None, "llava-1.5-7b"), dims_for(None, "llava-1.5-13b"),
                 model_dims("toy-llava", {"shape": "toy", "size": "default"})):
        assert dims.image_layout().visual_tokens == dims.visual_tokens
        assert dims.image_layout().crops[0].grid == (dims.grid_side, dims.grid_side)


def test_every_method_runs_on_llava_1_5():
    from ficoco import methods
    from ficoco.flops import dims_for

    dims = dims_for(None, "llava-1.5-7b")
    assert {name: methods.get(name).unmet_needs(dims) for name in methods.names()} == {
        name: [] for name in methods.names()}


def test_unmet_needs_name_what_is_missing():
    from ficoco.contract import Needs, unmet_needs

    no_cls = layout(crops=(((36, 28), 0),), positions="mrope-3d")
    assert unmet_needs(Needs(), no_cls) == []
    assert unmet_needs(Needs(cls_first=True, square_grid=True, positions=("rope-1d",)), no_cls) == [
        "a CLS token first in the vision tower (this model's tower has [0] prefix tokens)",
        "a square patch grid (this model's: [(36, 28)])",
        "rope-1d positions in the LLM (this model uses mrope-3d)"]


def test_a_method_a_model_cannot_run_is_refused_before_any_job(monkeypatch):
    """A model without a CLS token (as Qwen2-VL's tower) refuses the CLS-reading methods in the config
    and in `Method.plan`, naming what is missing and the methods it can run."""
    from ficoco import methods
    from ficoco.config import ConfigError, validate
    from ficoco.dims import ModelDims

    monkeypatch.setattr(ModelDims, "image_layout", lambda dims: layout(crops=(((24, 24), 0),)))
    config = {"models": ["llava-1.5-7b"], "methods": ["vanilla", "fastv", "evit"], "budgets": [128],
              "benchmarks": ["gqa"]}
    with pytest.raises(ConfigError, match=r"methods\[2\]: evit cannot run on model llava-1.5-7b: it needs a CLS "
                                          r"token first in the vision tower .*valid: the methods this model can run "
                                          r"\(vanilla, ficoco-l, .*divprune, cdpruner, fitprune\)"):
        validate(config)
    validate({**config, "methods": ["vanilla", "fastv"]})
    from ficoco.flops import dims_for

    with pytest.raises(ValueError, match="evit cannot run on this model: it needs a CLS token first"):
        methods.get("evit").plan(dims_for(None, "llava-1.5-7b"), 128)

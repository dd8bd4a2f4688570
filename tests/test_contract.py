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

"""The shape of the code: config.py at the bottom, a shallow import graph, a network package that needs neither the
config nor yacs, and lists of valid values that the modules using them implement."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_interp_mode

import config
from data.datasets import CIFAR_KINDS, FOLDER_LAYOUTS
from data.robustness import ROBUSTNESS_LAYOUTS
from models import StripMLPNet
from utils import RunError

REPO = Path(__file__).resolve().parents[1]
MAX_DEPTH = 5
# The project's own modules, as nodes of its import graph: each top-level module, and each package as one node
# (tools/ and tests/ aside: they sit on top and import what they need).
PACKAGES = ("data", "models")
PROJECT = sorted({path.stem for path in REPO.glob("*.py")} | set(PACKAGES))
ERROR_MODULE = RunError.__module__


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(path: Path) -> set[str]:
    """The top-level names of what a file imports when it runs: every import statement, in functions too, except
    those under ``if TYPE_CHECKING:`` (type hints only) and relative ones (within its own package)."""
    names: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"))]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        stack.extend(ast.iter_child_nodes(node))
    return names


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports at run time."""
    graph: dict[str, set[str]] = {name: set() for name in PROJECT}
    files = [(path.stem, path) for path in REPO.glob("*.py")]
    files += [(package, path) for package in PACKAGES for path in (REPO / package).glob("*.py")]
    for node, path in files:
        graph[node] |= (runtime_imports(path) & set(PROJECT)) - {node}
    return graph


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest import chain, modules as nodes; a cycle fails the test, naming it."""
    memo: dict[str, list[str]] = {}

    def chain(node: str, walk: tuple[str, ...]) -> list[str]:
        if node in walk:
            pytest.fail(f"import cycle: {' -> '.join([*walk[walk.index(node):], node])}")
        if node not in memo:
            below = [chain(child, (*walk, node)) for child in sorted(graph[node])]
            memo[node] = [node, *max(below, key=len, default=[])]
        return memo[node]

    return max((chain(node, ()) for node in sorted(graph)), key=len)


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter started in the checkout; returns its stdout."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_importing_config_loads_no_other_project_module() -> None:
    loaded = run_python(f"import sys, config; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({PROJECT})))")
    assert loaded.strip() == str(sorted({"config", ERROR_MODULE}))


def test_the_error_module_and_config_import_nothing_else_of_ours() -> None:
    graph = import_graph()
    assert graph[ERROR_MODULE] == set()
    assert graph["config"] == {ERROR_MODULE}


def test_the_import_graph_is_at_most_five_modules_deep() -> None:
    chain = longest_chain(import_graph())
    assert len(chain) <= MAX_DEPTH, f"{len(chain)} modules deep: {' -> '.join(chain)}"


def test_the_graph_reads_imports_as_python_runs_them(tmp_path: Path) -> None:
    """Function-level imports count; type-hint-only ones do not; the depth check sees a chain and a cycle."""
    source = tmp_path / "example.py"
    source.write_text("from typing import TYPE_CHECKING\nimport os.path\nif TYPE_CHECKING:\n    import engine\n"
                      "else:\n    import data\n\ndef later():\n    from models.build import build_model\n"
                      "from . import sibling\n")
    assert runtime_imports(source) == {"typing", "os", "data", "models"}
    assert longest_chain({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"c"}}) == ["a", "b", "c"]
    with pytest.raises(pytest.fail.Exception, match="import cycle: a -> b -> a"):
        longest_chain({"a": {"b"}, "b": {"a"}})


def test_models_import_neither_config_nor_yacs() -> None:
    imported = set().union(*(runtime_imports(path) for path in (REPO / "models").glob("*.py")))
    assert not imported & {"config", "yacs", "termcolor", "data", "engine", "checkpoint"}


def test_hubconf_builds_a_network_without_yacs_termcolor_or_safetensors() -> None:
    """torch.hub loads hubconf.py with torch, timm and the models package alone (None in sys.modules makes an
    import fail as if the package were not installed)."""
    code = f"""
import sys
sys.modules["yacs"] = sys.modules["termcolor"] = sys.modules["safetensors"] = None
import torch
model = torch.hub.load({str(REPO)!r}, "strip_mlp_tiny_light", source="local", num_classes=3, img_size=32)
assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)
print(sorted({{m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}} & set({PROJECT})))
"""
    assert run_python(code).strip() == str(sorted({"compat", "models", "utils"}))  # torch.hub drops hubconf


def test_each_list_of_valid_values_is_what_its_module_implements() -> None:
    """config.py declares the lists; the modules that read the keys take exactly these values."""
    assert config.DATASETS == (*FOLDER_LAYOUTS, *CIFAR_KINDS, *ROBUSTNESS_LAYOUTS)
    assert config.MODEL_TYPES == ("strip_mlp",)
    for schedule in config.DROP_PATH_SCHEDULES:
        assert isinstance(StripMLPNet(img_size=32, embed_dim=8, layers=(1, 1, 2, 1), drop_path_schedule=schedule),
                          StripMLPNet)
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in config.AMP_DTYPES)
    for interpolation in config.INTERPOLATIONS:
        str_to_interp_mode(interpolation)
    for mode in config.RANDOM_ERASING_MODES:
        RandomErasing(1.0, mode=mode, device="cpu")(torch.zeros(1, 3, 8, 8))
    for mode in config.MIXUP_MODES:
        Mixup(mixup_alpha=1.0, mode=mode, num_classes=2)(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))

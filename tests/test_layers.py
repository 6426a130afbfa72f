"""The package's layers (docs/design.md §6), read from the import statements: nothing imports a
layer below it, the methods under ``metaste.optim`` do not import one another (the calibrated
surrogate, which probes with FOGZO's estimate, is the one declared exception), and no two modules
import each other at load time."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "metaste"

METHODS = ("fogzo", "hyper", "pege", "jacquant", "calibrated")
RUNNERS = ("metaste.bench", "metaste.curriculum", "metaste.integrations", "metaste.adapters")
#: a method → the other methods it may import
METHOD_IMPORTS = {"calibrated": {"fogzo"}}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, top_level_only: bool) -> set[str]:
    """The metaste modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``);
    ``top_level_only``: the statements run at load time (not in a function or a TYPE_CHECKING
    block)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("metaste")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("metaste"):
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & set(MODULES)
            out |= subs or {target}
            if len(subs) < len(node.names):
                out.add(target)
    return out


def _method_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 3 and parts[1] == "optim" and parts[2] in METHODS:
        return parts[2]
    return None


def _offending(module: str, target: str) -> bool:
    if module.startswith("metaste.quant"):
        return target.startswith(("metaste.optim",) + RUNNERS)
    if module.startswith("metaste.optim"):
        if target.startswith(RUNNERS):
            return True
        if module.startswith("metaste.optim.core"):
            return _method_of(target) is not None
        mine, theirs = _method_of(module), _method_of(target)
        return mine is not None and theirs not in (None, mine) and theirs not in METHOD_IMPORTS.get(mine, ())
    return False


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_layer_below_it_or_another_method(module):
    bad = sorted(t for t in _imports(module, top_level_only=False) if _offending(module, t))
    assert not bad, f"{module} imports {bad}, against the layers of docs/design.md §6"


def test_the_layer_check_sees_an_upward_import():
    assert _offending("metaste.quant.surrogates", "metaste.optim.core.wrapper")
    assert _offending("metaste.optim.core.probe", "metaste.optim.fogzo.smoothing")
    assert _offending("metaste.optim.pege.optimizer", "metaste.optim.jacquant.passes")
    assert not _offending("metaste.optim.calibrated", "metaste.optim.fogzo.estimator")
    assert not _offending("metaste.optim.fogzo.optimizer", "metaste.optim.core.wrapper")


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of ``graph`` (module → the modules it imports), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str]:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return path[path.index(t) :] + [t]
            if t not in state and (found := visit(t, path + [t])):
                return found
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return []


def test_the_circle_check_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_two_modules_import_each_other_at_load_time():
    graph = {m: {t for t in _imports(m, top_level_only=True) if t in MODULES and t != m} for m in MODULES}
    circle = _cycle(graph)
    assert not circle, f"import circle: {' -> '.join(circle)}"

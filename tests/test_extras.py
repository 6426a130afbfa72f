"""metaste.extras: a missing extra is named, with its install command, before any work."""

import ast
import importlib.util
from pathlib import Path

import pytest

import metaste

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_a_missing_extra_names_its_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "matplotlib" else real(m, *a))
    assert metaste.extras.missing("data", "plot") == ["plot"]
    with pytest.raises(
        ImportError, match=r"pip install 'metaste\[plot\]'.*missing: matplotlib|matplotlib.*metaste\[plot\]"
    ):
        metaste.extras.require("data", "plot")


def test_installed_extras_pass_and_unknown_ones_are_refused():
    metaste.extras.require("plot")
    with pytest.raises(ValueError, match="unknown extra"):
        metaste.extras.require("plots")


def test_all_installs_every_extra_the_examples_need():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    line = next(x for x in text.splitlines() if x.startswith("all = "))
    assert all(e in line for e in metaste.extras.EXTRAS)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_every_example_checks_its_extras_first_thing_in_main(path):
    tree = ast.parse(path.read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    first = main.body[0]
    call = first.value if isinstance(first, ast.Expr) else None
    assert call is not None and ast.unparse(call.func) == "metaste.extras.require"
    needed = {"plt": "plot", "matplotlib": "plot", "load_mnist5k": "data", "lightning": "lightning"}
    source = path.read_text()
    asked = {a.value for a in call.args}
    for word, extra in needed.items():
        if word in source:
            assert extra in asked, f"{path.name} uses {word} but does not require [{extra}]"

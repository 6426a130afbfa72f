"""The file maps a newcomer reads — docs/design.md's concept → file table and the README's
Layout — name only paths that exist, and every module of the package appears in the design map."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _design_paths() -> set[str]:
    """Every metaste/ file docs/design.md names: full paths, and the files a row names beside
    its folder (`metaste/bench/` (`methods.py`, …))."""
    text = (ROOT / "docs" / "design.md").read_text()
    paths = set(re.findall(r"`(metaste/[\w/]+\.py)`", text))
    for row in text.splitlines():
        for folder in re.findall(r"`(metaste/[\w/]+/)`", row):
            paths |= {folder + name for name in re.findall(r"`(\w+\.py)`", row)}
    return paths


def test_every_path_the_design_map_names_exists():
    paths = _design_paths()
    assert paths, "docs/design.md names no metaste/ path"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/design.md names paths that do not exist: {missing}"


def test_every_module_is_on_the_design_map():
    named = _design_paths()
    modules = {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "metaste").rglob("*.py") if p.name != "__init__.py"
    }
    absent = sorted(modules - named)
    assert not absent, f"modules missing from docs/design.md §6: {absent}"


def test_every_file_the_readme_layout_names_exists():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout") :]
    block = layout[layout.index("```") + 3 : layout.index("```", layout.index("```") + 3)]
    folders: list[str] = []  # the folder of each indentation level above the line
    missing = []
    for line in block.splitlines():
        m = re.match(r"(\s+)(\w+)/(\s|$)", line)
        indent = len(line) - len(line.lstrip())
        if m:
            folders = folders[: len(m.group(1)) // 2 - 1] + [m.group(2)]
        elif re.match(r"\s+\w+\.py\b", line) and indent <= 2 * len(folders):  # a file beside folders
            folders = folders[: indent // 2 - 1]
        if not folders:
            continue
        here = ROOT / "metaste" / Path(*folders)
        for name in re.findall(r"\b(\w+\.py)\b", line):
            if not (here / name).exists():
                missing.append(f"{'/'.join(folders)}/{name}")
    assert not missing, f"README Layout names files that do not exist: {missing}"

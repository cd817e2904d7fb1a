"""Imports only point down: every import inside depn_serve and depn_serve_patches respects the layer table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LAYERS: dict[str, int] = {
    "depn_serve.core": 0,
    "depn_serve.artifacts": 1,
    "depn_serve.editing": 2,
    "depn_serve.serving": 2,
    "depn_serve.detection": 3,
    "depn_serve.evaluation": 3,
    "depn_serve.selection": 4,
    "depn_serve.testbed": 5,
    "depn_serve.study": 6,
    "depn_serve_patches": 7,
    "depn_serve.serving.server.serve": 8,  # starts vLLM, so sits above the vLLM adapter depn_serve_patches
    "depn_serve.bench": 9,
    "depn_serve.demo": 9,
    "depn_serve.cli": 10,
}
"""Group (module-name prefix) -> layer, lowest first; a module belongs to the group of its longest matching prefix.
A module may import modules of its own group freely, and otherwise only modules whose group is in a strictly lower
layer; the bare top-level package `depn_serve` may be imported from anywhere. A module that matches no prefix is an
error too, so every new module or package must be placed in this table."""

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"depn_serve": ROOT / "depn_serve", "depn_serve_patches": ROOT / "patches"}  # import name -> source folder
TOP = "depn_serve"  # the bare package: importable from anywhere, so below every layer

Group = tuple[str, int]


def group_of(module: str) -> Group | None:
    """(prefix, layer) of the longest prefix in LAYERS matching `module`, or None if none does."""
    if module == TOP:
        return TOP, -1
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        return None
    prefix = max(matches, key=len)
    return prefix, LAYERS[prefix]


def module_name(path: Path) -> str:
    """Dotted module name of a source file, e.g. patches/vllm_0_32/worker.py -> depn_serve_patches.vllm_0_32.worker."""
    for package, folder in PACKAGES.items():
        if path.is_relative_to(folder):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(f"{path} is outside {list(PACKAGES.values())}")


def project_imports(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import of a project module in `source`, at any depth.

    `from X import y` counts as importing X.y when that is a module in `known`, else as importing X.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.append((node.lineno, name if name in known else base))
    in_project = [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]
    return sorted(dict.fromkeys(in_project))


def violations(path: str, module: str, imports: list[tuple[int, str]]) -> list[str]:
    """One readable line per import of `module` (in file `path`) that breaks the layer rule."""
    own = group_of(module)
    if own is None:
        return [f"{path}:1  {module}: not in the layer table"]
    problems = []
    for line, name in imports:
        other = group_of(name)
        where = f"{path}:{line}  {module} ({own[0]}, {own[1]}) -> {name}"
        if other is None:
            problems.append(f"{where}: not in the layer table")
        elif other[0] != own[0] and other[1] >= own[1]:
            problems.append(f"{where} ({other[0]}, {other[1]})")
    return problems


def test_imports_only_point_down() -> None:
    files = sorted(path for folder in PACKAGES.values() for path in folder.rglob("*.py"))
    known = {module_name(path) for path in files}
    problems: list[str] = []
    for path in files:
        module = module_name(path)
        imports = project_imports(path.read_text(), module, path.name == "__init__.py", known)
        problems += violations(str(path.relative_to(ROOT)), module, imports)
    if problems:
        pytest.fail(f"{len(problems)} import(s) break the layering:\n" + "\n".join(problems), pytrace=False)


def test_checker_on_synthetic_sources() -> None:
    known = {
        "depn_serve.cli", "depn_serve.core.x", "depn_serve.serving.server", "depn_serve.serving.server.serve",
        "depn_serve_patches.vllm_0_32.engine", "depn_serve_patches.vllm_0_32.worker",
    }
    # An upward import hidden in a function is caught; imports of the bare package and of other projects are not.
    source = "import os\nimport depn_serve\ndef f():\n    from depn_serve import cli\n"
    imports = project_imports(source, "depn_serve.core.x", False, known)
    assert imports == [(2, "depn_serve"), (4, "depn_serve.cli")]
    assert violations("x.py", "depn_serve.core.x", imports) == [
        "x.py:4  depn_serve.core.x (depn_serve.core, 0) -> depn_serve.cli (depn_serve.cli, 10)"
    ]
    # Relative imports resolve against the module's package; downward and same-group imports pass.
    source = "from . import engine\nfrom .engine import Hooks\nfrom .. import register\nfrom depn_serve.core.x import y\n"
    imports = project_imports(source, "depn_serve_patches.vllm_0_32.worker", False, known)
    assert imports == [
        (1, "depn_serve_patches.vllm_0_32.engine"), (2, "depn_serve_patches.vllm_0_32.engine"),
        (3, "depn_serve_patches"), (4, "depn_serve.core.x"),
    ]
    assert violations("w.py", "depn_serve_patches.vllm_0_32.worker", imports) == []
    # In a package's __init__, `.` is the package itself; the longest prefix wins (serve is layer 8, not 2).
    imports = project_imports("from .server import serve\n", "depn_serve.serving", True, known)
    assert imports == [(1, "depn_serve.serving.server.serve")]
    assert violations("s.py", "depn_serve.serving", imports) == [
        "s.py:1  depn_serve.serving (depn_serve.serving, 2) -> depn_serve.serving.server.serve"
        " (depn_serve.serving.server.serve, 8)"
    ]
    # Another group of the same layer is not strictly lower.
    assert violations("d.py", "depn_serve.detection.ig", [(5, "depn_serve.evaluation.run")]) == [
        "d.py:5  depn_serve.detection.ig (depn_serve.detection, 3) -> depn_serve.evaluation.run (depn_serve.evaluation, 3)"
    ]
    # A module outside the table fails on its own, and so does an import of one.
    assert violations("foo.py", "depn_serve.foo", []) == ["foo.py:1  depn_serve.foo: not in the layer table"]
    assert violations("x.py", "depn_serve.core.x", [(3, "depn_serve.foo")]) == [
        "x.py:3  depn_serve.core.x (depn_serve.core, 0) -> depn_serve.foo: not in the layer table"
    ]

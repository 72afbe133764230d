"""Imports go one way: runtime <- graph_ops <- export <- scripts; tests import the project and conftest.

runtime serves an engine without torch or the exporter, so it imports none of the others; graph_ops
rewrites graphs for the exporter; scripts drive everything. No package imports tests, and a test module
shares helpers through tests/conftest.py only, never by importing another test module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("runtime", "graph_ops", "export", "calibration", "scripts")  # each may import those before it, never after


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                package = path.relative_to(ROOT).parent.parts
                base = package[:len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names if module in ("tests", *LAYERS)]
    return found


def violation(package: str, module: str) -> str | None:
    top = module.split(".")[0]
    if package in LAYERS:
        if top == "tests" or top == "conftest" or top.startswith("test_"):
            return "a package imports tests"
        if top in LAYERS and LAYERS.index(top) > LAYERS.index(package):
            return f"{package} imports {top}, which comes after it ({' <- '.join(LAYERS)})"
    if package == "tests":
        name = module.removeprefix("tests.")
        if (top == "tests" or top.startswith("test_")) and module not in ("tests", "tests.conftest") \
                and not name.startswith("conftest"):
            return "a test module imports another test module (share helpers through tests/conftest.py)"
    return None


def project_files() -> list[Path]:
    return sorted(p for d in (*LAYERS, "tests") for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_the_rule_itself():
    assert violation("runtime", "export.loading") and violation("graph_ops", "scripts.bench")
    assert violation("export", "scripts") and violation("scripts", "tests.conftest")
    assert violation("tests", "tests.test_reference") and violation("tests", "test_reference")
    assert not violation("export", "runtime.mesa") and not violation("scripts", "graph_ops.pipeline")
    assert not violation("tests", "tests.conftest") and not violation("tests", "conftest")
    assert not violation("tests", "scripts.fixtures")
    assert violation("export", "calibration.data") and not violation("calibration", "export.onnx_export")


@pytest.mark.parametrize("package", [*LAYERS, "tests"])
def test_imports_go_one_way(package):
    files = [p for p in project_files() if p.relative_to(ROOT).parts[0] == package]
    assert files
    bad = [f"{p.relative_to(ROOT)}:{line}: {module}: {why}" for p in files for line, module in imports(p)
           if (why := violation(package, module))]
    assert not bad, "\n".join(bad)

"""No function in dinocache/ is over 60 lines (signature and docstring included), so each reads
in one screen and does one job (issue 22 item 4)."""

import ast
from pathlib import Path

import dinocache

MAX_LINES = 60
PACKAGE = Path(dinocache.__file__).parent


def function_lengths(root: Path) -> dict[str, int]:
    """'module.Class.function' -> lines, for every function and method (nested ones too)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts)

        def walk(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[prefix + child.name] = child.end_lineno - child.lineno + 1
                    walk(child, prefix + child.name + ".")
                elif isinstance(child, ast.ClassDef):
                    walk(child, prefix + child.name + ".")

        walk(ast.parse(path.read_text(), str(path)), module + ".")
    return found


def test_no_function_is_over_60_lines():
    lengths = function_lengths(PACKAGE)
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not too_long, "over 60 lines: " + ", ".join(f"{name} ({n})" for name, n in sorted(too_long.items()))


def test_the_count_includes_signature_and_docstring(tmp_path):
    (tmp_path / "m.py").write_text(
        "def f(\n    a,\n    b,\n):\n    '''doc\n\n    more'''\n    return a\n\n\nclass C:\n    def g(self):\n"
        "        def inner():\n            pass\n"
    )
    assert function_lengths(tmp_path) == {"m.f": 8, "m.C.g": 3, "m.C.g.inner": 2}

"""The parts issue 22 asked for stay parts: verify's pieces take one options object instead of
7-9 arguments, and extract records a failure in one place only."""

import ast
from pathlib import Path

import dinocache

PACKAGE = Path(dinocache.__file__).parent
# verify's public entry points keep their keyword arguments; state.find_damage's entry is B's to change
PUBLIC = {"verify_paths", "verify_cache", "_listed_shard_findings"}


def functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_verify_parts_take_an_options_object_not_long_argument_lists():
    long = []
    parts = sorted((PACKAGE / "verify").glob("*.py"))
    assert len(parts) >= 8  # paths, bytescan, cache, listed, table, source, recompute, loose, remote, ...
    for path in parts:
        for fn in functions(ast.parse(path.read_text())):
            names = [a.arg for a in fn.args.args + fn.args.kwonlyargs if a.arg != "self"]
            count = len(names)
            if count > 6 and fn.name not in PUBLIC:
                long.append(f"{path.name}:{fn.name} ({count})")
    assert not long, long


def test_extract_records_failures_only_through_run_failures():
    """state.add_failure and writes into state.failures happen in RunFailures.record alone."""
    tree = ast.parse((PACKAGE / "extract.py").read_text())
    owner = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "RunFailures")
    inside = {id(n) for n in ast.walk(owner)}
    outside = []
    for node in ast.walk(tree):
        if id(node) in inside:
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_failure":
            outside.append(f"line {node.lineno}: add_failure")
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Subscript) and ast.unparse(target.value).endswith(
                    ("failures", "failures_this_run")
                ):
                    outside.append(f"line {node.lineno}: {ast.unparse(target)}")
    assert not outside, outside


def test_the_forward_and_its_oom_halving_live_in_forward_py():
    extract = (PACKAGE / "extract.py").read_text()
    assert "OutOfMemoryError" not in extract and "stored_features" not in extract
    assert "OutOfMemoryError" in (PACKAGE / "forward.py").read_text()

"""The code's own shape rules, checked on its source: settings travel as keywords or one typed object
(never a long positional list), and the training loop's functions stay short enough to read at once."""

from __future__ import annotations

import ast
from pathlib import Path

import vlmtrain

PACKAGE = Path(vlmtrain.__file__).parent
MAX_POSITIONAL = 6  # `self` and `cls` not counted
MAX_LINES = 50


def functions(folder: Path) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}", node))
    return found


def positional(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    names = [arg.arg for arg in (*node.args.posonlyargs, *node.args.args)]
    return len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)


def test_no_function_takes_more_than_six_positional_parameters():
    long = [f"{where} ({positional(node)})" for where, node in functions(PACKAGE) if positional(node) > 6]
    assert not long, f"more than {MAX_POSITIONAL} positional parameters (make the rest keyword-only): {long}"


def test_no_function_in_the_training_loop_is_longer_than_fifty_lines():
    long = [
        f"{where} ({node.end_lineno - node.lineno + 1} lines)"
        for where, node in functions(PACKAGE / "train")
        if node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert not long, f"functions over {MAX_LINES} lines in vlmtrain/train: {long}"


def test_the_checks_see_a_long_function():
    """The walk finds what it looks for (a check that cannot fail proves nothing)."""
    source = "def f(a, b, c, d, e, f, g):\n" + "    x = 1\n" * MAX_LINES
    (node,) = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)]
    assert positional(node) == 7 and node.end_lineno - node.lineno + 1 > MAX_LINES

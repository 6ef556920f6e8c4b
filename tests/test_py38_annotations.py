"""Annotations must evaluate on Python 3.8: `typing.get_type_hints` (pydantic, dataclass tools) evaluates
them even under `from __future__ import annotations`, and on 3.8 `tuple[int, int]` or `int | None` there
raises TypeError. Checked statically so the test means the same on every Python it runs on."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_GENERICS = {"tuple", "list", "dict", "set", "frozenset", "type"}


def _annotations(tree: ast.AST) -> Iterator[ast.AST]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                if a is not None and a.annotation is not None:
                    yield a.annotation
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


def _problems(source: str) -> List[str]:
    out = []
    for ann in _annotations(ast.parse(source)):
        for node in ast.walk(ann):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) \
                    and node.value.id in BUILTIN_GENERICS:
                out.append("line %d: %s[...] (use typing.%s)" % (node.lineno, node.value.id, node.value.id.title()))
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
                out.append("line %d: X | Y (use typing.Optional / Union)" % node.lineno)
    return out


def test_the_checker_finds_what_breaks_on_3_8():
    assert _problems("def f(x: int) -> tuple[int, int]: ...")
    assert _problems("x: Optional[dict[str, int]] = None")
    assert _problems("def f(x: int | None): ...")
    assert not _problems("def f(x: Tuple[int, int], y: 'Dict[str, int]' = {}) -> Optional[List[int]]: ...")


def test_no_annotation_in_the_packages_needs_python_3_9():
    bad = []
    for pkg in ("edge_agent", "fleet"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            bad += ["%s %s" % (path.relative_to(ROOT), p) for p in _problems(path.read_text(encoding="utf-8"))]
    assert bad == []

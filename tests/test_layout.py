"""Issue 22: the package's import graph has no circle (imports inside functions count: a circle there still means
neither side can be read or tested alone), each module imports alone in a fresh interpreter, and modules and
functions stay within the sizes the layout promises."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "aotpack"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The aotpack modules ``name`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name and m != "aotpack"}


def test_l01_the_import_graph_has_no_circle():
    mods = modules()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.slow  # one fresh interpreter per module (torch imports: ~2-4 s each)
def test_l01_each_module_imports_alone_in_a_fresh_interpreter():
    def one(name: str) -> tuple[str, int, str]:
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        return name, proc.returncode, proc.stderr[-400:]

    with ThreadPoolExecutor(2) as pool:
        failed = [r for r in pool.map(one, sorted(modules())) if r[1] != 0]
    assert not failed, failed


LIMIT = 450  # lines a module; a longer one says why in its docstring ("one read" rule of issue 22)


def test_l02_modules_fit_in_one_read_or_say_why():
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()
            if len(path.read_text().splitlines()) > LIMIT}
    unexplained = [n for n in long if "longer than" not in (ast.get_docstring(ast.parse(modules()[n].read_text())) or "")]
    print("modules over", LIMIT, "lines:", long)
    assert not unexplained or set(unexplained) <= KNOWN_LONG, sorted(set(unexplained) - KNOWN_LONG)


# Over the limit today, each to be split (issue 22): the test fails when a new one joins them.
KNOWN_LONG = {"aotpack.hub", "aotpack.farm", "aotpack.cli", "aotpack.bench", "aotpack.artifact.manifest",
              "aotpack.artifact.files", "aotpack.builder.weights", "aotpack.builder.pipeline", "aotpack.builder.recipe"}

"""The package's layers point one way: no import cycles, and no llmgen import hidden inside a function
(except the CLI's per-command imports, which keep `llmgen --help` from loading torch)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "llmgen"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def llmgen_imports(node: ast.AST, modules: set[str]) -> list[str]:
    """llmgen modules imported by the import statement `node` (`from llmgen.x import y` names llmgen.x.y
    when that is a module, else llmgen.x)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "llmgen"]
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "llmgen":
        return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
    return []


def graph() -> tuple[dict[str, set[str]], list[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    inner = []
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for n in ast.walk(fn):
                if llmgen_imports(n, set(files)):
                    inner.append(f"{path.relative_to(SRC.parent)}:{n.lineno}")
        for n in ast.walk(tree):
            edges[mod].update(t for t in llmgen_imports(n, set(files)) if t in files and t != mod)
    return edges, inner


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        state[m] = 2
        path.pop()
        return []

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_no_llmgen_import_inside_a_function():
    _, inner = graph()
    inner = [place for place in inner if not place.startswith("llmgen/cli.py:")]
    assert inner == [], f"import llmgen modules at the top of the file: {inner}"


def test_the_cli_starts_without_the_heavy_libraries():
    code = "import sys, llmgen.cli; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_import_cycle():
    edges, _ = graph()
    assert find_cycle(edges) == []


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


# Lower layers never import higher ones (docs/architecture.md); modules of one layer may import each other.
LAYERS = [
    ("llmgen.version", "llmgen.errors", "llmgen.ui", "llmgen.atomic", "llmgen.hub"),
    ("llmgen.config",),
    ("llmgen.data", "llmgen.model.transformer", "llmgen.model.kv_cache", "llmgen.model.lora", "llmgen.kernels"),
    ("llmgen.model",),  # checkpoint I/O
    ("llmgen.interop",),
    ("llmgen.generate",),
    ("llmgen.evaluate",),
    ("llmgen.train",),
    ("llmgen.serve",),  # the HTTP server over the engine
    ("llmgen", "llmgen.cli", "llmgen.__main__"),  # the package's re-exports: the Python API
]


def layer(mod: str) -> int:
    best = (-1, -1)  # (length of the longest matching prefix, its layer)
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best[0]:
                best = (len(p), i)
    assert best[1] >= 0, f"{mod} is in no layer: add it to LAYERS and docs/architecture.md"
    return best[1]


def test_imports_point_down_the_layers():
    edges, _ = graph()
    upward = [f"{m} -> {t}" for m, ts in edges.items() for t in ts if layer(t) > layer(m)]
    assert upward == []

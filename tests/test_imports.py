"""The package's module structure: every module imports on its own, and no two import each other.

The import graph is read from the source with ``ast``: module-level imports and the lazy ones inside
functions alike, since a lazy cycle is still two modules that need each other: no cycle is allowed,
lazy or not (config is the schema: the batch plan and the memory estimate depend on it, the stages
call the loops that train and score, and nothing reaches back).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rerank_dist"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The rerank_dist modules that name imports anywhere in its source (a package counts as its __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from ..data import y
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            # from pkg import mod names the module mod; from mod import obj names mod
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    found = set()
    for target in targets:
        while target not in modules and "." in target:
            target = target.rpartition(".")[0]
        if target in modules and target != name and target.startswith("rerank_dist"):
            found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports():
    graph = _graph()
    assert "rerank_dist.plan" in graph["rerank_dist.settings"]  # module level
    assert "rerank_dist.memory" in graph["rerank_dist.plan"]  # inside dry_run_lines
    assert "rerank_dist.train" in graph["rerank_dist.pipeline"]  # inside the train stage


def test_config_is_the_schema_alone():
    graph = _graph()
    assert not graph["rerank_dist.config"] & {"rerank_dist.plan", "rerank_dist.memory", "rerank_dist.settings"}
    for name in ("rerank_dist.plan", "rerank_dist.memory"):
        assert "rerank_dist.config" in graph[name]  # the dependency runs this way


def test_no_import_cycle_among_rerank_dist_modules():
    assert _cycles(_graph()) == []


def test_every_module_imports_alone():
    """Each module in a fresh process of its own (forked after the third-party libraries are loaded,
    which keeps 60 imports to seconds): none may rely on another rerank_dist module being imported first."""
    names = sorted(_modules())
    script = textwrap.dedent(f"""
        import importlib, os, sys, traceback
        import accelerate, pandas, peft, pyarrow, torch, transformers  # shared, so each child is quick
        failed = []
        for name in {names!r}:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            if os.waitpid(pid, 0)[1] != 0:
                failed.append(name)
        assert not any(m.startswith("rerank_dist") for m in sys.modules), "the parent imported rerank_dist"
        print("FAILED", failed)
        sys.exit(1 if failed else 0)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert len(names) > 50 and "rerank_dist.settings" in names
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]

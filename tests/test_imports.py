"""The package's import graph has no cycles (requirement 4 of issue 21).

Every ``import``/``from ... import`` in ``fedmpi/`` counts, module-level and
function-level alike (a function-level import only hides a cycle, it does not
break it); relative imports are resolved; ``from fedmpi import x`` is an edge to
the submodule ``fedmpi.x`` when one exists, otherwise to the package.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PKG_ROOT = Path(__file__).resolve().parent.parent / "fedmpi"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = PKG_ROOT) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` over every .py file under root."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    pkg = root.name
    graph: dict[str, set[str]] = {}

    def resolve(name: str) -> str | None:
        # the longest prefix of name that is a module of the package
        parts = name.split(".")
        while parts:
            cand = ".".join(parts)
            if cand in files:
                return cand
            parts.pop()
        return None

    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == pkg or alias.name.startswith(pkg + "."):
                        edges.add(resolve(alias.name))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not (target == pkg or target.startswith(pkg + ".")):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in files else resolve(target))
        edges.discard(None)
        edges.discard(mod)
        graph[mod] = edges
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _one_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, for the failure message."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def test_graph_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "fedmpi"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from fedmpi import b\n")
    (pkg / "b.py").write_text("from .sub.c import X\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("import fedmpi.a\nX = 1\n")
    graph = import_graph(pkg)
    assert graph["fedmpi.a"] == {"fedmpi.b"}
    assert graph["fedmpi.b"] == {"fedmpi.sub.c"}
    assert graph["fedmpi.sub.c"] == {"fedmpi.a"}
    assert strongly_connected(graph) == [["fedmpi.a", "fedmpi.b", "fedmpi.sub.c"]]


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20, "the walk found too few modules"
    comps = strongly_connected(graph)
    msg = "\n".join(
        f"cycle of {len(c)} modules: {', '.join(c)}\n  e.g. {' -> '.join(_one_cycle(graph, c))}"
        for c in comps)
    assert not comps, "import cycles in fedmpi/:\n" + msg


def _python(code: str) -> subprocess.CompletedProcess:
    root = str(PKG_ROOT.parent)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=root, timeout=300)


def test_config_alone_validates_every_name():
    """fedmpi.config imports none of the modules whose names it checks: fedmpi.registry
    loads them on the first lookup, so a process that imported only config still knows
    every compressor, dataset, model and estimator (and rejects unknown ones)."""
    proc = _python(
        "import sys\n"
        "from fedmpi import config\n"
        "assert 'fedmpi.compress' not in sys.modules and 'fedmpi.data' not in sys.modules\n"
        "cfg = config.load(None, ['compressor.name=topk', 'sam.name=fedsam',"
        " 'model.name=logreg'])\n"
        "assert cfg.compressor.params.ratio == 0.01\n"
        "try:\n"
        "    config.load(None, ['model.name=nope'])\n"
        "except config.ConfigError as exc:\n"
        "    assert exc.key == 'model.name' and 'mlp' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('an unknown model was accepted')\n")
    assert proc.returncode == 0, proc.stderr


def test_a_compressor_module_imports_first():
    """Import order does not matter: a compressor module that imports ConfigError from
    fedmpi.config, imported before anything else, does not meet a half-initialised module."""
    proc = _python("import fedmpi.compress.sfc3\nfrom fedmpi import compress, config\n"
                   "assert config.ConfigError is __import__('fedmpi.errors').errors.ConfigError\n"
                   "assert '3sfc' in compress.REGISTRY\n")
    assert proc.returncode == 0, proc.stderr

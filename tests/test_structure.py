"""Package structure: :mod:`fedmpi.comm` is the only module that talks to MPI.

Every other module of ``fedmpi`` (benchmarks included) goes through comm's public API: it
neither imports mpi4py nor names ``MPI``, reaches no communicator (``x.comm``) and calls
no private member of comm's classes (``Transport._wait``, ``_poll``, ``_timed``, ...).
Command lines that *launch* ``python -m mpi4py`` (fedmpi.launch, the benchmarks) are
strings, and strings are not checked."""

from __future__ import annotations

import ast
from pathlib import Path

import fedmpi

PACKAGE = Path(fedmpi.__file__).resolve().parent
COMM = PACKAGE / "comm.py"
SELF = ("self", "cls")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _on_self(node: ast.Attribute) -> bool:
    return isinstance(node.value, ast.Name) and node.value.id in SELF


def comm_private_members() -> set[str]:
    """The private names comm's classes define (methods) or set (``self._x``)."""
    names: set[str] = set()
    for cls in ast.parse(COMM.read_text()).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in ast.walk(cls):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _private(node.name):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and _on_self(node) and _private(node.attr):
                names.add(node.attr)
    return names


def violations(source: str, private: set[str]) -> list[str]:
    """What in ``source`` (a module other than comm) talks to MPI around comm."""
    out = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            out += [f"{line}: import {a.name}" for a in node.names
                    if a.name.split(".")[0] == "mpi4py"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mpi4py":
            out.append(f"{line}: from {node.module} import ...")
        elif isinstance(node, ast.Name) and node.id == "MPI":
            out.append(f"{line}: MPI")
        elif isinstance(node, ast.Attribute) and not _on_self(node):
            if node.attr in private:
                out.append(f"{line}: .{node.attr} (a private member of fedmpi.comm)")
            elif node.attr == "comm":
                out.append(f"{line}: .comm (a raw MPI communicator)")
    return out


def test_comm_has_the_private_members_the_check_looks_for():
    assert {"_wait", "_poll", "_timed", "_bcast"} <= comm_private_members()


def test_the_check_finds_each_kind_of_violation():
    private = comm_private_members()
    source = "\n".join([
        "import mpi4py", "from mpi4py import MPI", "import mpi4py.MPI as M",
        "x = MPI.COMM_WORLD", "t._timed(lambda: t._wait(req))", "t._poll(done)",
        "link.comm.Barrier()",
        "self._wait(req)",  # a class's own private member: not comm's
        "s = 'python -m mpi4py -m fedmpi.train'",  # a command line: fine
    ])
    found = violations(source, private)
    assert sorted(int(f.split(":")[0]) for f in found) == [1, 2, 3, 4, 5, 5, 6, 7], found


def test_only_comm_talks_to_mpi():
    private = comm_private_members()
    bad = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == COMM:
            continue
        found = violations(path.read_text(), private)
        if found:
            bad[str(path.relative_to(PACKAGE.parent))] = found
    assert not bad, f"MPI outside fedmpi.comm (use or add a public comm method): {bad}"

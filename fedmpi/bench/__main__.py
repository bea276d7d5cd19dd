"""``python -m fedmpi.bench NAME [args]``: run one benchmark (``--help`` lists them)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import fedmpi.bench


def benchmarks() -> dict[str, str]:
    """Command name -> module, for every benchmark module in this package."""
    out = {}
    for info in pkgutil.iter_modules(fedmpi.bench.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"fedmpi.bench.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "main"):
            out[mod.NAME] = mod.__name__
    return out


def main(argv: list[str]) -> int:
    known = benchmarks()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in known:
        print("usage: python -m fedmpi.bench NAME [args]\nbenchmarks: "
              + ", ".join(sorted(known)), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(importlib.import_module(known[argv[0]]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

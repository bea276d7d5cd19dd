"""Benchmarks: ``python -m fedmpi.bench NAME [args]``; each prints ratios measured side by
side in one run. Every module ``fedmpi/bench/<module>.py`` that defines ``NAME`` (the
command name) and ``main(argv) -> int`` is a benchmark."""

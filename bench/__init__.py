"""Benchmarks, kept apart from the tests: run from the repository root as ``python -m bench.<name> --help``.

Shared code (machine description, timing, pinning, a local stack, dated results) is in
:mod:`bench.harness`; ``python -m bench.report`` rewrites bench/README.md's tables from
the newest result of each bench.
"""

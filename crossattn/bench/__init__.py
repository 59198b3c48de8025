"""Benchmark suite: ``python -m crossattn.bench`` (see ``__main__``) and the pieces the
pytest-benchmark suite in ``benchmarks/`` reuses."""

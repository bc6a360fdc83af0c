"""Benchmarks for issue 6: accuracy, training cost and the auto layer, with the engine the service runs.

Run with ``python -m bench.run_all [--quick]`` (``make bench`` / ``make bench-quick``); results land in
``bench/results/`` (``bench/results/quick/`` for the quick run). Not part of ``make test``.
"""

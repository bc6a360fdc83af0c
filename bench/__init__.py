"""Benchmarks: accuracy, training cost, the auto layer and serving, with the engine the service runs.

Run with ``python -m bench.run_all [--quick]`` (``make bench`` / ``make bench-quick``); results land in
``bench/results/`` (``bench/results/quick/`` for the quick run). Not part of ``make test``.
"""

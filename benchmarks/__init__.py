"""Benchmark code, importable as ``aifactory_train.benchmarks`` (used by `aift bench`) and runnable as scripts."""

"""Benchmark scripts (not tests), a package so that they import each other as ``bench.<module>``.

Run each from the repository root as a module, e.g. ``.venv/bin/python -m bench.run_all --quick``;
``bench/serving/`` holds the parts of ``bench/run_all.py``.
"""

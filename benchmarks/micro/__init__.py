"""pytest-benchmark micro benchmarks of the segment store.

They sit outside testpaths, so a plain `python -m pytest` skips them; run
them with `python -m pytest benchmarks/micro`.
"""

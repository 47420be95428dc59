"""zep benchmark suite (run with `pytest benchmarks/`)."""

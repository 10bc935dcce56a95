"""CPU benchmarks (`make bench`, `python -m bench.<name>`); results in docs/benchmarks.md."""

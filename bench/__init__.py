"""Benchmarks: `make bench` (python -m bench). Every figure is printed beside a baseline measured in the same
run, as a ratio; nothing here asserts a timing."""

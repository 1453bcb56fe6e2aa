"""Benchmarks (run as scripts: python bench/NAME.py) and the stand-in trainer they plug in."""

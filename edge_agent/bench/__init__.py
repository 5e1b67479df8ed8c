"""Benchmarks run as commands (``sampleflow bench ...``), not as tests.

Timed assertions do not belong in the test suite (shared CI machines are
noisy); these commands measure and print, and the tests only smoke-run
them on tiny inputs.
"""

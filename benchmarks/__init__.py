"""shardtune's benchmarks: measured speed and memory of the recipe and its parts (docs/benchmarks.md).

A package run from the repository root, never installed with shardtune:

    python -m benchmarks list                      # the declared scenarios and their commands
    python -m benchmarks run throughput.smoke      # one scenario (extra flags are appended)
    python -m benchmarks.throughput --help         # one benchmark with its own flags

Each module is one benchmark with a ``main(argv)``; ``scenarios.py`` declares the named runs
(those docs/benchmarks.md and scripts/device_check.sh quote, and a cheap ``<name>.smoke`` of each
that the tests run); ``common.py`` holds the prelude every driver shares. Formulas and constants
(model FLOPs, GPU peaks, the GEMM probe, ``IGNORE_INDEX``) come from ``shardtune`` itself.

Module level imports nothing beyond the standard library here: the peer runners
(``benchmarks.peer_runners``) import the package in the peer virtual environment, which need not
import shardtune.
"""

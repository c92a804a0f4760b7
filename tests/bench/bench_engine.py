"""Thin wrapper: the benchmark lives in `signround.adapters.frontends.bench` (also `signround bench`).

    python tests/bench/bench_engine.py [--tiny] [--no-auto-round] [...]   # flags: see --help
"""

import sys

from signround.adapters.frontends.bench import main

if __name__ == "__main__":
    main(sys.argv[1:])

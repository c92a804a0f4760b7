"""Thin wrapper: the benchmark lives in `signround.adapters.frontends.bench`; this is `signround bench`.

    python tests/bench/bench_engine.py --dims tiny --no-reference      # flags: see --help
"""

import sys

from signround.adapters.frontends.bench import main

if __name__ == "__main__":
    main(sys.argv[1:])

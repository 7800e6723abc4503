"""Chaos run: a mixed auth workload under injected database failures (see kitium_pg/chaos.py).

python benchmarks/chaos.py [--duration SECONDS] [--threads N] [--tasks M] [--dsn DSN] [--seed S]
"""

from __future__ import annotations

import sys

from kitium_pg.chaos import main

if __name__ == "__main__":
    sys.exit(main())
